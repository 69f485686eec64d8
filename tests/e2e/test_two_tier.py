"""Two tiers end to end: apps -> per-host agents (collector/agent.yaml) -> tail-sampling gateways
(collector/otelcol.yaml) -> Jaeger, every one a real process on loopback.

A trace whose spans reach the tier through two agents is decided by ONE gateway: kept whole (both
spans in Jaeger) when its callee half holds a verdict event, dropped whole when nothing in it asks
to be kept (baseline sampling is 0 here).
"""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from otel_subflow import names

# The fixtures come from tests/e2e/conftest.py (TwoTier there); importing conftest by name is
# fragile across pytest import modes.
TwoTier = Any
Poll = Callable[..., Any]

HOP = Path(__file__).resolve().parent / "two_tier_hop.py"
CALLER, CALLEE = "e2e-two-tier-caller", "e2e-two-tier-callee"
# 20 traces over 2 gateways: all on one gateway with probability 2 * 2**-20.
KEPT = CONTROL = 10
FLUSHES = 3

DECIDED = "otelcol_processor_tail_sampling_global_count_traces_sampled"
PENDING = "otelcol_processor_tail_sampling_sampling_traces_on_memory"
ACCEPTED = "otelcol_receiver_accepted_spans"
BACKENDS = "otelcol_loadbalancer_num_backends"
HOPS = "e2e_two_tier_hops_total"


@dataclass
class Hops:
    kept: list[str]
    control: list[str]


def _line(proc: subprocess.Popen[str], what: str, timeout: float = 60) -> str:
    """One line of a child's stdout, within `timeout`."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no {what} within {timeout:.0f}s")
    line = proc.stdout.readline()
    assert line, f"{what}: the process exited ({proc.wait()})"
    return line


def _finish(proc: subprocess.Popen[str], stdin: str, stderr: Path) -> dict[str, Any]:
    out, _ = proc.communicate(stdin, timeout=60)
    assert proc.returncode == 0, f"{proc.args!r} failed ({proc.returncode}):\n{out}\n{stderr.read_text()}"
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def run_hops(tier: TwoTier, tmp_path: Path) -> Hops:
    """The caller (on agent 1's host) opens the roots, the callee (on agent 2's) serves them."""

    def start(role: str, agent: int, service: str, *args: str) -> tuple[subprocess.Popen[str], Path]:
        stderr = tmp_path / f"{role}.stderr"
        with stderr.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, str(HOP), role, f"--flushes={FLUSHES}", *args],
                env=tier.app_env(agent, service),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        return proc, stderr

    callee, callee_err = start("callee", 1, CALLEE)
    caller, caller_err = start("caller", 0, CALLER, f"--kept={KEPT}", f"--control={CONTROL}")
    try:
        carriers = _line(caller, "carriers from the caller")
        served = _finish(callee, carriers, callee_err)  # its spans are exported before it answers
        called = _finish(caller, "done\n", caller_err)  # then the roots end and are exported
    finally:
        for proc in (callee, caller):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                _close(stream)
    assert served == called == {"done": KEPT + CONTROL}
    items = json.loads(carriers)["carriers"]
    return Hops(
        kept=[c["trace_id"] for c in items if c["kind"] == "kept"],
        control=[c["trace_id"] for c in items if c["kind"] == "control"],
    )


def _close(stream: IO[str] | None) -> None:
    if stream is not None and not stream.closed:
        stream.close()


def _event_names(span: dict[str, Any]) -> set[str]:
    return {f["value"] for log in span.get("logs", []) for f in log["fields"] if f["key"] == "event"}


def _trace_ids(tier: TwoTier, service: str) -> set[str]:
    return {t["traceID"] for t in tier.jaeger_traces(service)}


def test_agents_expand_the_gateway_list_from_the_environment(two_tier: TwoTier) -> None:
    """OTEL_SUBFLOW_GATEWAYS=[a,b] (whole-value ${env:...}) is a list of two backends on every agent."""
    for agent in two_tier.agents:
        assert agent.self_metric(BACKENDS) == len(two_tier.gateways), agent.managed.name


@dataclass
class Crossing:
    """One run of the hops, with the gateways' counters from before it."""

    hops: Hops
    decided_before: list[float]
    kept_before: float
    accepted_before: float

    @property
    def traces(self) -> int:
        return len(self.hops.kept) + len(self.hops.control)


