"""The demo's workload: healthy workflow runs with failures injected among them, and the report.

Worker processes with their own host identities run the lab's decorated
service. Most runs are healthy (init every node, read every node back); the
lab injects the chosen failure modes among them, with the ground truth known,
and the report compares what otel-subflow said with what really happened.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from otel_subflow import names
from otel_subflow.lab.campaign import CampaignReport
from otel_subflow.lab.harness import Injection, Lab
from otel_subflow.lab.scenarios import SCENARIOS

#: The mix the demo injects by default: the incidents engineers meet most.
DEFAULT_MIX = (
    "ttl_too_short", "memory_pressure", "wrong_db", "cross_worker_race", "early_cleanup", "redis_restart",
)
NODES_PER_RUN = 3


@dataclasses.dataclass
class WorkloadResult:
    runs: int
    healthy_runs: int
    reads: int
    hits: int
    injections: list[Injection]
    elapsed_s: float

    @property
    def report(self) -> CampaignReport:
        return CampaignReport(self.injections)


def healthy_run(lab: Lab, url: str) -> tuple[int, int]:
    """One workflow run that works: a writer initialises each node, another worker reads them."""
    writer, reader = lab.pair()
    run = lab.new_run()
    for node in range(NODES_PER_RUN):
        writer.init(url, run, f"node-{node}", data=f"state-{node}", ttl_ms=600_000)
    hits = sum(reader.get(url, run, f"node-{node}").value is not None for node in range(NODES_PER_RUN))
    return NODES_PER_RUN, hits


def run_workload(
    lab: Lab,
    *,
    runs: int | None = None,
    duration_s: float | None = None,
    scenarios: Sequence[str] = DEFAULT_MIX,
    failure_share: float = 0.5,
    progress: Callable[[int, int | None, Injection | None], None] | None = None,
) -> WorkloadResult:
    """Run ``runs`` runs (or until ``duration_s``), injecting failures into about ``failure_share`` of them."""
    chosen = list(scenarios)
    planned: list[str] = list(chosen)  # every chosen mode at least once
    lab.rng.shuffle(planned)
    started = time.monotonic()
    total = runs if runs is not None else None
    done = healthy = reads = hits = 0
    injections: list[Injection] = []

    def more() -> bool:
        if runs is not None and done >= runs:
            return False
        if duration_s is not None and time.monotonic() - started >= duration_s:
            return bool(planned)  # finish the modes not shown yet
        return runs is not None or duration_s is not None

    while more():
        if planned or lab.rng.random() < failure_share:
            name = planned.pop() if planned else lab.rng.choice(chosen)
            injection = SCENARIOS[name](lab)
            injections.append(injection)
            done += 1
            if progress:
                progress(done, total, injection)
        else:
            read, hit = healthy_run(lab, lab.state.url())
            healthy += 1
            reads += read
            hits += hit
            done += 1
            if progress:
                progress(done, total, None)
    return WorkloadResult(done, healthy, reads + len(injections), hits, injections, time.monotonic() - started)


#: Evidence every verdict carries; shown after what is particular to the cause.
_COMMON_EVIDENCE = ("key_exists", "server_run_id", "reader_db", "journal_entries", "reader_endpoint",
                    "server_uptime_s", "maxmemory", "used_memory", "expired_keys", "evicted_keys",
                    "maxmemory_policy", "analysis_ms", "journal_seen_ms", "run_journal_missing")


def _evidence(verdict: dict[str, Any]) -> dict[str, Any]:
    prefix = names.EVIDENCE_PREFIX
    found = {k[len(prefix):]: v for k, v in verdict.items() if k.startswith(prefix)}
    particular = {k: v for k, v in found.items() if k not in _COMMON_EVIDENCE}
    common = {k: v for k, v in found.items() if k in _COMMON_EVIDENCE and k != "journal_seen_ms"}
    return {**particular, **common}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 3)


def jaeger_search_url(jaeger_url: str, service_name: str, tags: dict[str, str]) -> str:
    """The Jaeger UI's search page for ``tags`` (URL-encoded JSON, as the UI writes it).

    Without the credentials of ``jaeger_url``: the link is shown and works as is (the browser asks).
    """
    from otel_subflow.cli._secrets import join_url  # here: the cli package imports this module

    return join_url(jaeger_url, "/search", {"service": service_name, "tags": json.dumps(tags, separators=(",", ":"))})


def build_report(result: WorkloadResult, *, journal_url: str, jaeger_url: str | None,
                 service_name: str, telemetry: str) -> dict[str, Any]:
    """The demo's root-cause report as a JSON-ready document (the human view renders this).

    Every URL in it is masked (Redis) or stripped of its credentials (Jaeger links).
    """
    from otel_subflow.cli._secrets import mask_url  # here: the cli package imports this module

    def command_url(url: str) -> str:
        return shlex.quote(mask_url(url))

    report = result.report
    by_cause: dict[str, dict[str, Any]] = {}
    for injection in result.injections:
        entry = by_cause.setdefault(injection.final_cause, {
            "count": 0, "confidence": Counter(), "example": None,
        })
        entry["count"] += 1
        entry["confidence"][injection.final_confidence] += 1
        if entry["example"] is None:
            verdict = injection.result.verdict or {}
            entry["example"] = {
                "run_id": injection.run_id,
                "node_id": injection.node_id,
                "injected": injection.scenario,
                "writer": injection.writer,
                "reader": injection.reader,
                "trace_id": injection.result.trace_id,
                "summary": injection.summary,
                "evidence": _evidence(verdict),
            }
    for entry in by_cause.values():
        entry["confidence"] = dict(entry["confidence"])
    analysis_ms = [float(i.result.verdict["subflow.evidence.analysis_ms"]) for i in result.injections
                   if i.result.verdict and "subflow.evidence.analysis_ms" in i.result.verdict]
    read_ms = [i.result.verdict_latency_ms for i in result.injections if i.result.verdict_latency_ms is not None]
    failed_runs = sorted({i.run_id for i in result.injections})
    dig = [
        f"OTEL_SUBFLOW_JOURNAL_URL={command_url(journal_url)} otel-subflow diagnose "
        f"--redis-url {command_url(i.result.url)} --missing-state --run-id {i.run_id} --node-id '{i.node_id}'"
        for i in _one_per_cause(result.injections)
    ]
    jaeger_links = {}
    if jaeger_url:
        for run_id in failed_runs:
            jaeger_links[run_id] = jaeger_search_url(jaeger_url, service_name, {names.ATTR_RUN_ID: run_id})
    return {
        "runs": result.runs,
        "healthy_runs": result.healthy_runs,
        "reads": result.reads,
        "hits": result.hits,
        "failures": len(result.injections),
        "elapsed_s": round(result.elapsed_s, 2),
        "failures_by_cause": dict(sorted(by_cause.items(), key=lambda kv: -kv[1]["count"])),
        "injected": dict(Counter(i.scenario for i in result.injections)),
        "confusion_matrix": {t: dict(row) for t, row in report.matrix.items()},
        "accuracy": round(report.accuracy, 4),
        "definitive": len(report.definitive),
        "definitive_accuracy": round(report.definitive_accuracy, 4),
        "wrong_definitive": [_masked(i.as_dict(), mask_url) for i in report.wrong_definitive],
        "time_to_verdict_ms": {
            "analysis_p50": _percentile(analysis_ms, 0.5),
            "analysis_p99": _percentile(analysis_ms, 0.99),
            "failed_read_p50": _percentile(read_ms, 0.5),
            "failed_read_p99": _percentile(read_ms, 0.99),
            "mean_analysis": round(statistics.fmean(analysis_ms), 3) if analysis_ms else None,
        },
        "dig_further": dig,
        "jaeger_search": jaeger_links,
        "telemetry": telemetry,
    }


def _masked(injection: dict[str, Any], mask_url: Callable[[str], str]) -> dict[str, Any]:
    """An injection's record with the URL its read used masked."""
    result = injection.get("result")
    if isinstance(result, dict) and result.get("url"):
        injection["result"] = {**result, "url": mask_url(str(result["url"]))}
    return injection


def _one_per_cause(injections: list[Injection]) -> list[Injection]:
    seen: dict[str, Injection] = {}
    for injection in injections:
        seen.setdefault(injection.final_cause, injection)
    return list(seen.values())
