"""The one look at Redis taken on a miss, and what it says.

:func:`queue_probe` puts the commands on a pipeline; :func:`parse_probe` turns
the replies into :class:`Evidence`. Executing the pipeline is the caller's job,
so the sync and async paths share everything but the ``await``.

Cost: one round trip to the reading endpoint (PTTL, one multi-section INFO, a
bounded SCAN of the run's keys, and the run's journal when it lives there), plus
at most one more when the journal lives elsewhere or the reader is a replica.
INFO comes back raw and only the fields used here are parsed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

INFO_SECTIONS = ("server", "memory", "stats", "replication", "commandstats")
JOURNAL_COUNT = 200

_INFO_FIELDS = frozenset({
    "run_id", "uptime_in_seconds", "server_time_usec", "redis_version",
    "used_memory", "maxmemory", "maxmemory_policy",
    "evicted_keys", "expired_keys",
    "role", "master_host", "master_port", "master_link_status",
    "cmdstat_flushdb", "cmdstat_flushall",
})
_CALLS = re.compile(r"calls=(\d+)")


def parse_info(raw: Any) -> dict[str, str]:
    """Only the INFO fields we use, as strings (INFO is requested raw, not parsed by redis-py)."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, dict):  # a client that parsed INFO itself
        return {k: str(v) for k, v in raw.items() if k in _INFO_FIELDS}
    out: dict[str, str] = {}
    for line in str(raw).splitlines():
        name, sep, value = line.partition(":")
        if sep and name in _INFO_FIELDS:
            out[name] = value.strip()
    return out


_GLOB_SPECIAL = set("*?[]\\^-")


def glob_escape(text: str) -> str:
    """Escape Redis glob characters so an id matches only itself."""
    return "".join("\\" + ch if ch in _GLOB_SPECIAL else ch for ch in text)


def run_scan_pattern(run_id: str) -> str:
    """A coarse SCAN filter for the run's keys: the run id anywhere, case-insensitively.

    It may let other runs' keys through (``run-1`` inside ``run-10``);
    :func:`near_identical` decides, so another run's key is never evidence.
    """
    parts = []
    for ch in run_id:
        lower, upper = ch.lower(), ch.upper()
        if lower != upper and len(lower) == 1 and len(upper) == 1:
            parts.append(f"[{lower}{upper}]")
        else:
            parts.append(glob_escape(ch))
    return "*" + "".join(parts) + "*"


_SEPARATORS = re.compile(r"[\s:_\-./|]+")
_LEADING_ZEROS = re.compile(r"(?<!\d)0+(?=\d)")


def _normal_form(key: str) -> str:
    folded = _SEPARATORS.sub(":", key.strip().casefold()).strip(":")
    return _LEADING_ZEROS.sub("", folded)


def near_identical(expected: str, candidate: str) -> bool:
    """True when ``candidate`` differs from ``expected`` only by case, padding or separators."""
    return candidate != expected and _normal_form(candidate) == _normal_form(expected)


@dataclasses.dataclass
class JournalEntry:
    """One journal record, ordered by its server-assigned stream id."""

    stream_id: str
    fields: dict[str, str]

    @property
    def ms(self) -> int:
        return int(self.stream_id.split("-", 1)[0])

    @property
    def op_ms(self) -> int:
        """Server time of the operation: the stream id's, less the time it waited to be flushed."""
        lag = self.fields.get("lag_ms", "0")
        return self.ms - (int(lag) if lag.isdigit() else 0)

    @property
    def seq(self) -> tuple[int, int]:
        ms, _, seq = self.stream_id.partition("-")
        return int(ms), int(seq or 0)

    @property
    def op(self) -> str:
        return self.fields.get("op", "")


@dataclasses.dataclass
class Evidence:
    """Everything the verdict rules look at. Built by :func:`parse_probe`."""

    key: str
    run_id: str | None
    node_id: str | None
    pttl_ms: int = -2
    info: dict[str, str] = dataclasses.field(default_factory=dict)
    near_keys: list[str] = dataclasses.field(default_factory=list)
    scan_complete: bool = False
    run_keys_seen: int = 0
    journal: list[JournalEntry] = dataclasses.field(default_factory=list)
    journal_read: bool = False
    #: Entries in the run's journal window read (all nodes), and the newest one's id: a
    #: filtered read returns only this key's and this node's entries in ``journal``.
    journal_total: int = 0
    journal_last_id: str | None = None
    reader_db: int = 0
    reader_endpoint: str | None = None
    #: The server run_id this process saw before the miss (cached per connection).
    cached_server_run_id: str | None = None
    #: For a replica reader: does the key exist on its master? (None: not checked)
    master_has_key: bool | None = None
    master_endpoint: str | None = None
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def key_exists(self) -> bool:
        return self.pttl_ms != -2

    @property
    def server_run_id(self) -> str | None:
        return self.info.get("run_id")

    def info_int(self, name: str) -> int | None:
        try:
            return int(self.info[name])
        except (KeyError, ValueError):
            return None

    @property
    def server_time_ms(self) -> int | None:
        usec = self.info_int("server_time_usec")
        return None if usec is None else usec // 1000

    @property
    def is_replica(self) -> bool:
        return self.info.get("role") == "slave"

    def flush_calls(self) -> int:
        total = 0
        for name in ("cmdstat_flushdb", "cmdstat_flushall"):
            match = _CALLS.search(self.info.get(name, ""))
            if match:
                total += int(match.group(1))
        return total


