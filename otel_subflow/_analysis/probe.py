"""The one look at Redis taken on a miss, and what it says.

:class:`Probe` lists the commands to put on a pipeline (leaving out those the
server refused before); :func:`parse_probe` turns the replies into :class:`Evidence`.
Executing the pipeline is the caller's job, so the sync and async paths share
everything but the ``await``.

Cost: one round trip to the reading endpoint (PTTL, one multi-section INFO, a
bounded SCAN of the run's keys, and the run's journal when it lives there), plus
at most one more when the journal lives elsewhere or the reader is a replica.
INFO comes back raw and only the fields used here are parsed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from otel_subflow._analysis.topology import REPLICA_LINE, ClusterNodeView, parse_cluster_nodes
from otel_subflow._journal.entries import JournalEntry
from otel_subflow._journal.schema import DELETING_COMMANDS, is_journal_key
from otel_subflow._redis.permissions import is_refusal

INFO_SECTIONS = ("server", "memory", "stats", "replication", "commandstats")

_INFO_FIELDS = frozenset({
    "run_id", "uptime_in_seconds", "server_time_usec", "redis_version",
    "used_memory", "maxmemory", "maxmemory_policy",
    "evicted_keys", "expired_keys",
    "role", "master_host", "master_port", "master_link_status",
    "master_replid2", "second_repl_offset", "connected_slaves",
    "cmdstat_flushdb", "cmdstat_flushall",
    *(f"cmdstat_{command}" for command in DELETING_COMMANDS),
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
        if sep and (name in _INFO_FIELDS or REPLICA_LINE.fullmatch(name)):
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
    #: Records of the run in the journal (all nodes).
    journal_total: int = 0
    #: The journal server's clock (ms) when the analysis read the run's records: an init
    #: written after it was not seen (the journal finds such races by itself).
    journal_seen_ms: int | None = None
    #: The journal's own state: paused (memory pressure), buckets lost (expired or evicted).
    journal_paused: bool = False
    journal_buckets_lost: int = 0
    #: The journal has a Redis of its own (``OTEL_SUBFLOW_JOURNAL_URL``).
    journal_dedicated: bool = False
    reader_db: int = 0
    reader_endpoint: str | None = None
    #: The server run_id this process saw before the miss (cached per connection).
    cached_server_run_id: str | None = None
    #: For a replica reader: does the key exist on its master? (None: not checked)
    master_has_key: bool | None = None
    master_endpoint: str | None = None
    errors: list[str] = dataclasses.field(default_factory=list)
    #: A keyspace watcher's heartbeat says it is subscribed (None: not read).
    watcher_alive: bool | None = None
    #: How long the analysis waited for a tombstone in flight, ms (None: it did not).
    tombstone_wait_ms: float | None = None
    #: Commands the servers refused us (ACL): the verdict names them.
    refused: list[str] = dataclasses.field(default_factory=list)
    #: A Redis Cluster reader: its node's view of the cluster (``CLUSTER NODES``), and the key's slot.
    cluster_nodes: list[ClusterNodeView] | None = None  # (see topology.py)
    key_slot: int | None = None
    #: The cluster client may send reads to replicas (``read_from_replicas``, a load-balancing strategy).
    reads_replicas: bool = False
    #: How long before the analysis the read started, ms (a decorated call; None: not known).
    read_age_ms: float | None = None

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

    def deletes(self) -> int | None:
        """Calls of the commands that delete keys (INFO commandstats): comparable with the ``deletes``
        an init's counters sample carries (the journal deletes its own buckets with HDEL)."""
        if "uptime_in_seconds" not in self.info:  # INFO not read
            return None
        total = 0
        for command in DELETING_COMMANDS:
            match = _CALLS.search(self.info.get(f"cmdstat_{command}", ""))
            if match:
                total += int(match.group(1))
        return total

    def flush_calls(self) -> int:
        total = 0
        for name in ("cmdstat_flushdb", "cmdstat_flushall"):
            match = _CALLS.search(self.info.get(name, ""))
            if match:
                total += int(match.group(1))
        return total


Call = tuple[str, tuple[Any, ...], dict[str, Any]]

