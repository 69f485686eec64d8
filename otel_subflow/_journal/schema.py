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
#: A bucket's count of open miss markers.
MARKER_COUNT_FIELD = "m#"
#: A bucket's series of counters samples (``COUNTER_SAMPLE`` each, RS after each).
SERIES_FIELD = "s"

# The status hash, written by the write script and read by the analysis and the CLI: when memory
# was last checked (server ms), used and max memory, the policy, paused (1/0), the retention in
# ms, Redis's counters now and at the previous sample ("<ms> <evicted> <expired> <deletes>"), and
# how many buckets were found gone.
STATUS_AT = "at"
STATUS_USED = "used"
STATUS_MAX = "max"
STATUS_POLICY = "policy"
STATUS_PAUSED = "paused"
STATUS_TTL = "ttl"
STATUS_COUNTERS = "c"
STATUS_COUNTERS_PREVIOUS = "cp"
STATUS_LOST = "lost"
STATUS_SERIES_AT = "sa"

#: Estimated bytes a hash field costs on top of its name and value (dict entry, two
#: allocations, table slot), measured on redis-server 7.0: a 70-byte value in a field of
#: 16 bytes costs 167 bytes. The budget is enforced on these estimates.
FIELD_OVERHEAD = 80
#: Estimated bytes of an empty bucket (key, hash object, TTL entry, index member).
BUCKET_OVERHEAD = 300


#: Redis's counters as the write script samples them (at most once a second, on the state's own
#: server): server ms, evicted keys, expired keys, calls of deleting commands (what an init carries),
#: then used memory, and calls and microseconds of all commands (the buckets' series only: the
#: average command latency between two samples).
COUNTER_SAMPLE = ("ms", "evicted", "expired", "deletes", "used_memory", "calls", "usec")


def parse_counter_sample(text: str | None) -> dict[str, int] | None:
    """A counters sample by name; ``None`` unless it has at least the first four (older journals)."""
    raw = (text or "").split()
    if len(raw) < 4 or not all(v.isdigit() for v in raw):
        return None
    return dict(zip(COUNTER_SAMPLE, map(int, raw), strict=False))


def lua_names() -> dict[str, str]:
    """What the write script's ``@NAME@`` placeholders stand for, as Lua literals: the names above."""
    def lua(value: str) -> str:
        return "'" + value + "'"

    names_ = {
        "F_BYTES": BYTES_FIELD, "F_GLOBAL": GLOBAL_FIELD, "F_RUN": RUN_FIELD_PREFIX, "F_WRITER": WRITER_FIELD_PREFIX,
        "F_MARKER": MARKER_FIELD_PREFIX, "F_MARKER_COUNT": MARKER_COUNT_FIELD,
        "F_SERIES": SERIES_FIELD,
        "S_AT": STATUS_AT, "S_USED": STATUS_USED, "S_MAX": STATUS_MAX, "S_POLICY": STATUS_POLICY,
        "S_PAUSED": STATUS_PAUSED, "S_TTL": STATUS_TTL, "S_COUNTERS": STATUS_COUNTERS,
        "S_COUNTERS_PREVIOUS": STATUS_COUNTERS_PREVIOUS, "S_LOST": STATUS_LOST, "S_SERIES_AT": STATUS_SERIES_AT,
        "REPLY_PAUSED": "paused",
    }
    out = {name: lua(value) for name, value in names_.items()}
    for name, op in (("OP_INIT", OP_INIT), ("OP_MISS", OP_MISS), ("OP_EXPIRED", OP_EXPIRED),
                     ("OP_EVICTED", OP_EVICTED), ("OP_DEL", OP_DEL), ("OP_SUPPRESSED", OP_SUPPRESSED)):
        out[name] = lua(OP_CODES[op])
    out["FIELD_OVERHEAD"] = str(FIELD_OVERHEAD)
    out["BUCKET_OVERHEAD"] = str(BUCKET_OVERHEAD)
    out["DELETING_COMMANDS"] = ", ".join(lua(c) for c in DELETING_COMMANDS)
    return out


def text(value: object) -> str:
    """A reply value as text (redis-py gives bytes unless the client decodes)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


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