#: Entries of the run's journal a filtered read looks through on the server.
FILTERED_JOURNAL_COUNT = 1000

# KEYS: the run's journal. ARGV: state key, node id, count. Reads the newest entries
# on the server and returns {total, newest id, entries of this key or node}: a big
# run's journal costs the miss path a few entries to parse, not a thousand.
_JOURNAL_FILTER_SCRIPT = """
local entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[3])
local kept = {}
for _, entry in ipairs(entries) do
  local f = entry[2]
  for i = 1, #f, 2 do
    if (f[i] == 'key' and f[i + 1] == ARGV[1]) or (f[i] == 'node_id' and f[i + 1] == ARGV[2]) then
      kept[#kept + 1] = entry
      break
    end
  end
end
local newest = ''
if #entries > 0 then newest = entries[1][1] end
return {#entries, newest, kept}
"""


def queue_journal_read(pipe: Any, journal_key: str, key: str, node_id: str | None, filtered: bool) -> None:
    """The run's journal: filtered on the server (the miss path) or whole (the CLI's timeline)."""
    if filtered:
        pipe.eval(_JOURNAL_FILTER_SCRIPT, 1, journal_key, key, node_id or "", FILTERED_JOURNAL_COUNT)
    else:
        pipe.xrevrange(journal_key, count=JOURNAL_COUNT)


def queue_probe(pipe: Any, key: str, run_id: str | None, journal_key: str | None, scan_count: int,
                node_id: str | None = None, filtered: bool = True) -> int:
    """Queue the probe on ``pipe``; returns how many commands were queued."""
    pipe.pttl(key)
    pipe.execute_command("INFO", *INFO_SECTIONS)
    queued = 2
    if run_id:
        pipe.scan(0, match=run_scan_pattern(run_id), count=scan_count)
        queued += 1
    if journal_key is not None:
        queue_journal_read(pipe, journal_key, key, node_id, filtered)
        queued += 1
    return queued


def parse_journal(reply: Any) -> list[JournalEntry]:
    """XRANGE/XREVRANGE reply -> entries in server order (oldest first)."""
    entries = []
    for stream_id, fields in reply or []:
        sid = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
        if isinstance(fields, list):  # raw from a script: [field, value, field, value, ...]
            fields = dict(zip(fields[::2], fields[1::2], strict=False))
        clean = {
            (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in (fields or {}).items()
        }
        entries.append(JournalEntry(sid, clean))
    entries.sort(key=lambda e: e.seq)
    return entries


def parse_probe(evidence: Evidence, replies: Sequence[Any], has_scan: bool, has_journal: bool) -> None:
    """Fill ``evidence`` from the probe's replies (errors are kept as evidence, not raised)."""
    replies = list(replies)
    pttl, info = replies[0], replies[1]
    if isinstance(pttl, Exception):
        evidence.errors.append(f"PTTL: {type(pttl).__name__}")
    else:
        evidence.pttl_ms = int(pttl)
    if isinstance(info, Exception):
        evidence.errors.append(f"INFO: {type(info).__name__}")
    else:
        evidence.info = parse_info(info)
    index = 2
    if has_scan:
        scan = replies[index]
        index += 1
        if isinstance(scan, Exception):
            evidence.errors.append(f"SCAN: {type(scan).__name__}")
        else:
            cursor, keys = scan
            evidence.scan_complete = int(cursor) == 0
            for raw in keys:
                candidate = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                if candidate.startswith(("subflow:journal:", "subflow:miss:")):
                    continue
                evidence.run_keys_seen += 1
                if near_identical(evidence.key, candidate):
                    evidence.near_keys.append(candidate)
    if has_journal:
        parse_journal_reply(evidence, replies[index])


def parse_journal_reply(evidence: Evidence, reply: Any) -> None:
    """Either reply of :func:`queue_journal_read`."""
    if isinstance(reply, Exception):
        evidence.errors.append(f"journal read: {type(reply).__name__}")
        return
    if isinstance(reply, list) and len(reply) == 3 and isinstance(reply[0], int):
        total, newest, kept = reply
        evidence.journal = parse_journal(kept)
        evidence.journal_total = int(total)
        newest = newest.decode() if isinstance(newest, bytes) else str(newest)
        evidence.journal_last_id = newest or None
    else:
        evidence.journal = parse_journal(reply)
        evidence.journal_total = len(evidence.journal)
        evidence.journal_last_id = evidence.journal[-1].stream_id if evidence.journal else None
    evidence.journal_read = True


