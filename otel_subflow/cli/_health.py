"""``diagnose --redis-health``: latency, identity, clients, replication and a configuration review.

Each finding has a severity; the worst one decides the exit code (0 healthy,
1 warning, 2 critical) so the command can serve as a probe.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import redis

from otel_subflow._analysis.verdict import EVICTING_POLICIES, NEAR_MAXMEMORY
from otel_subflow._watch.events import check_events_flags, merge_flags
from otel_subflow.cli._common import percentile

SEVERITY_INFO = "info"
SEVERITY_WARNING = "warning"
SEVERITY_CRITICAL = "critical"
_RANK = {SEVERITY_INFO: 0, SEVERITY_WARNING: 1, SEVERITY_CRITICAL: 2}
#: used_memory / maxmemory at or above which the review calls memory critical.
CRITICAL_MAXMEMORY = 0.95
#: PING p99 above which the review warns (the monitor's default latency threshold).
SLOW_PING_MS = 500.0

INFO_SECTIONS = ("server", "clients", "memory", "persistence", "stats", "replication", "keyspace")


@dataclasses.dataclass
class Finding:
    """One result of the configuration review."""

    severity: str
    rule: str
    message: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def worst(findings: list[Finding]) -> str:
    """``healthy``, ``warning`` or ``critical``."""
    rank = max((_RANK[f.severity] for f in findings), default=0)
    return {0: "healthy", 1: "warning", 2: "critical"}[rank]


def exit_code(findings: list[Finding]) -> int:
    return max((_RANK[f.severity] for f in findings), default=0)


def ping_latency(client: redis.Redis, samples: int) -> dict[str, Any]:
    """PING ``samples`` times; p50 / p99 / max in milliseconds."""
    timings: list[float] = []
    for _ in range(max(1, samples)):
        started = time.perf_counter()
        client.ping()
        timings.append((time.perf_counter() - started) * 1000.0)
    return {
        "samples": len(timings),
        "min_ms": round(min(timings), 3),
        "p50_ms": round(percentile(timings, 50) or 0.0, 3),
        "p99_ms": round(percentile(timings, 99) or 0.0, 3),
        "max_ms": round(max(timings), 3),
    }


def read_info(client: redis.Redis, sections: tuple[str, ...] = INFO_SECTIONS) -> dict[str, Any]:
    """One multi-section INFO, parsed by redis-py."""
    return dict(client.execute_command("INFO", *sections))  # type: ignore[no-untyped-call]


def config_get(client: redis.Redis, name: str) -> str | None:
    """``CONFIG GET name``, or ``None`` where CONFIG is disabled (managed Redis, ACLs)."""
    try:
        value = client.config_get(name).get(name)
    except redis.ResponseError:
        return None
    return None if value is None else str(value)


def _int(info: dict[str, Any], name: str, default: int = 0) -> int:
    try:
        return int(info.get(name, default))
    except (TypeError, ValueError):
        return default


def review(info: dict[str, Any], config: dict[str, str | None], ping: dict[str, Any]) -> list[Finding]:
    """The configuration review: what makes state go missing, with a severity and a fix."""
    findings: list[Finding] = []
    policy = str(info.get("maxmemory_policy", config.get("maxmemory-policy") or ""))
    maxmemory = _int(info, "maxmemory")
    used = _int(info, "used_memory")
    evicted = _int(info, "evicted_keys")

    if policy in EVICTING_POLICIES:
        if maxmemory <= 0:
            findings.append(Finding(
                SEVERITY_INFO, "eviction_policy",
                f"maxmemory-policy {policy} evicts keys with a TTL, but maxmemory is 0 (no limit): "
                "it never applies.",
            ))
        else:
            severity = SEVERITY_CRITICAL if evicted > 0 else SEVERITY_WARNING
            findings.append(Finding(
                severity, "eviction_policy",
                f"maxmemory-policy {policy} evicts keys with a TTL (state keys have one); "
                f"{evicted} keys evicted since start.",
                "give Redis more memory (maxmemory), or keep the state on a Redis of its own: "
                "noeviction there turns evictions into OOM errors on writes, it does not make room",
            ))

    events = config.get("notify-keyspace-events")
    if events is None:
        findings.append(Finding(
            SEVERITY_INFO, "keyspace_events",
            "CONFIG GET is not allowed: could not check notify-keyspace-events.",
        ))
    else:
        check = check_events_flags(events)
        if not check.ok:
            findings.append(Finding(
                SEVERITY_WARNING, "keyspace_events",
                f"notify-keyspace-events={events!r} lacks {check.missing!r}: expired/evicted/del events are not "
                "published, so the watcher cannot record tombstones and verdicts fall back to counters.",
                f"CONFIG SET notify-keyspace-events {merge_flags(events)}",
            ))

    if persistence_on(info, config) is False:
        findings.append(Finding(
            SEVERITY_WARNING, "persistence_off",
            "Persistence is off (no RDB save points, no AOF): a restart loses every state key.",
            "CONFIG SET appendonly yes (or set save points)",
        ))

    if maxmemory > 0:
        ratio = used / maxmemory
        if ratio >= NEAR_MAXMEMORY:
            findings.append(Finding(
                SEVERITY_CRITICAL if ratio >= CRITICAL_MAXMEMORY else SEVERITY_WARNING,
                "memory_near_max",
                f"used_memory is {ratio:.0%} of maxmemory ({used} of {maxmemory} bytes).",
                "raise maxmemory or reduce state size/TTL",
            ))

    rejected = _int(info, "rejected_connections")
    if rejected > 0:
        findings.append(Finding(
            SEVERITY_WARNING, "rejected_connections",
            f"{rejected} connections were rejected (maxclients {config.get('maxclients') or '?'}).",
            "raise maxclients or fix connection leaks",
        ))

    if info.get("role") == "slave" and info.get("master_link_status") != "up":
        findings.append(Finding(
            SEVERITY_CRITICAL, "replication_link",
            f"This replica's link to its master is {info.get('master_link_status')}: reads here are stale.",
        ))
    elif info.get("role") == "slave":
        findings.append(Finding(
            SEVERITY_INFO, "replica",
            "The URL points at a replica: reads can miss states just written on the master (replica_lag).",
        ))

    p99 = float(ping.get("p99_ms") or 0.0)
    if p99 > SLOW_PING_MS:
        findings.append(Finding(
            SEVERITY_WARNING, "latency", f"PING p99 is {p99:.1f} ms (> {SLOW_PING_MS:.0f} ms).",
        ))
    return findings


def persistence_on(info: dict[str, Any], config: dict[str, str | None]) -> bool | None:
    """Whether a restart keeps the data; ``None`` when CONFIG is unavailable and AOF is off (RDB unknown)."""
    save = config.get("save")
    appendonly = config.get("appendonly")
    if save is None and appendonly is None:
        return True if _int(info, "aof_enabled") else None
    return bool((save or "").strip()) or appendonly == "yes" or bool(_int(info, "aof_enabled"))


def collect_health(client: redis.Redis, samples: int = 10) -> tuple[dict[str, Any], list[Finding]]:
    """The ``redis_health`` section and its findings."""
    ping = ping_latency(client, samples)
    info = read_info(client)
    config = {name: config_get(client, name)
              for name in ("maxmemory-policy", "notify-keyspace-events", "save", "appendonly", "maxclients")}
    findings = review(info, config, ping)
    replicas = []
    for index in range(_int(info, "connected_slaves")):
        raw = info.get(f"slave{index}")
        if isinstance(raw, dict):
            replicas.append({k: raw.get(k) for k in ("ip", "port", "state", "offset", "lag")})
    maxmemory = _int(info, "maxmemory")
    maxclients = config.get("maxclients")
    events = config.get("notify-keyspace-events")
    section: dict[str, Any] = {
        "status": worst(findings),
        "ping": ping,
        "server": {
            "redis_version": info.get("redis_version"),
            "run_id": info.get("run_id"),
            "mode": info.get("redis_mode"),
            "tcp_port": info.get("tcp_port"),
            "uptime_s": _int(info, "uptime_in_seconds"),
        },
        "role": info.get("role"),
        "clients": {
            "connected": _int(info, "connected_clients"),
            "blocked": _int(info, "blocked_clients"),
            "maxclients": int(maxclients) if maxclients is not None and maxclients.isdigit() else None,
            "rejected_connections": _int(info, "rejected_connections"),
        },
        "persistence": {
            "enabled": persistence_on(info, config),
            "save": config.get("save"),
            "appendonly": config.get("appendonly"),
            "rdb_last_bgsave_status": info.get("rdb_last_bgsave_status"),
            "rdb_changes_since_last_save": _int(info, "rdb_changes_since_last_save"),
        },
        "replication": {
            "role": info.get("role"),
            "connected_replicas": _int(info, "connected_slaves"),
            "replicas": replicas,
            "master": (
                {"host": info.get("master_host"), "port": info.get("master_port"),
                 "link_status": info.get("master_link_status")}
                if info.get("role") == "slave" else None
            ),
        },
        "memory": {
            "used_bytes": _int(info, "used_memory"),
            "maxmemory_bytes": maxmemory,
            "used_ratio": round(_int(info, "used_memory") / maxmemory, 4) if maxmemory else None,
            "maxmemory_policy": info.get("maxmemory_policy"),
        },
        "keyspace_events": {
            "value": events,
            "missing": check_events_flags(events).missing if events is not None else None,
        },
        "findings": [f.as_dict() for f in findings],
    }
    return section, findings