#: Every command the analysis sends: what a verdict lacks when the server refuses it, and
#: the ACL rule that grants it (docs/acl.md lists them all as one ``ACL SETUSER``).
PROBE_COMMANDS: dict[str, tuple[str, str]] = {
    "PTTL": ("the key's own TTL is not seen", "+pttl"),
    "SCAN": ("keys spelled differently (key_mismatch) are not looked for", "+scan"),
    "INFO": ("server restarts, evictions, replicas and the server clock are not seen", "+info"),
    "EXISTS": ("a replica's master is not asked for the key (replica_lag)", "+exists"),
    "TIME": ("the journal's clock is not read", "+time"),
    "ZRANGE": ("the run's journal is not read", "+zrange ~{subflow:journal}:*"),
    "HMGET": ("the run's journal is not read", "+hmget ~{subflow:journal}:*"),
    "HGET": ("the run's journal is not read", "+hget ~{subflow:journal}:*"),
    "GET": ("the keyspace watcher's heartbeat is not read (no wait for tombstones in flight)",
            "+get ~{subflow:journal}:*"),
}


def command_of(call: Call) -> str:
    """The Redis command a queued call sends: ``("pttl", ...)`` -> ``"PTTL"``."""
    name, args, _ = call
    if name == "execute_command":
        return str(args[0]).upper()
    return name.upper()


class Probe:
    """The probe's commands for one miss, minus those the reader's server refused before.

    :attr:`calls` go first on the reader's pipeline and :attr:`info_call` last (after the
    journal's reads, so INFO's server time is no earlier than what they saw: an init
    written in between counts as seen, never as a race). Feed the replies to :meth:`parse`.
    """

    def __init__(self, key: str, run_id: str | None, scan_count: int, refused: Callable[[str], bool],
                 cluster: bool = False) -> None:
        self.calls: list[Call] = []
        if not refused("PTTL"):
            self.calls.append(("pttl", (key,), {}))
        if run_id and not refused("SCAN"):
            self.calls.append(("scan", (0,), {"match": run_scan_pattern(run_id), "count": scan_count}))
        if cluster and not refused("CLUSTER"):  # who serves the slot now, who failed (failover)
            self.calls.append(("execute_command", ("CLUSTER", "NODES"), {}))
        self.info_call: Call | None = None if refused("INFO") else ("execute_command", ("INFO", *INFO_SECTIONS), {})
        #: Commands skipped because the server refused them before.
        self.skipped = [c for c in ("PTTL", "SCAN", "INFO") if refused(c)]

    def parse(self, evidence: Evidence, replies: Sequence[Any], info: Any = None) -> None:
        """Fill ``evidence`` from the replies to :attr:`calls` and to :attr:`info_call`."""
        by_command = {command_of(call): reply for call, reply in zip(self.calls, replies, strict=False)}
        if self.info_call is not None:
            by_command["INFO"] = info
        parse_probe(evidence, by_command)


def parse_probe(evidence: Evidence, replies: Mapping[str, Any]) -> None:
    """Fill ``evidence`` from the probe's replies by command (errors are kept as evidence, not raised)."""
    for command, reply in replies.items():
        if isinstance(reply, Exception) and not is_refusal(reply):  # refusals: Evidence.refused
            evidence.errors.append(f"{command}: {type(reply).__name__}")
    pttl = replies.get("PTTL")
    if pttl is not None and not isinstance(pttl, Exception):
        evidence.pttl_ms = int(pttl)
    info = replies.get("INFO")
    if info is not None and not isinstance(info, Exception):
        evidence.info = parse_info(info)
    nodes = replies.get("CLUSTER")
    if nodes is not None and not isinstance(nodes, Exception):
        evidence.cluster_nodes = parse_cluster_nodes(nodes)
    scan = replies.get("SCAN")
    if scan is not None and not isinstance(scan, Exception):
        cursor, keys = scan
        evidence.scan_complete = int(cursor) == 0
        for raw in keys:
            candidate = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            if is_journal_key(candidate):
                continue
            evidence.run_keys_seen += 1
            if near_identical(evidence.key, candidate):
                evidence.near_keys.append(candidate)
