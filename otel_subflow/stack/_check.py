"""The stack checked end to end, without a person looking: what ``--check`` runs.

One trace goes in over OTLP/HTTP (status ERROR, so tail sampling keeps it) and
must come out of Jaeger's API; Prometheus must be scraping the collector and
have loaded the alert rules. Standard library only: the check needs no SDK.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from otel_subflow.stack._common import http_ok
from otel_subflow.stack._local import LocalStack

CHECK_SERVICE = "otel-subflow-stack-check"
# No answer yet, or not the answer's expected shape: a check that fails, never a traceback.
_NO_ANSWER = (urllib.error.URLError, OSError, ValueError, KeyError, TypeError)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One component's verdict: ``detail`` says what was seen, or what was not."""

    component: str
    ok: bool
    detail: str


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def _poll(fn: Callable[[], T | None], timeout: float) -> T | None:
    """fn() until it returns something truthy or the deadline passes (then its last answer)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = fn()
        except _NO_ANSWER:
            got = None
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(0.25)


def _otlp_trace(trace_id: str, span_id: str) -> bytes:
    now = time.time_ns()
    span = {
        "traceId": trace_id,
        "spanId": span_id,
        "name": "otel-subflow stack check",
        "kind": 1,
        "startTimeUnixNano": str(now - 1_000_000),
        "endTimeUnixNano": str(now),
        "status": {"code": 2, "message": "stack check: kept by tail sampling"},
    }
    service = {"key": "service.name", "value": {"stringValue": CHECK_SERVICE}}
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": [service]},
                "scopeSpans": [{"scope": {"name": "otel_subflow.stack"}, "spans": [span]}],
            }
        ]
    }
    return json.dumps(body).encode()


def _check_trace(stack: LocalStack, timeout: float) -> list[CheckResult]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    request = urllib.request.Request(
        f"{stack.otlp_http_endpoint}/v1/traces",
        data=_otlp_trace(trace_id, span_id),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            status = int(resp.status)
    except (urllib.error.URLError, OSError) as err:
        return [CheckResult("collector", False, f"OTLP/HTTP export to {stack.otlp_http_endpoint} failed: {err}")]
    if not http_ok(stack.urls["collector_health"]) or status != 200:
        return [CheckResult("collector", False, f"OTLP/HTTP answered {status}, or the health check failed")]
    accepted = f"healthy; accepted a trace over OTLP/HTTP at {stack.otlp_http_endpoint}"
    results = [CheckResult("collector", True, accepted)]
    if "jaeger" not in stack.components:
        return results
    started = time.monotonic()
    url = f"{stack.urls['jaeger']}/api/traces/{trace_id}"

    def found() -> bool:
        spans = [s for t in _get_json(url).get("data") or [] for s in t.get("spans", [])]
        return any(s.get("spanID") == span_id for s in spans)

    if _poll(found, timeout):
        detail = f"the trace came through the collector in {time.monotonic() - started:.1f} s ({url})"
        results.append(CheckResult("jaeger", True, detail))
    else:
        results.append(CheckResult("jaeger", False, f"trace {trace_id} not in Jaeger after {timeout:.0f} s ({url})"))
    return results


def _check_prometheus(stack: LocalStack, timeout: float) -> CheckResult:
    base = stack.urls["prometheus"]

    def targets_up() -> list[str] | None:
        targets = _get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
        if targets and all(t.get("health") == "up" for t in targets):
            return sorted({str(t["labels"].get("job")) for t in targets})
        return None

    jobs = _poll(targets_up, timeout)
    if not jobs:
        return CheckResult("prometheus", False, f"its scrape targets are not all up after {timeout:.0f} s "
                           f"({base}/targets)")
    try:
        rules = [r for g in _get_json(f"{base}/api/v1/rules")["data"]["groups"] for r in g.get("rules", [])]
    except _NO_ANSWER as err:
        return CheckResult("prometheus", False, f"{base}/api/v1/rules: {err!r}")
    broken = [str(r.get("name")) for r in rules if r.get("health") == "err"]
    if not rules or broken:
        return CheckResult("prometheus", False, f"alert rules not loaded or failing: {broken or 'none loaded'}")
    return CheckResult("prometheus", True, f"scraping {', '.join(jobs)}; {len(rules)} rules loaded")


def check_stack(stack: LocalStack, timeout: float = 30.0) -> list[CheckResult]:
    """Prove that a started stack works: a trace through the collector into Jaeger, Prometheus scraping.

    Each check polls up to ``timeout`` seconds. Use a short tail-sampling
    ``decision_wait`` (the check's stack uses 1s) or the trace takes that long.
    """
    results: list[CheckResult] = []
    if "collector" in stack.components:
        results += _check_trace(stack, timeout)
    if "prometheus" in stack.components:
        results.append(_check_prometheus(stack, timeout))
    return results
