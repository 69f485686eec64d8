"""What to change so a state stops going missing, and by how much: remediations with computed numbers.

Pure functions, next to the verdict they answer: a :class:`~otel_subflow._analysis.verdict.Verdict`,
the reader's :class:`~otel_subflow._analysis.probe.Evidence`, journal records (the run's and the
recent window's) and what the state server says of itself (:class:`ServerFacts`) in, a list of
:class:`Remediation` out. No I/O: ``cli/_remediation.py`` gathers the inputs. Every number comes
from those inputs; the only constants are the stated margins below.

Each remediation has a stable :attr:`~Remediation.action` id (one per kind of fix) and
:attr:`~Remediation.prevents`: whether it would have prevented this miss (``None``: the evidence
cannot tell). Summed over many misses, that ranks the fixes (:func:`rank_actions`)::

    fixes = remediate(verdict, evidence, journal_entries, server_facts)
    ranking = rank_actions([fixes, ...])   # [("raise_ttl", 12), ("raise_maxmemory", 3), ...]
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from otel_subflow import names
from otel_subflow._analysis.probe import Evidence
from otel_subflow._analysis.verdict import NEAR_MAXMEMORY, Verdict
from otel_subflow._journal.entries import JournalEntry
from otel_subflow._journal.schema import OP_INIT, OP_MISS

# -- the actions (stable ids: the JSON's ``action``, and what a ranking counts) ---------------
RAISE_TTL = "raise_ttl"
RAISE_MAXMEMORY = "raise_maxmemory"
OWN_NOEVICTION_REDIS = "own_noeviction_redis"
VOLATILE_TTL_POLICY = "volatile_ttl_policy"
ALIGN_ENDPOINT = "align_endpoint"
ALIGN_KEY_SPELLING = "align_key_spelling"
AWAIT_INIT_BEFORE_DISPATCH = "await_init_before_dispatch"
ENABLE_AOF = "enable_aof"
RDB_SAVE_POINTS = "rdb_save_points"
REPLICATE_AND_WAIT = "min_replicas_and_wait"
FIND_DELETER = "find_deleter"
INITIALISE_NODE = "initialise_node"
READ_FROM_MASTER = "read_from_master"
ENABLE_KEYSPACE_EVENTS = "enable_keyspace_events"

#: The fixes that would have prevented a miss of each cause, with no more than the cause known (what
#: ``diagnose --patterns`` ranks over a window; one incident's :func:`remediate` says more).
ACTIONS_BY_CAUSE: Mapping[str, tuple[str, ...]] = {
    names.CAUSE_EXPIRED: (RAISE_TTL,),
    names.CAUSE_EVICTED: (RAISE_MAXMEMORY, OWN_NOEVICTION_REDIS, VOLATILE_TTL_POLICY),
    names.CAUSE_GET_BEFORE_INIT: (AWAIT_INIT_BEFORE_DISPATCH,),
    names.CAUSE_KEY_MISMATCH: (ALIGN_KEY_SPELLING,),
    names.CAUSE_WRONG_ENDPOINT: (ALIGN_ENDPOINT,),
    names.CAUSE_SERVER_RESTART: (ENABLE_AOF,),
    names.CAUSE_REPLICA_LAG: (READ_FROM_MASTER, REPLICATE_AND_WAIT),
    names.CAUSE_FAILOVER: (REPLICATE_AND_WAIT,),
    names.CAUSE_DELETED: (FIND_DELETER,),
    names.CAUSE_NEVER_WRITTEN: (INITIALISE_NODE,),
}
#: Each action in a few words (a ranking's table; :func:`remediate` gives the numbers).
ACTION_SUMMARY: Mapping[str, str] = {
    RAISE_TTL: "a state TTL longer than the longest init-to-read gap",
    RAISE_MAXMEMORY: "more maxmemory, so the state is not evicted",
    OWN_NOEVICTION_REDIS: "the state on a Redis of its own with maxmemory-policy noeviction",
    VOLATILE_TTL_POLICY: "a volatile-* policy, with TTL'd state and other data without a TTL",
    ALIGN_ENDPOINT: "the same Redis URL and db for every writer and reader",
    ALIGN_KEY_SPELLING: "build the state key in one place for writers and readers",
    AWAIT_INIT_BEFORE_DISPATCH: "start a node's readers only after its init returned",
    ENABLE_AOF: "appendonly yes: acknowledged writes survive a restart",
    RDB_SAVE_POINTS: "RDB save points (a restart loses the writes since the last save)",
    REPLICATE_AND_WAIT: "min-replicas-to-write and WAIT after the init",
    FIND_DELETER: "find what deletes state keys before their readers ran",
    INITIALISE_NODE: "make sure the workflow writes the node's state at all",
    READ_FROM_MASTER: "read state from the master",
    ENABLE_KEYSPACE_EVENTS: "notify-keyspace-events Exeg, so deletions and expiries are seen",
}

#: The margin on the longest observed gap (a TTL, a retry window): x1.5, rounded up to 2 significant digits.
GAP_MARGIN = 1.5
#: Size memory so the server sits below the fill at which the verdict calls evictions plausible.
MEMORY_HEADROOM = 1.0 / NEAR_MAXMEMORY
#: ``appendfsync everysec`` fsyncs once a second: a crash loses at most about this much of the latest writes.
EVERYSEC_LOSS_MS = 1000
#: The config a remediation reads (``CONFIG GET``; each may be refused).
CONFIG_NAMES = ("appendonly", "appendfsync", "save", "min-replicas-to-write", "min-replicas-max-lag",
                "maxmemory-policy", "notify-keyspace-events")
_MIB = 1024 * 1024
_CALLS = re.compile(r"calls=(\d+)")


@dataclasses.dataclass(frozen=True)
class Remediation:
    """One fix for one miss: what to do, why (the numbers in words, margins stated), and the numbers."""

    action: str
    cause: str
    why: str
    #: Would this fix have prevented the miss? ``None``: the evidence cannot tell.
    prevents: bool | None
    numbers: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ServerFacts:
    """What the state server says of itself: INFO (parsed by redis-py, or raw strings), CONFIG GET, state sizes."""

    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: ``CONFIG GET`` by name (:data:`CONFIG_NAMES`); empty when refused.
    config: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Why CONFIG GET could not be read (an ACL, a renamed command), or ``None``.
    config_refused: str | None = None
    #: MEMORY USAGE of sampled state keys: how many were weighed and their mean size.
    state_keys_sampled: int = 0
    state_key_bytes: float | None = None
    #: State keys counted by a bounded SCAN (a lower bound when not ``state_keys_complete``).
    state_keys_seen: int = 0
    state_keys_complete: bool = True

    def info_int(self, name: str) -> int | None:
        try:
            return int(self.info[name])
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def time_ms(self) -> int | None:
        usec = self.info_int("server_time_usec")
        return None if usec is None else usec // 1000

    def keyspace(self, db: int) -> dict[str, int]:
        """``keys``, ``expires``, ``avg_ttl`` of one db (INFO keyspace)."""
        raw = self.info.get(f"db{db}")
        if isinstance(raw, str):
            raw = dict(part.split("=", 1) for part in raw.split(",") if "=" in part)
        if not isinstance(raw, Mapping):
            return {}
        return {k: int(v) for k, v in raw.items() if str(v).lstrip("-").isdigit()}

    def total_keys(self) -> int:
        return sum(self.keyspace(int(name[2:])).get("keys", 0)
                   for name in self.info if name.startswith("db") and name[2:].isdigit())

    def calls(self, command: str) -> int | None:
        raw = self.info.get(f"cmdstat_{command}")
        if isinstance(raw, Mapping):
            return int(raw.get("calls", 0))
        match = _CALLS.search(str(raw or ""))
        return int(match.group(1)) if match else None


# -- small arithmetic, shared by the rules -------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (``None`` for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * pct / 100)) - 1]


def round_up(value: float) -> int:
    """Up to two significant digits: 370.5 -> 380, 1234 -> 1300."""
    whole = math.ceil(value)
    if whole <= 0:
        return 0
    step: int = 10 ** max(0, len(str(whole)) - 2)
    return math.ceil(whole / step) * step


def with_margin(gap_ms: float) -> int:
    """A TTL or a window that covers ``gap_ms``: x :data:`GAP_MARGIN`, rounded up."""
    return round_up(gap_ms * GAP_MARGIN)


def mib_up(size: float) -> int:
    """Bytes rounded up to a whole MiB (a maxmemory people can type)."""
    return max(1, math.ceil(size / _MIB)) * _MIB


def gap_stats(gaps: Sequence[int]) -> dict[str, Any]:
    return {"samples": len(gaps), "p50_ms": percentile(gaps, 50), "p99_ms": percentile(gaps, 99),
            "max_ms": max(gaps) if gaps else None}


def merge_entries(*sources: Iterable[JournalEntry]) -> list[JournalEntry]:
    """Journal records from several reads (the run's, the recent window), each once, in server order."""
    seen: dict[tuple[Any, ...], JournalEntry] = {}
    for source in sources:
        for e in source:
            seen.setdefault((e.run_id, e.op, e.key, e.arrival_ms, e.span_id, e.host, e.fields.get("pid")), e)
    return sorted(seen.values(), key=order)


def order(entry: JournalEntry) -> tuple[int, int, int]:
    """Operation order: the server time of the operation itself (a record may reach the journal late)."""
    return entry.op_ms, *entry.seq


def init_to_read_gaps(entries: Sequence[JournalEntry], node_id: str | None) -> list[int]:
    """For each journalled miss of ``node_id`` (any run), ms since the last init of that key before it.

    Reads that found their state are not journalled: these are the reads that missed."""
    last_init: dict[tuple[str | None, str | None], JournalEntry] = {}
    gaps: list[int] = []
    for e in entries:
        if e.node_id != node_id:
            continue
        if e.op == OP_INIT:
            last_init[(e.run_id, e.key)] = e
        elif e.op == OP_MISS and (e.run_id, e.key) in last_init:
            gaps.append(max(0, e.op_ms - last_init[(e.run_id, e.key)].op_ms))
    return gaps


def read_to_init_gaps(entries: Sequence[JournalEntry], node_id: str | None) -> list[int]:
    """For each key of ``node_id`` read before any init of it, ms from that first miss to the init after it."""
    initialised: set[tuple[str | None, str | None]] = set()
    pending: dict[tuple[str | None, str | None], JournalEntry] = {}
    gaps: list[int] = []
    for e in entries:
        if e.node_id != node_id:
            continue
        key = (e.run_id, e.key)
        if e.op == OP_MISS and key not in initialised:
            pending.setdefault(key, e)
        elif e.op == OP_INIT:
            initialised.add(key)
            if key in pending:
                gaps.append(max(0, e.op_ms - pending.pop(key).op_ms))
    return gaps


def rank_actions(per_miss: Iterable[Sequence[Remediation]]) -> list[tuple[str, int]]:
    """Actions by how many misses they would have prevented, most first (ties by action id)."""
    counts: Counter[str] = Counter()
    for fixes in per_miss:
        counts.update({r.action for r in fixes if r.prevents})
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def fmt_ms(value: float | None) -> str:
    """Milliseconds for a sentence (``?`` when unknown)."""
    return "?" if value is None else f"{value:,.0f} ms"


def fmt_bytes(value: float | None) -> str:
    """Bytes for a sentence, in binary units (``?`` when unknown)."""
    if value is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def party_of(e: JournalEntry) -> dict[str, Any]:
    """Who wrote a record, and where its process talks to."""
    return {"host": e.host, "endpoint": e.endpoint, "db": int(e.db) if e.db and e.db.isdigit() else None,
            "server_run_id": e.server_run_id}


def parties(entries: list[JournalEntry]) -> list[dict[str, Any]]:
    """The distinct writers of ``entries``, in order."""
    out: list[dict[str, Any]] = []
    for e in entries:
        party = party_of(e)
        if party not in out:
            out.append(party)
    return out


def where(party: dict[str, Any]) -> str:
    """``host -> endpoint db N``."""
    return f"{party['host'] or '?'} -> {party['endpoint'] or '?'} db {party['db'] if party['db'] is not None else '?'}"


# -- the rules -----------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One miss and everything known about it: what the rules read."""

    verdict: Verdict
    evidence: Evidence
    entries: list[JournalEntry]
    server: ServerFacts

    @property
    def key(self) -> str:
        return self.evidence.key

    def said(self, name: str) -> Any:
        """A field of the verdict's evidence (``None`` when absent)."""
        return self.verdict.evidence.get(name)

    def of_key(self, op: str, key: str | None = None) -> list[JournalEntry]:
        wanted = self.key if key is None else key
        return [e for e in self.entries if e.op == op and e.key == wanted]

    def last_init(self) -> JournalEntry | None:
        inits = self.of_key(OP_INIT)
        return inits[-1] if inits else None

    def now_ms(self) -> int | None:
        return self.evidence.server_time_ms or self.server.time_ms

    def fix(self, action: str, why: str, prevents: bool | None, **numbers: Any) -> Remediation:
        return Remediation(action, self.verdict.cause, why, prevents, numbers)


Rule = Callable[[Case], list[Remediation]]


def remediate(verdict: Verdict, evidence: Evidence, journal: Sequence[JournalEntry],
              server: ServerFacts) -> list[Remediation]:
    """The fixes for one missing state, most direct first; ``[]`` when the evidence supports none.

    ``journal``: records of the run and of the recent window (merged with ``evidence.journal``).
    """
    from otel_subflow._analysis.remedies import RULES  # the rules build on this module's helpers

    rule = RULES.get(verdict.cause)
    if rule is None:
        return []
    return rule(Case(verdict, evidence, merge_entries(evidence.journal, journal), server))


__all__ = [
    "ALIGN_ENDPOINT", "ALIGN_KEY_SPELLING", "AWAIT_INIT_BEFORE_DISPATCH", "CONFIG_NAMES", "ENABLE_AOF",
    "ENABLE_KEYSPACE_EVENTS", "FIND_DELETER", "INITIALISE_NODE", "OWN_NOEVICTION_REDIS", "RAISE_MAXMEMORY",
    "RAISE_TTL", "RDB_SAVE_POINTS", "READ_FROM_MASTER", "REPLICATE_AND_WAIT", "VOLATILE_TTL_POLICY", "Case",
    "Remediation", "ServerFacts", "fmt_bytes", "fmt_ms", "gap_stats", "init_to_read_gaps", "merge_entries", "mib_up",
    "order", "parties", "party_of", "percentile", "rank_actions", "read_to_init_gaps", "remediate", "round_up",
    "where", "with_margin",
]
