"""The journal's write script: one ``EVALSHA`` per batch of records, its parameters and its reply.

The script (:data:`WRITE_SCRIPT`):

1. checks memory pressure with ``INFO memory`` at most once a second for the whole
   fleet (the result is shared through the status hash) and, near maxmemory, writes
   nothing but tombstones and shrinks the journal instead;
2. picks the current bucket, or starts a new one when the current one is old or big;
3. appends each record to its run's field, and a copy to the bucket's capped global field;
4. finds cross-process races (an init answering an earlier miss, or a miss whose
   analysis did not see an init that had already been written);
5. deletes the oldest buckets until the journal is within its byte budget.

Field names, key names and sizes come from ``schema.py``; reads are in ``store.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import re
from collections.abc import Iterable, Sequence
from typing import Any

from otel_subflow._config import SubflowConfig
from otel_subflow._journal import schema
from otel_subflow._journal.schema import Writer


def _load(name: str) -> str:
    """A Lua script of this package, its ``@NAME@`` placeholders filled from :func:`schema.lua_names`."""
    text = importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    return re.sub(r"@([A-Z_]+)@", lambda m: schema.lua_names()[m.group(1)], text)


# KEYS: index, status, counts. ARGV[1]: bucket key prefix; ARGV[2]: parameters (numbers,
# space separated, see WriteParams); ARGV[3]: writers ("id US info RS" ...); then four
# arguments per record: escaped run id ('' for none), compact key, the server time the
# miss's analysis read the journal at ('' for no race check), and the record body.
# Returns {status, total bytes, buckets, trimmed, lost buckets, used_memory, maxmemory,
# policy, budget, then (record number, 'init'|'miss', value) per race found}.
WRITE_SCRIPT = _load("write.lua")
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
    #: How often a counters sample also goes into the bucket's series (``diagnose --patterns``); 0: never.
    series_every_ms: int = 10_000

    def encode(self, max_ttl_ms: int) -> str:
        values = (self.budget_pct, self.budget_fixed_bytes, self.rotate_divisor, self.min_retention_ms,
                  self.max_retention_ms, max_ttl_ms, self.max_buckets, self.global_cap_bytes, self.run_cap_bytes,
                  self.marker_window_ms, self.memory_check_ms, self.pressure_pct, self.resume_pct,
                  int(self.sample_counters), self.series_every_ms)
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
        head = [schema.text(v) for v in reply[:9]]
        races = []
        rest = list(reply[9:])
        for k in range(0, len(rest) - 2, 3):
            races.append((int(rest[k]), schema.text(rest[k + 1]), schema.text(rest[k + 2])))
        return cls(head[0], int(head[1]), int(head[2]), int(head[3]), int(head[4]), int(head[5]), int(head[6]),
                   head[7], int(head[8]), races)


# The write script's tuning, derived from the settings (see SubflowConfig).
_ROTATE_DIVISOR = 16
_MAX_BUCKETS = 32
_GLOBAL_CAP_BYTES = 64 * 1024
_RUN_CAP_BYTES = 1024 * 1024
_MIN_RETENTION_MS = 10 * 60 * 1000
_MEMORY_CHECK_MS = 1000
_RESUME_MARGIN_PCT = 5.0


def budget_pct(config: SubflowConfig, dedicated: bool) -> float:
    """The journal's budget in percent of maxmemory: configured, else 2 (50 on a Redis of its own)."""
    if config.journal_budget_pct is not None:
        return config.journal_budget_pct
    return 50.0 if dedicated else 2.0


def budget_bytes(config: SubflowConfig, dedicated: bool, maxmemory: int) -> int:
    """The budget the write script enforces on a server with this ``maxmemory`` (0: no limit)."""
    if maxmemory > 0:
        return int(maxmemory * budget_pct(config, dedicated) / 100)
    return int(config.journal_budget_mb * 1024 * 1024)


def write_params(config: SubflowConfig, dedicated: bool, counters: bool | None = None) -> WriteParams:
    """The parameters the writer sends with each batch, from the settings."""
    pct = budget_pct(config, dedicated)
    pressure = config.journal_pressure_pct
    return WriteParams(
        budget_pct=pct,
        budget_fixed_bytes=int(config.journal_budget_mb * 1024 * 1024),
        rotate_divisor=_ROTATE_DIVISOR,
        min_retention_ms=_MIN_RETENTION_MS,
        max_retention_ms=config.journal_ttl_s * 1000,
        max_buckets=_MAX_BUCKETS,
        global_cap_bytes=_GLOBAL_CAP_BYTES,
        run_cap_bytes=_RUN_CAP_BYTES,
        marker_window_ms=config.miss_marker_ttl_ms,
        memory_check_ms=_MEMORY_CHECK_MS,
        pressure_pct=pressure,
        resume_pct=max(1.0, pressure - _RESUME_MARGIN_PCT),
        sample_counters=not dedicated if counters is None else counters,
        series_every_ms=int(config.journal_series_s * 1000),
    )