@pytest.fixture(scope="module")
def crossing(two_tier: TwoTier, tmp_path_factory: pytest.TempPathFactory) -> Crossing:
    gateways = two_tier.gateways
    decided_before = [g.self_metric(DECIDED) for g in gateways]
    kept_before = sum(g.self_metric(DECIDED, sampled="true") for g in gateways)
    accepted_before = sum(g.self_metric(ACCEPTED, receiver="otlp") for g in gateways)
    hops = run_hops(two_tier, tmp_path_factory.mktemp("hops"))
    return Crossing(hops, decided_before, kept_before, accepted_before)


def test_each_trace_is_decided_once_by_one_gateway(two_tier: TwoTier, crossing: Crossing, poll_until: Poll) -> None:
    """Root via agent 1, child via agent 2: every trace is decided exactly once across the gateways
    (a trace cut in two would be decided by each gateway that saw a part), and both gateways own some."""
    gateways = two_tier.gateways

    def all_decided() -> list[float] | None:
        decided = [g.self_metric(DECIDED) - b for g, b in zip(gateways, crossing.decided_before, strict=True)]
        pending = sum(g.self_metric(PENDING) for g in gateways)
        return decided if sum(decided) >= crossing.traces and pending == 0 else None

    decided = poll_until(all_decided, timeout=60, what=f"the gateways' decisions on {crossing.traces} traces")
    assert sum(decided) == crossing.traces, decided
    assert all(d > 0 for d in decided), f"one gateway owned every trace: {decided}"
    kept = sum(g.self_metric(DECIDED, sampled="true") for g in gateways) - crossing.kept_before
    assert kept == len(crossing.hops.kept)
    # Every span reached the gateway tier exactly once.
    accepted = sum(g.self_metric(ACCEPTED, receiver="otlp") for g in gateways) - crossing.accepted_before
    assert accepted == 2 * crossing.traces


def test_kept_traces_are_whole_in_jaeger_and_control_traces_absent(
    two_tier: TwoTier, crossing: Crossing, poll_until: Poll
) -> None:
    """The traces with a verdict event on the callee's span are in Jaeger with the caller's root too;
    the control traces, decided in the same rounds, have no span there at all."""
    hops = crossing.hops

    def kept_whole() -> dict[str, dict[str, Any]] | None:
        found = {t: two_tier.jaeger_trace(t) for t in hops.kept}
        whole = {t: tr for t, tr in found.items() if tr is not None and len(tr["spans"]) == 2}
        return whole if len(whole) == len(hops.kept) else None

    try:
        found = poll_until(kept_whole, timeout=60, what="the kept traces in Jaeger with both spans")
    except AssertionError as err:
        spans = {t: len(tr["spans"]) if (tr := two_tier.jaeger_trace(t)) else 0 for t in hops.kept}
        raise AssertionError(f"{err}; spans per kept trace in Jaeger: {spans}") from None
    for trace_id, trace in found.items():
        services = {trace["processes"][s["processID"]]["serviceName"]: s for s in trace["spans"]}
        assert set(services) == {CALLER, CALLEE}, trace_id
        root, child = services[CALLER], services[CALLEE]
        assert root["operationName"] == "e2e.hop.call" and not root["references"]
        assert child["operationName"] == names.SPAN_STATE_GET
        assert [(r["refType"], r["spanID"]) for r in child["references"]] == [("CHILD_OF", root["spanID"])]
        assert names.EVENT_STATE_MISSING in _event_names(child)

    # Every kept trace is in Jaeger, so the rounds that decided the control traces are exported:
    # neither half of any control trace is there, and nothing but the kept traces is.
    assert [t for t in hops.control if two_tier.jaeger_trace(t) is not None] == []
    assert _trace_ids(two_tier, CALLER) == _trace_ids(two_tier, CALLEE) == set(hops.kept)


def test_metrics_reach_one_gateway_per_sdk(two_tier: TwoTier, crossing: Crossing, poll_until: Poll) -> None:
    """Through the agents each SDK's metric stream (routed by resource) lands whole on one
    gateway's Prometheus endpoint, with its last cumulative value."""
    for service in (CALLER, CALLEE):

        def values(s: str = service) -> list[float] | None:
            v = [g.exported_metric(HOPS, job=s) for g in two_tier.gateways]
            return v if max(v) >= FLUSHES else None

        seen = poll_until(values, timeout=60, what=f"{HOPS} of {service} on a gateway")
        assert sorted(seen) == [0] * (len(seen) - 1) + [FLUSHES], (service, seen)
