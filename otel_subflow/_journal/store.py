"""The journal on Redis: the write script, and the reads the analysis and the CLI make.

Writes: one ``EVALSHA`` per batch of records (see :data:`WRITE_SCRIPT`), which

1. checks memory pressure with ``INFO memory`` at most once a second for the whole
   fleet (the result is shared through the status hash) and, near maxmemory, writes
   nothing and shrinks the journal instead;
2. picks the current bucket, or starts a new one when the current one is old or big;
3. appends each record to its run's field, and a copy to the bucket's capped global field;
4. finds cross-process races (an init answering an earlier miss, or a miss whose
   analysis did not see an init that had already been written);
5. deletes the oldest buckets until the journal is within its byte budget.

Reads are plain commands (``ZRANGE`` of the index, ``HGET`` of one field per bucket),
so they work under ``CLIENT PAUSE WRITE`` and with no scripting permission.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from otel_subflow._journal import schema
from otel_subflow._journal.schema import JournalEntry, Writer
from otel_subflow._redis.permissions import is_refusal

# KEYS: index, status, counts. ARGV[1]: bucket key prefix; ARGV[2]: parameters (numbers,
# space separated, see WriteParams); ARGV[3]: writers ("id US info RS" ...); then four
# arguments per record: escaped run id ('' for none), compact key, the server time the
# miss's analysis read the journal at ('' for no race check), and the record body.
# Returns {status, total bytes, buckets, trimmed, lost buckets, used_memory, maxmemory,
# policy, budget, then (record number, 'init'|'miss', value) per race found}.
WRITE_SCRIPT = r"""
local idx, status_key, counts_key = KEYS[1], KEYS[2], KEYS[3]
local prefix = ARGV[1]
local p = {}
for v in string.gmatch(ARGV[2], '%S+') do p[#p + 1] = tonumber(v) end
local budget_pct, budget_fixed, rotate_div, min_ret, max_ret, my_ttl = p[1], p[2], p[3], p[4], p[5], p[6]
local max_buckets, global_cap, run_cap, marker_window = p[7], p[8], p[9], p[10]
local mem_check, pressure_pct, resume_pct, sample_counters = p[11], p[12], p[13], p[14] == 1
local overhead, bucket_overhead = @FIELD_OVERHEAD@, @BUCKET_OVERHEAD@
local US, RS = '\31', '\30'

local function fmt(n) return string.format('%d', n) end
local function split(s)
  local out = {}
  for f in string.gmatch(s .. US, '([^\31]*)\31') do out[#out + 1] = f end
  return out
end

local function pexpire(k, ms) redis.call('PEXPIRE', k, ms) end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Memory pressure, and the longest state TTL any writer has seen: shared by the fleet.
local st = redis.call('HMGET', status_key, 'at', 'used', 'max', 'policy', 'paused', 'ttl', 'c', 'cp')
-- Redis's counters (evictions, expiries, deleting commands), sampled with the memory check:
-- an init carries the newest sample taken before it, so the analysis can tell what happened since.
local samples = {st[7], st[8]}
local used, maxmem, policy, paused = tonumber(st[2]) or 0, tonumber(st[3]) or 0, st[4] or '', st[5] == '1'
local ttl = math.max(tonumber(st[6]) or 0, my_ttl)
local retention = max_ret
if ttl > 0 then retention = math.min(max_ret, math.max(min_ret, 2 * ttl)) end
if now - (tonumber(st[1]) or 0) >= mem_check then
  local info
  if sample_counters then info = redis.call('INFO', 'memory', 'stats', 'commandstats')
  else info = redis.call('INFO', 'memory') end
  used = tonumber(string.match(info, 'used_memory:(%d+)')) or 0
  maxmem = tonumber(string.match(info, 'maxmemory:(%d+)')) or 0
  policy = string.match(info, 'maxmemory_policy:([%w%-]+)') or ''
  if maxmem > 0 and used * 100 >= maxmem * pressure_pct then
    paused = true
  elseif maxmem == 0 or used * 100 < maxmem * resume_pct then
    paused = false
  end
  redis.call('HSET', status_key, 'at', fmt(now), 'used', fmt(used), 'max', fmt(maxmem), 'policy', policy,
             'paused', paused and '1' or '0', 'ttl', fmt(ttl))
  if sample_counters then
    local deletes = 0
    for _, c in ipairs({@DELETING_COMMANDS@}) do
      deletes = deletes + (tonumber(string.match(info, 'cmdstat_' .. c .. ':calls=(%d+)')) or 0)
    end
    local sample = fmt(now) .. ' ' .. (string.match(info, 'evicted_keys:(%d+)') or '') .. ' '
      .. (string.match(info, 'expired_keys:(%d+)') or '') .. ' ' .. fmt(deletes)
    if st[7] then redis.call('HSET', status_key, 'cp', st[7]) end
    redis.call('HSET', status_key, 'c', sample)
    samples = {sample, st[7]}
  end
  pexpire(status_key, max_ret)
elseif my_ttl > (tonumber(st[6]) or 0) then
  redis.call('HSET', status_key, 'ttl', fmt(ttl))
end
local budget = budget_fixed
if maxmem > 0 then budget = math.floor(maxmem * budget_pct / 100) end
local rotate_age = math.max(1000, math.floor(retention / rotate_div))
local rotate_bytes = math.max(4096, math.floor(budget / rotate_div))
global_cap = math.min(global_cap, math.max(1024, math.floor(budget / 64)))
run_cap = math.min(run_cap, math.max(1024, math.floor(budget / 4)))

-- The buckets, oldest first. Buckets that expired or were evicted leave the index.
local members = redis.call('ZRANGE', idx, 0, -1)
local starts, sizes, total, lost = {}, {}, 0, 0
for _, m in ipairs(members) do
  local size = redis.call('HGET', prefix .. m, '#')
  if size then
    starts[#starts + 1] = tonumber(m)
    sizes[#sizes + 1] = tonumber(size)
    total = total + tonumber(size)
  else
    redis.call('ZREM', idx, m)
    lost = lost + 1
  end
end
if lost > 0 then redis.call('HINCRBY', status_key, 'lost', lost) end
local trimmed = 0
local function drop_oldest()
  -- HDEL of every field, not DEL/UNLINK: the user's deletes are counted by their commands'
  -- calls (the counters samples), and ours must not look like theirs. The last HDEL deletes the key.
  local bucket = prefix .. fmt(starts[1])
  local fields = redis.call('HKEYS', bucket)
  for j = 1, #fields, 1000 do
    redis.call('HDEL', bucket, unpack(fields, j, math.min(j + 999, #fields)))
  end
  redis.call('ZREM', idx, fmt(starts[1]))
  total = total - sizes[1]
  table.remove(starts, 1)
  table.remove(sizes, 1)
  trimmed = trimmed + 1
end

-- Near maxmemory every byte we write would cost the user's data: write nothing, give memory back.
-- Except tombstones (they are what explains the evictions now): they go into the quarter of the
-- budget the journal keeps after giving the rest back, never beyond it.
local tombstones_only = false
if paused then
  while #starts > 0 and total > budget / 4 do drop_oldest() end
  local any_tombstone = false
  for j = 4, #ARGV, 4 do
    local code = string.match(ARGV[j + 3] or '', '^[^\31]*\31(%a)')
    if code == 'x' or code == 'e' or code == 'd' then any_tombstone = true end
  end
  if not any_tombstone or total >= budget / 4 then
    return {'paused', total, #starts, trimmed, lost, used, maxmem, policy, budget}
  end
  tombstones_only = true
end

local n = #starts
if n == 0 or now - starts[n] >= rotate_age or sizes[n] >= rotate_bytes then
  local start = now
  if n > 0 and start <= starts[n] then start = starts[n] + 1 end
  local key = prefix .. fmt(start)
  redis.call('HSET', key, '#', bucket_overhead)
  pexpire(key, retention + rotate_age)
  redis.call('ZADD', idx, start, fmt(start))
  pexpire(idx, 2 * max_ret)
  n = n + 1
  starts[n], sizes[n] = start, bucket_overhead
  total = total + bucket_overhead
end
local cur = prefix .. fmt(starts[n])
local off = fmt(now - starts[n])
local grow = {}
for k = 1, n do grow[k] = 0 end

for id, info in string.gmatch(ARGV[3], '([^\31\30]+)\31([^\30]*)\30') do
  if redis.call('HSETNX', cur, 'w:' .. id, info) == 1 then grow[n] = grow[n] + #id + 2 + #info + overhead end
end

local pending, order, gparts, counts, results, markers = {}, {}, {}, {}, {}, {}
local function run_value(k, field)
  local v = redis.call('HGET', prefix .. fmt(starts[k]), field) or ''
  if k == n and pending[field] then v = v .. table.concat(pending[field]) end
  return v
end

local rec, i = 0, 4
while i + 3 <= #ARGV do
  rec = rec + 1
  local run, ck, seen, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  i = i + 4
  local f = split(body)
  local op = f[2]
  repeat  -- (a loop run once: 'break' skips a record)
  if tombstones_only and op ~= 'x' and op ~= 'e' and op ~= 'd' then break end
  if op == 'i' then
    -- the newest counters sample taken no later than the init itself (its flush less its lag)
    local op_ms = now - (tonumber(f[1]) or 0)
    for _, sample in ipairs(samples) do
      if sample and (tonumber(string.match(sample, '^(%d+)')) or now) <= op_ms then
        body = body .. US .. sample
        break
      end
    end
  end
  local weight = 1
  if op == 's' then weight = tonumber(f[8]) or 1 end  -- a record counting rate-limited misses
  counts[op] = (counts[op] or 0) + weight
  if run ~= '' then
    local field = 'r:' .. run
    local node = f[3]
    local mfield = 'm:' .. run .. US .. node .. US .. ck
    if op == 'i' and ck ~= '' then
      -- An init answers a miss of the same key that left a marker: a race. Buckets
      -- without markers (the common case) cost one HGET of their count per batch.
      for k = n, 1, -1 do
        if k < n and starts[k + 1] < now - marker_window then break end
        local bk = prefix .. fmt(starts[k])
        if markers[k] == nil then markers[k] = tonumber(redis.call('HGET', bk, 'm#') or '0') end
        local marker = markers[k] > 0 and redis.call('HGET', bk, mfield)
        if marker then
          redis.call('HDEL', bk, mfield)
          redis.call('HINCRBY', bk, 'm#', -1)
          markers[k] = markers[k] - 1
          grow[k] = grow[k] - (#mfield + #marker + overhead)
          results[#results + 1] = rec
          results[#results + 1] = 'init'
          results[#results + 1] = marker
          break
        end
      end
    elseif op == 'm' and seen ~= '' and ck ~= '' then
      -- A miss whose analysis did not see an init that was already written: a race.
      local seen_ms, found = tonumber(seen), nil
      for k = n, 1, -1 do
        if k < n and starts[k + 1] <= seen_ms then break end
        for r in string.gmatch(run_value(k, field), '([^\30]*)\30') do
          local g = split(r)
          local arrived = starts[k] + (tonumber(g[1]) or 0)
          if g[3] == 'i' and g[4] == node and g[5] == ck and arrived > seen_ms then found = g[8] end
        end
        if found then break end
      end
      if found then
        results[#results + 1] = rec
        results[#results + 1] = 'miss'
        results[#results + 1] = found
      else
        local marker = f[7] .. US .. fmt(now) .. US .. (f[8] or '')
        local old = redis.call('HGET', cur, mfield)
        redis.call('HSET', cur, mfield, marker)
        if old then
          grow[n] = grow[n] + #marker - #old
        else
          markers[n] = redis.call('HINCRBY', cur, 'm#', 1)
          grow[n] = grow[n] + #mfield + #marker + overhead
        end
      end
    end
    if not pending[field] then
      pending[field] = {}
      order[#order + 1] = field
    end
    local list = pending[field]
    list[#list + 1] = off .. US .. body .. RS
  end
  gparts[#gparts + 1] = off .. US .. run .. US .. body .. RS
  until true
end

local function append(field, tail, cap)
  local old = redis.call('HGET', cur, field)
  local new = (old or '') .. tail
  if #new > cap then
    local cut = string.find(new, RS, #new - cap, true)
    new = cut and string.sub(new, cut + 1) or ''
  end
  redis.call('HSET', cur, field, new)
  if old then grow[n] = grow[n] + #new - #old else grow[n] = grow[n] + #field + #new + overhead end
end
for _, field in ipairs(order) do append(field, table.concat(pending[field]), run_cap) end
if #gparts > 0 then append('g', table.concat(gparts), global_cap) end
for op, c in pairs(counts) do redis.call('HINCRBY', counts_key, op, c) end

for k = 1, n do
  if grow[k] ~= 0 then
    redis.call('HINCRBY', prefix .. fmt(starts[k]), '#', grow[k])
    sizes[k] = sizes[k] + grow[k]
    total = total + grow[k]
  end
end

-- The budget, the bucket count and the retention: the oldest buckets go first.
while n > 1 and (total > budget or n > max_buckets or starts[1] < now - retention - rotate_age) do
  drop_oldest()
  n = n - 1
end
local out = {tombstones_only and 'paused+tombstones' or 'ok', total, n, trimmed, lost, used, maxmem, policy, budget}
for _, v in ipairs(results) do out[#out + 1] = v end
return out
""".replace("@FIELD_OVERHEAD@", str(schema.FIELD_OVERHEAD)).replace("@BUCKET_OVERHEAD@", str(schema.BUCKET_OVERHEAD)) \
    .replace("@DELETING_COMMANDS@", ", ".join(f"'{c}'" for c in schema.DELETING_COMMANDS))

WRITE_SCRIPT_SHA = hashlib.sha1(WRITE_SCRIPT.encode("utf-8")).hexdigest()
WRITE_KEYS = (schema.INDEX_KEY, schema.STATUS_KEY, schema.COUNTS_KEY)


@dataclasses.dataclass(frozen=True)
class WriteParams:
    """The write script's parameters (all integers on the wire)."""

    budget_pct: float
    budget_fixed_bytes: int
    rotate_divisor: int
    min_retention_ms: int
    max_retention_ms: int
    max_buckets: int
    global_cap_bytes: int
    run_cap_bytes: int
    marker_window_ms: int
    memory_check_ms: int
    pressure_pct: float
    resume_pct: float
    #: Sample the server's counters (the journal is on the state server: its counters are the state's).
    sample_counters: bool = True

    def encode(self, max_ttl_ms: int) -> str:
        values = (self.budget_pct, self.budget_fixed_bytes, self.rotate_divisor, self.min_retention_ms,
                  self.max_retention_ms, max_ttl_ms, self.max_buckets, self.global_cap_bytes, self.run_cap_bytes,
                  self.marker_window_ms, self.memory_check_ms, self.pressure_pct, self.resume_pct,
                  int(self.sample_counters))
        return " ".join(str(v) for v in values)


@dataclasses.dataclass(frozen=True)
class RecordArgs:
    """One record as the write script takes it."""

    run: str  # escaped run id, '' for records of no run
    ckey: str
    seen_ms: str  # '' unless the script should look for an init the miss did not see
    body: str


def write_args(params: str, writers: Iterable[Writer], records: Sequence[RecordArgs]) -> list[str]:
    out = [schema.BUCKET_PREFIX, params, "".join(f"{w.id}{schema.US}{w.info()}{schema.RS}" for w in writers)]
    for record in records:
        out.extend((record.run, record.ckey, record.seen_ms, record.body))
    return out


@dataclasses.dataclass
class WriteResult:
    """What one write script call reports."""

    status: str
    total_bytes: int
    buckets: int
    trimmed: int
    lost_buckets: int
    used_memory: int
    maxmemory: int
    policy: str
    budget: int
    #: (record number from 1, 'init' | 'miss', marker or init ids) per race found.
    races: list[tuple[int, str, str]]

    @classmethod
    def parse(cls, reply: Sequence[Any]) -> WriteResult:
        head = [_text(v) for v in reply[:9]]
        races = []
        rest = list(reply[9:])
        for k in range(0, len(rest) - 2, 3):
            races.append((int(rest[k]), _text(rest[k + 1]), _text(rest[k + 2])))
        return cls(head[0], int(head[1]), int(head[2]), int(head[3]), int(head[4]), int(head[5]), int(head[6]),
                   head[7], int(head[8]), races)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# -- reads ----------------------------------------------------------------------------

_WRITER_CACHE_SIZE = 4096
_writers: collections.OrderedDict[str, Writer | None] = collections.OrderedDict()
_writers_lock = threading.Lock()


def known_writer(writer_id: str) -> Writer | None:
    return _writers.get(writer_id)


def remember_writer(writer_id: str, info: str | None) -> None:
    """Writer ids are content-addressed, so what an id stands for never changes: cache it."""
    writer = Writer.parse(info) if info else None
    if writer is None:
        return
    with _writers_lock:
        _writers[writer_id] = writer
        _writers.move_to_end(writer_id)
        while len(_writers) > _WRITER_CACHE_SIZE:
            _writers.popitem(last=False)


def clear_caches() -> None:
    with _writers_lock:
        _writers.clear()
    with _index_lock:
        _indexes.clear()


_indexes: dict[Any, list[str]] = {}
_index_lock = threading.Lock()


def cached_index(where: Any) -> list[str]:
    """The bucket list last read from the journal at ``where`` (refreshed by every read)."""
    return list(_indexes.get(where, ()))


def _remember_index(where: Any, index: list[str]) -> None:
    with _index_lock:
        _indexes[where] = index


Call = tuple[str, tuple[Any, ...], dict[str, Any]]


#: The status fields the analysis reads: paused, and buckets lost.
_STATUS_READ = ("paused", "lost")


class RunRead:
    """Read one run's records: the index and one ``HGET`` per bucket, then what was missing.

    The bucket list is cached per journal, so a read is normally one round trip (in
    the analysis, the same pipeline as the probe); a bucket started since, or a writer
    not seen before, costs one more. Feed each step's replies to :meth:`feed`; ``None``
    back means done.
    """

    def __init__(self, where: Any, run_id: str) -> None:
        self.where = where
        self.run_id = run_id
        self.field = schema.run_field(run_id)
        self.buckets = cached_index(where)
        self.values: dict[str, str] = {}
        self.index: list[str] = []
        self.errors: list[str] = []
        #: Commands the journal's server refused (ACL): the run was not read whole.
        self.refused: list[str] = []
        #: The journal's status hash (``paused``, ``lost``: see the write script).
        self.status: dict[str, str] = {}
        self._pending: list[tuple[str, str]] = []

    def first_calls(self) -> list[Call]:
        calls: list[Call] = [("zrange", (schema.INDEX_KEY, 0, -1), {}),
                             ("hmget", (schema.STATUS_KEY, *_STATUS_READ), {})]
        calls.extend(("hget", (schema.bucket_key(b), self.field), {}) for b in self.buckets)
        return calls

    def _error(self, command: str, error: Exception) -> None:
        """An error reply is evidence of a failure, except a refusal (the analysis names those)."""
        if is_refusal(error):
            self.refused.append(command)
        else:
            self.errors.append(f"{command}: {type(error).__name__}")

    def feed_first(self, replies: Sequence[Any]) -> list[Call]:
        """Replies of :meth:`first_calls`; returns the calls of a second step (maybe none)."""
        index_reply = replies[0]
        if isinstance(index_reply, Exception):
            self._error("ZRANGE", index_reply)
            return []
        self.index = [_text(v) for v in index_reply]
        _remember_index(self.where, self.index)
        status = replies[1]
        if not isinstance(status, Exception) and status:
            self.status = {k: _text(v) for k, v in zip(_STATUS_READ, status, strict=False) if v is not None}
        for bucket, value in zip(self.buckets, replies[2:], strict=False):
            if isinstance(value, Exception):
                self._error("HGET", value)
            elif value is not None:
                self.values[bucket] = _text(value)
        missing = [b for b in self.index if b not in self.buckets]
        calls: list[Call] = [("hget", (schema.bucket_key(b), self.field), {}) for b in missing]
        self._pending = [("value", b) for b in missing]
        for bucket, writer_id in self._unknown_writers():
            calls.append(("hget", (schema.bucket_key(bucket), schema.WRITER_FIELD_PREFIX + writer_id), {}))
            self._pending.append(("writer", writer_id))
        return calls

    def feed_second(self, replies: Sequence[Any]) -> list[Call]:
        """Replies of the second step; returns the calls for writers still unknown (a third, rare step)."""
        got_values = False
        for (kind, ident), value in zip(self._pending, replies, strict=False):
            if isinstance(value, Exception):
                self._error("HGET", value)
            elif kind == "value" and value is not None:
                self.values[ident] = _text(value)
                got_values = True
            elif kind == "writer":
                remember_writer(ident, _text(value) if value is not None else None)
        self._pending = []
        if not got_values:
            return []
        calls: list[Call] = []
        for bucket, writer_id in self._unknown_writers():
            calls.append(("hget", (schema.bucket_key(bucket), schema.WRITER_FIELD_PREFIX + writer_id), {}))
            self._pending.append(("writer", writer_id))
        return calls

    def _unknown_writers(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        for bucket, value in self.values.items():
            for writer_id in schema.writer_ids_in(value):
                if writer_id not in seen and known_writer(writer_id) is None:
                    seen.add(writer_id)
                    out.append((bucket, writer_id))
        return out

    def entries(self) -> list[JournalEntry]:
        """The run's records in server order (oldest first)."""
        entries: list[JournalEntry] = []
        writers = _WriterView()
        for bucket in sorted(self.values, key=int):
            entries.extend(schema.parse_records(self.values[bucket], int(bucket), self.run_id, writers))
        entries.sort(key=lambda e: e.seq)
        return entries

    @property
    def newest_bucket(self) -> str | None:
        return self.index[-1] if self.index else None


class _WriterView(Mapping[str, Writer | None]):
    def __getitem__(self, key: str) -> Writer | None:
        return known_writer(key)

    def get(self, key: str, default: Any = None) -> Any:
        return known_writer(key) or default

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


def run_sync(client: Any, read: RunRead) -> list[JournalEntry]:
    """Drive a :class:`RunRead` on a sync client (the CLI and the lab); raises what Redis raises."""
    calls = read.first_calls()
    replies = _pipeline(client, calls)
    calls = read.feed_first(replies)
    while calls:
        calls = read.feed_second(_pipeline(client, calls))
    return read.entries()


def _pipeline(client: Any, calls: list[Call]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for name, args, kwargs in calls:
        getattr(pipe, name)(*args, **kwargs)
    return list(pipe.execute(raise_on_error=False))


def read_run(client: Any, run_id: str) -> list[JournalEntry]:
    """Every record of one run, oldest first."""
    return run_sync(client, RunRead(("client", id(client)), run_id))


def read_recent(client: Any, limit: int) -> list[JournalEntry]:
    """The latest ``limit`` records of every run (the buckets' capped global copies), oldest first."""
    index = [_text(v) for v in client.zrange(schema.INDEX_KEY, 0, -1)]
    entries: list[JournalEntry] = []
    for bucket in reversed(index):
        value = client.hget(schema.bucket_key(bucket), schema.GLOBAL_FIELD)
        if value is None:
            continue
        text = _text(value)
        _fetch_writers(client, bucket, schema.writer_ids_in(text, with_run=True))
        found = schema.parse_records(text, int(bucket), None, _WriterView(), with_run=True)
        entries[:0] = found
        if len(entries) >= limit:
            break
    entries.sort(key=lambda e: e.seq)
    return entries[-limit:]


def _fetch_writers(client: Any, bucket: str, writer_ids: Iterable[str]) -> None:
    unknown = [w for w in writer_ids if known_writer(w) is None]
    if not unknown:
        return
    values = client.hmget(schema.bucket_key(bucket), [schema.WRITER_FIELD_PREFIX + w for w in unknown])
    for writer_id, value in zip(unknown, values, strict=True):
        remember_writer(writer_id, _text(value) if value is not None else None)


def read_counts(client: Any) -> dict[str, int]:
    """Records written so far by operation, over the journal's life (all writers).

    ``misses_suppressed`` counts the rate-limited misses themselves, not their records.
    """
    raw = client.hgetall(schema.COUNTS_KEY) or {}
    out: dict[str, int] = {}
    for code, value in raw.items():
        op = schema.OPS_BY_CODE.get(_text(code))
        if op is not None:
            out[op] = int(value)
    return out


@dataclasses.dataclass
class Usage:
    """How much memory the journal takes on its server, and within what budget."""

    buckets: int
    estimated_bytes: int
    measured_bytes: int | None
    oldest_ms: int | None
    newest_ms: int | None
    status: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_usage(client: Any, measure: bool = True) -> Usage:
    """The journal's own footprint: our estimate, and ``MEMORY USAGE`` of its keys when allowed.

    ``SAMPLES 0`` weighs every field: by default Redis weighs 5 and extrapolates, and a bucket's
    large global copy among those 5 inflates the figure several times. The budget bounds the fields,
    so the exact count costs the server well under a millisecond per bucket.
    """
    index = [_text(v) for v in client.zrange(schema.INDEX_KEY, 0, -1)]
    pipe = client.pipeline(transaction=False)
    for bucket in index:
        pipe.hget(schema.bucket_key(bucket), schema.BYTES_FIELD)
    if measure:
        for bucket in index:
            pipe.memory_usage(schema.bucket_key(bucket), samples=0)
        for key in (schema.INDEX_KEY, schema.STATUS_KEY, schema.COUNTS_KEY):
            pipe.memory_usage(key, samples=0)
    pipe.hgetall(schema.STATUS_KEY)
    replies = pipe.execute(raise_on_error=False)
    estimated = sum(int(v) for v in replies[: len(index)] if v is not None and not isinstance(v, Exception))
    measured: int | None = None
    if measure:
        sizes = replies[len(index): -1]
        if not any(isinstance(v, Exception) for v in sizes):
            measured = sum(int(v) for v in sizes if v is not None)
    status_raw = replies[-1]
    status = {} if isinstance(status_raw, Exception) else {_text(k): _text(v) for k, v in (status_raw or {}).items()}
    return Usage(len(index), estimated, measured, int(index[0]) if index else None,
                 int(index[-1]) if index else None, status)
