"""What the journal stores, and how: the one home of its key names, operations and record layout.

The journal is a ring of time buckets on a Redis server. Each bucket is one hash:

- ``r:<run id>``: that run's records in the bucket, appended in server order;
- ``w:<writer id>``: who wrote them (host, pid, endpoint, db, server run id), once per bucket;
- ``m:<run id><US><node id><US><key>``: a miss that a later init may answer (cross-process races);
- ``g``: a capped copy of the latest records of every run (``diagnose --recent-operations``);
- ``m#``: how many markers the bucket holds (an init looks for one only where there are some);
- ``#``: the bucket's estimated size in bytes, which the memory budget is enforced on.

Key names are built from bucket start times only, and every run field carries a
prefix, so no run id, node id or state key can name (or collide with) the index, a
bucket, a marker or another run's records. Records are packed text: fields joined by
the ASCII unit separator, each record ended by the record separator; ids are escaped so
neither separator can occur inside a field. The Lua scripts (``store.py``) take the
codes and separators from this module.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from otel_subflow import names

OP_INIT = "init"
OP_MISS = "miss"
OP_RACE = "race"
OP_EXPIRED = "expired"
OP_EVICTED = "evicted"
OP_DEL = "del"
OP_GAP = "watcher_gap"
OP_SUPPRESSED = "misses_suppressed"
TOMBSTONE_OPS = (OP_EXPIRED, OP_EVICTED, OP_DEL)

#: Commands whose calls delete keys: their calls, summed from INFO commandstats, are the "deletes"
#: counter an init is compared by. The EXPIRE family is left out: it deletes only when given a past
#: time, and counting every TTL set (the journal's own included) would make the counter useless.
DELETING_COMMANDS = ("del", "unlink", "getdel", "flushdb", "flushall", "rename", "renamenx", "move", "swapdb")

#: One character per operation in the stored records.
OP_CODES: Mapping[str, str] = {
    OP_INIT: "i",
    OP_MISS: "m",
    OP_RACE: "r",
    OP_EXPIRED: "x",
    OP_EVICTED: "e",
    OP_DEL: "d",
    OP_GAP: "g",
    OP_SUPPRESSED: "s",
}
OPS_BY_CODE: Mapping[str, str] = {code: op for op, code in OP_CODES.items()}

#: Operation-specific fields stored after the common ones, in this order.
EXTRA_FIELDS: Mapping[str, tuple[str, ...]] = {
    OP_INIT: ("counters",),  # added by the write script: "<ms> <evicted> <expired> <deletes>"
    OP_MISS: ("cause", "confidence"),
    OP_RACE: ("get_ids", "init_ids", "detected_by", "previous_cause"),
    OP_EXPIRED: ("db", "source"),
    OP_EVICTED: ("db", "source"),
    OP_DEL: ("db", "source"),
    OP_GAP: ("gap_start_ms", "gap_end_ms", "reason"),
    OP_SUPPRESSED: ("count",),
}

US = "\x1f"  # between the fields of a record
RS = "\x1e"  # after each record
RUN_MARK = "\x01"  # stands for the run id inside a stored key
NODE_MARK = "\x02"  # stands for the node id inside a stored key

# All journal keys share one hash tag, so a cluster keeps them in one slot and the
# write script may touch any of them.
PREFIX = names.JOURNAL_KEY_PREFIX
INDEX_KEY = PREFIX + "idx"
STATUS_KEY = PREFIX + "status"
COUNTS_KEY = PREFIX + "counts"
BUCKET_PREFIX = PREFIX + "b:"

RUN_FIELD_PREFIX = "r:"
WRITER_FIELD_PREFIX = "w:"
MARKER_FIELD_PREFIX = "m:"
GLOBAL_FIELD = "g"
BYTES_FIELD = "#"

#: Estimated bytes a hash field costs on top of its name and value (dict entry, two
#: allocations, table slot), measured on redis-server 7.0: a 70-byte value in a field of
#: 16 bytes costs 167 bytes. The budget is enforced on these estimates.
FIELD_OVERHEAD = 80
#: Estimated bytes of an empty bucket (key, hash object, TTL entry, index member).
BUCKET_OVERHEAD = 300


def bucket_key(start_ms: int | str) -> str:
    return f"{BUCKET_PREFIX}{start_ms}"


def is_journal_key(key: str) -> bool:
    """True for keys of our own namespace (a state key must never be one of them)."""
    return key.startswith(PREFIX)


_ESCAPES = {"\\": "\\\\", RS: "\\R", US: "\\U", RUN_MARK: "\\1", NODE_MARK: "\\2"}
_NEEDS_ESCAPE = re.compile("[\\\\\x1e\x1f\x01\x02]")
_UNESCAPES = {"\\": "\\", "R": RS, "U": US, "1": RUN_MARK, "2": NODE_MARK}
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def escape(text: str) -> str:
    """``text`` with no separator or mark left in it (a reversible, char-by-char map)."""
    if _NEEDS_ESCAPE.search(text) is None:
        return text
    return _NEEDS_ESCAPE.sub(lambda m: _ESCAPES[m.group(0)], text)


def unescape(text: str) -> str:
    if "\\" not in text:
        return text
    return _ESCAPED.sub(lambda m: _UNESCAPES.get(m.group(1), m.group(1)), text)


def run_field(run_id: str) -> str:
    return RUN_FIELD_PREFIX + escape(run_id)


def compact_key(key: str, run_id: str | None, node_id: str | None) -> str:
    """The key as stored: escaped, with the run and node ids replaced by one-byte marks.

    A default-template key costs 18 bytes instead of ~40, and the same key of the same
    run and node always compacts to the same string (the race check compares them).
    """
    out = escape(key)
    if run_id:
        out = out.replace(escape(run_id), RUN_MARK)
    if node_id:
        out = out.replace(escape(node_id), NODE_MARK)
    return out


def expand_key(stored: str, run_id: str | None, node_id: str | None) -> str:
    out = stored
    if node_id:
        out = out.replace(NODE_MARK, escape(node_id))
    if run_id:
        out = out.replace(RUN_MARK, escape(run_id))
    return unescape(out)


def pack_ids(trace_id: int, span_id: int) -> str:
    """Trace and span id in 32 characters (base64url of their 24 bytes); '' when invalid."""
    if not trace_id or not span_id:
        return ""
    raw = trace_id.to_bytes(16, "big") + span_id.to_bytes(8, "big")
    return base64.urlsafe_b64encode(raw).decode("ascii")


def unpack_ids(packed: str) -> tuple[str, str]:
    """(trace id hex, span id hex), or ('', '') for an empty or damaged value."""
    if len(packed) != 32:
        return "", ""
    try:
        raw = base64.urlsafe_b64decode(packed)
    except (ValueError, TypeError):
        return "", ""
    return raw[:16].hex(), raw[16:].hex()


@dataclasses.dataclass(frozen=True)
class Writer:
    """Who writes records: one process talking to one Redis endpoint (db, server run)."""

    host: str
    pid: int
    endpoint: str | None
    db: int | None
    server_run_id: str | None

    def info(self) -> str:
        data: dict[str, Any] = {"h": self.host, "p": self.pid}
        if self.endpoint is not None:
            data["e"] = self.endpoint
        if self.db is not None:
            data["d"] = self.db
        if self.server_run_id:
            data["s"] = self.server_run_id
        return json.dumps(data, separators=(",", ":"), ensure_ascii=True)

    @property
    def id(self) -> str:
        """Content-addressed: the same writer always has the same 8-character id."""
        digest = hashlib.blake2b(self.info().encode("ascii"), digest_size=6).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii")

    @classmethod
    def parse(cls, info: str) -> Writer | None:
        try:
            data = json.loads(info)
            return cls(str(data["h"]), int(data["p"]), data.get("e"), data.get("d"), data.get("s"))
        except (ValueError, KeyError, TypeError):
            return None

    def fields(self) -> dict[str, str]:
        out = {"host": self.host, "pid": str(self.pid)}
        if self.endpoint is not None:
            out["endpoint"] = self.endpoint
        if self.db is not None:
            out["db"] = str(self.db)
        if self.server_run_id:
            out["server_run_id"] = self.server_run_id
        return out


def pack_body(op: str, *, lag_ms: int, node_id: str | None, ckey: str, writer_id: str, ttl_ms: int | None,
              ids: str, extra: Sequence[str] = ()) -> str:
    """A record without its arrival time (the write script prepends the server's)."""
    parts = [str(max(0, lag_ms)), OP_CODES[op], escape(node_id) if node_id is not None else "", ckey, writer_id,
             "" if ttl_ms is None else str(ttl_ms), ids]
    parts.extend(escape(value) for value in extra)
    return US.join(parts)


@dataclasses.dataclass
class JournalEntry:
    """One journal record, ordered by the server time it reached the journal.

    ``arrival_ms`` is the journal server's clock when the record was written;
    ``op_ms`` the server-clock time of the operation itself (arrival less the time
    the record waited in its writer's queue). ``fields`` are the record's values by
    name (``host``, ``node_id``, ``key``, ``trace_id``, ``ttl_ms``, ``cause`` ...).
    """

    arrival_ms: int
    position: int
    fields: dict[str, str]

    @property
    def stream_id(self) -> str:
        """A sortable id: ``<arrival ms>-<position>``."""
        return f"{self.arrival_ms}-{self.position}"

    @property
    def ms(self) -> int:
        return self.arrival_ms

    @property
    def op_ms(self) -> int:
        lag = self.fields.get("lag_ms", "0")
        return self.arrival_ms - (int(lag) if lag.isdigit() else 0)

    @property
    def seq(self) -> tuple[int, int]:
        return self.arrival_ms, self.position

    @property
    def op(self) -> str:
        return self.fields.get("op", "")


def parse_records(value: str, bucket_start: int, run_id: str | None, writers: Mapping[str, Writer | None],
                  *, with_run: bool = False, position: int = 0) -> list[JournalEntry]:
    """The records of one stored value (a run field, or the global field with ``with_run``)."""
    entries: list[JournalEntry] = []
    for raw in value.split(RS):
        if not raw:
            continue
        parts = raw.split(US)
        if with_run:
            if len(parts) < 2:
                continue
            record_run: str | None = unescape(parts.pop(1))
        else:
            record_run = run_id
        entry = _parse_one(parts, bucket_start, record_run, writers, position)
        if entry is not None:
            entries.append(entry)
            position += 1
    return entries


def _parse_one(parts: list[str], bucket_start: int, run_id: str | None, writers: Mapping[str, Writer | None],
               position: int) -> JournalEntry | None:
    if len(parts) < 8:
        return None
    offset, lag, code, node, ckey, writer_id, ttl, ids = parts[:8]
    op = OPS_BY_CODE.get(code)
    if op is None:
        return None
    try:
        arrival = bucket_start + int(offset)
    except ValueError:
        return None
    node_id = unescape(node) if node else None
    fields: dict[str, str] = {"op": op, "lag_ms": lag}
    if op == OP_RACE:  # a race is a read before the init, by definition
        fields["cause"], fields["confidence"] = names.CAUSE_GET_BEFORE_INIT, names.CONFIDENCE_DEFINITIVE
    if run_id is not None:
        fields["run_id"] = run_id
    if node_id is not None:
        fields["node_id"] = node_id
    if ckey:
        fields["key"] = expand_key(ckey, run_id, node_id)
    writer = writers.get(writer_id)
    if writer is not None:
        fields.update(writer.fields())
    elif writer_id:
        fields["writer"] = writer_id
    if ttl:
        fields["ttl_ms"] = ttl
    trace_id, span_id = unpack_ids(ids)
    if trace_id:
        fields["trace_id"], fields["span_id"] = trace_id, span_id
    for name, raw in zip(EXTRA_FIELDS[op], parts[8:], strict=False):
        value = unescape(raw)
        if name.endswith("_ids"):
            role = name[: -len("_ids")]
            t, s = unpack_ids(value)
            if t:
                fields[f"{role}_trace_id"], fields[f"{role}_span_id"] = t, s
        elif value:
            fields[name] = value
    return JournalEntry(arrival, position, fields)


def writer_ids_in(value: str, *, with_run: bool = False) -> set[str]:
    """The writer ids a stored value refers to (to fetch the ones not known yet)."""
    at = 6 if with_run else 5
    out: set[str] = set()
    for raw in value.split(RS):
        parts = raw.split(US, at + 1)
        if len(parts) > at and parts[at]:
            out.add(parts[at])
    return out
