"""``diagnose --memory-analysis``: memory against maxmemory, eviction and expiry rates, the state keys.

Rates come from two INFO samples a short interval apart (counters since start
say nothing about *now*). The state keys are found with a bounded SCAN on the
key template's pattern and weighed with MEMORY USAGE in one pipeline. The
journal's own footprint is shown beside them, against its budget.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from otel_subflow import names
from otel_subflow._analysis.probe import glob_escape
from otel_subflow._config import SubflowConfig
from otel_subflow._journal import store
from otel_subflow._journal.script import budget_bytes
from otel_subflow._redis.permissions import is_refusal
from otel_subflow.cli._health import read_info

_SAMPLE_SECTIONS = ("memory", "stats", "keyspace")


def template_pattern(template: str) -> str:
    """A SCAN MATCH pattern for keys built from ``template`` (every ``{field}`` becomes ``*``)."""
    out: list[str] = []
    pos = 0
    while pos < len(template):
        start = template.find("{", pos)
        if start < 0:
            out.append(glob_escape(template[pos:]))
            break
        end = template.find("}", start)
        if end < 0:
            out.append(glob_escape(template[pos:]))
            break
        out.append(glob_escape(template[pos:start]) + "*")
        pos = end + 1
    return "".join(out)


def _int(info: dict[str, Any], name: str) -> int:
    try:
        return int(info.get(name, 0))
    except (TypeError, ValueError):
        return 0


def scan_state_keys(
    client: redis.Redis, pattern: str, limit: int, top: int
) -> dict[str, Any]:
    """Count state keys (up to ``limit``) and weigh them; the ``top`` largest by MEMORY USAGE."""
    keys: list[str] = []
    cursor = 0
    complete = False
    while len(keys) < limit:
        cursor, batch = client.scan(cursor=cursor, match=pattern, count=min(1000, max(100, limit)))
        keys.extend(str(k) for k in batch)
        if int(cursor) == 0:
            complete = True
            break
    keys = keys[:limit]
    sizes: list[tuple[str, int]] = []
    if keys:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key)
            pipe.pttl(key)
        replies = pipe.execute(raise_on_error=False)
        ttls: dict[str, int] = {}
        for index, key in enumerate(keys):
            usage, pttl = replies[2 * index], replies[2 * index + 1]
            if isinstance(usage, int):
                sizes.append((key, usage))
            if isinstance(pttl, int):
                ttls[key] = pttl
    else:
        ttls = {}
    sizes.sort(key=lambda item: item[1], reverse=True)
    total = sum(size for _, size in sizes)
    without_ttl = sum(1 for key in keys if ttls.get(key) == -1)
    return {
        "pattern": pattern,
        "count": len(keys),
        "count_is_lower_bound": not complete,
        "sampled": len(sizes),
        "sampled_bytes": total,
        "avg_bytes": round(total / len(sizes), 1) if sizes else None,
        "without_ttl": without_ttl,
        "largest": [{"key": key, "bytes": size, "pttl_ms": ttls.get(key)} for key, size in sizes[:top]],
    }


def collect_memory(
    client: redis.Redis,
    key_template: str,
    *,
    interval_s: float = 1.0,
    scan_limit: int = 1000,
    top: int = 10,
) -> dict[str, Any]:
    """The ``memory_analysis`` section."""
    first = read_info(client, _SAMPLE_SECTIONS)
    started = time.monotonic()
    time.sleep(max(0.0, interval_s))
    second = read_info(client, _SAMPLE_SECTIONS)
    elapsed = max(1e-6, time.monotonic() - started)

    def rate(name: str) -> dict[str, Any]:
        delta = _int(second, name) - _int(first, name)
        delta = max(0, delta)  # a restart in between resets the counters
        return {
            "total": _int(second, name),
            "delta": delta,
            "per_s": round(delta / elapsed, 3),
            "per_min": round(delta / elapsed * 60.0, 1),
        }

    maxmemory = _int(second, "maxmemory")
    used = _int(second, "used_memory")
    keyspace = {
        name: {k: value.get(k) for k in ("keys", "expires", "avg_ttl")}
        for name, value in sorted(second.items())
        if name.startswith("db") and name[2:].isdigit() and isinstance(value, dict)
    }
    try:
        doctor: str | None = str(client.execute_command("MEMORY DOCTOR"))  # type: ignore[no-untyped-call]
    except redis.ResponseError as exc:
        doctor = f"unavailable: {exc}"
    return {
        "used_bytes": used,
        "used_human": second.get("used_memory_human"),
        "peak_bytes": _int(second, "used_memory_peak"),
        "maxmemory_bytes": maxmemory,
        "used_ratio": round(used / maxmemory, 4) if maxmemory else None,
        "maxmemory_policy": second.get("maxmemory_policy"),
        "fragmentation_ratio": second.get("mem_fragmentation_ratio"),
        "sample_interval_s": round(elapsed, 3),
        "evicted_keys": rate("evicted_keys"),
        "expired_keys": rate("expired_keys"),
        "keyspace": keyspace,
        "memory_doctor": doctor,
        "state_keys": scan_state_keys(client, template_pattern(key_template), scan_limit, top),
    }


def journal_memory(
    journal: redis.Redis, config: SubflowConfig, *, dedicated: bool, maxmemory: int | None
) -> dict[str, Any]:
    """The journal's own bytes (its estimate and ``MEMORY USAGE``), its budget and its state.

    ``maxmemory``: the journal server's, or ``None`` to read it (a journal on a Redis of its own)."""
    out: dict[str, Any] = {"keys": names.JOURNAL_KEY_PREFIX + "*", "dedicated": dedicated}
    try:
        if maxmemory is None:
            maxmemory = _int(read_info(journal, ("memory",)), "maxmemory")
        out["budget_bytes"] = budget_bytes(config, dedicated, maxmemory)
        usage = store.read_usage(journal)
    except redis.RedisError as exc:
        out["error"] = ("refused to this user (see docs/acl.md)" if is_refusal(exc)
                        else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return out
    out.update({
        "buckets": usage.buckets,
        "estimated_bytes": usage.estimated_bytes,
        "measured_bytes": usage.measured_bytes,
        "paused": usage.status.get("paused") == "1",
        "oldest_ms": usage.oldest_ms,
        "newest_ms": usage.newest_ms,
    })
    return out
