"""The journal's reads: what the analysis and the CLI read of it, and what it takes on its server.

Reads are plain commands (``ZRANGE`` of the index, ``HGET`` of one field per bucket),
so they work under ``CLIENT PAUSE WRITE`` and with no scripting permission. Writes
are the write script's (``script.py``), sent by the writer (``writer.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from otel_subflow._journal import schema
from otel_subflow._journal.entries import JournalEntry, parse_records, writer_ids_in
from otel_subflow._journal.schema import Writer
from otel_subflow._redis.permissions import is_refusal
from otel_subflow._runtime import WRITER_CACHE_SIZE, runtime


def known_writer(writer_id: str) -> Writer | None:
    return runtime.journal_writers.get(writer_id)


def remember_writer(writer_id: str, info: str | None) -> None:
    """Writer ids are content-addressed, so what an id stands for never changes: cache it."""
    writer = Writer.parse(info) if info else None
    if writer is None:
        return
    writers = runtime.journal_writers
    with runtime.lock:
        writers[writer_id] = writer
        writers.move_to_end(writer_id)
        while len(writers) > WRITER_CACHE_SIZE:
            writers.popitem(last=False)


def cached_index(where: object) -> list[str]:
    """The bucket list last read from the journal at ``where`` (refreshed by every read)."""
    return list(runtime.journal_indexes.get(where, ()))


def _remember_index(where: object, index: list[str]) -> None:
    with runtime.lock:
        runtime.journal_indexes[where] = index


Call = tuple[str, tuple[Any, ...], dict[str, Any]]


#: The status fields the analysis reads: paused, and buckets lost.
_STATUS_READ = (schema.STATUS_PAUSED, schema.STATUS_LOST)


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
        self.index = [schema.text(v) for v in index_reply]
        _remember_index(self.where, self.index)
        status = replies[1]
        if not isinstance(status, Exception) and status:
            self.status = {k: schema.text(v) for k, v in zip(_STATUS_READ, status, strict=False) if v is not None}
        for bucket, value in zip(self.buckets, replies[2:], strict=False):
            if isinstance(value, Exception):
                self._error("HGET", value)
            elif value is not None:
                self.values[bucket] = schema.text(value)
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
                self.values[ident] = schema.text(value)
                got_values = True
            elif kind == "writer":
                remember_writer(ident, schema.text(value) if value is not None else None)
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
            for writer_id in writer_ids_in(value):
                if writer_id not in seen and known_writer(writer_id) is None:
                    seen.add(writer_id)
                    out.append((bucket, writer_id))
        return out

    def entries(self) -> list[JournalEntry]:
        """The run's records in server order (oldest first)."""
        entries: list[JournalEntry] = []
        writers = _WriterView()
        for bucket in sorted(self.values, key=int):
            entries.extend(parse_records(self.values[bucket], int(bucket), self.run_id, writers))
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
    index = [schema.text(v) for v in client.zrange(schema.INDEX_KEY, 0, -1)]
    entries: list[JournalEntry] = []
    for bucket in reversed(index):
        value = client.hget(schema.bucket_key(bucket), schema.GLOBAL_FIELD)
        if value is None:
            continue
        text = schema.text(value)
        _fetch_writers(client, bucket, writer_ids_in(text, with_run=True))
        found = parse_records(text, int(bucket), None, _WriterView(), with_run=True)
        entries[:0] = found
        if len(entries) >= limit:
            break
    entries.sort(key=lambda e: e.seq)
    return entries[-limit:]


@dataclasses.dataclass
class Window:
    """What the journal holds of a time window: every record, and Redis's counters samples."""

    entries: list[JournalEntry]
    #: :data:`schema.COUNTER_SAMPLE` by name, oldest first (the buckets' series).
    samples: list[dict[str, int]]


def read_window(client: Any, since_ms: int, scan_count: int = 500) -> Window:
    """Every record of every run written since ``since_ms`` (journal server ms), and the counters series.

    Walks the buckets that overlap the window with ``HSCAN`` (``scan_count`` fields a call), so a
    large journal is read in small steps instead of one long ``HGETALL``; the budget bounds it all.
    """
    index = [schema.text(v) for v in client.zrange(schema.INDEX_KEY, 0, -1)]
    starts = [int(b) for b in index]
    entries: list[JournalEntry] = []
    samples: list[dict[str, int]] = []
    for i, bucket in enumerate(index):
        if i + 1 < len(starts) and starts[i + 1] <= since_ms:
            continue  # this bucket ended before the window
        runs: dict[str, str] = {}
        for field, value in client.hscan_iter(schema.bucket_key(bucket), count=scan_count):
            name, text = schema.text(field), schema.text(value)
            if name.startswith(schema.RUN_FIELD_PREFIX):
                runs[schema.unescape(name[len(schema.RUN_FIELD_PREFIX):])] = text
            elif name.startswith(schema.WRITER_FIELD_PREFIX):
                remember_writer(name[len(schema.WRITER_FIELD_PREFIX):], text)
            elif name == schema.SERIES_FIELD:
                samples.extend(s for raw in text.split(schema.RS)
                               if (s := schema.parse_counter_sample(raw)) is not None and s["ms"] >= since_ms)
        for run_id, text in runs.items():
            entries.extend(e for e in parse_records(text, int(bucket), run_id, _WriterView()) if e.op_ms >= since_ms)
    entries.sort(key=lambda e: e.seq)
    samples.sort(key=lambda s: s["ms"])
    return Window(entries, samples)


def _fetch_writers(client: Any, bucket: str, writer_ids: Iterable[str]) -> None:
    unknown = [w for w in writer_ids if known_writer(w) is None]
    if not unknown:
        return
    values = client.hmget(schema.bucket_key(bucket), [schema.WRITER_FIELD_PREFIX + w for w in unknown])
    for writer_id, value in zip(unknown, values, strict=True):
        remember_writer(writer_id, schema.text(value) if value is not None else None)


def read_counts(client: Any) -> dict[str, int]:
    """Records written so far by operation, over the journal's life (all writers).

    ``misses_suppressed`` counts the rate-limited misses themselves, not their records.
    """
    raw = client.hgetall(schema.COUNTS_KEY) or {}
    out: dict[str, int] = {}
    for code, value in raw.items():
        op = schema.OPS_BY_CODE.get(schema.text(code))
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
    index = [schema.text(v) for v in client.zrange(schema.INDEX_KEY, 0, -1)]
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
    status = ({} if isinstance(status_raw, Exception)
              else {schema.text(k): schema.text(v) for k, v in (status_raw or {}).items()})
    return Usage(len(index), estimated, measured, int(index[0]) if index else None,
                 int(index[-1]) if index else None, status)
