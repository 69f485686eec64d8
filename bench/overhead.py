"""``make bench``: what otel-subflow costs, as ratios to baselines measured in the same run.

One process, one redis-server of its own on loopback, one real SDK TracerProvider
(BatchSpanProcessor into a no-op exporter) and one real MeterProvider for every
variant. Variants are timed in interleaved rounds (the order rotates each round)
and every figure is the median over rounds of a per-round ratio, so drift of the
machine during the run moves numerator and baseline together.

    python bench/overhead.py                 # the full run (a few minutes)
    python bench/overhead.py --quick         # a scaled-down smoke run (CI)
    python bench/overhead.py --profile       # pyinstrument profile of the hit path

Prints one table and writes it as JSON (``--json``, default bench/results.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from otel_subflow import (
    RunContextSpanProcessor,
    SubflowConfig,
    flush_journals,
    instrument_state_get,
    instrument_state_init,
    names,
)
from otel_subflow._config import get_config
from otel_subflow._journal.location import journal_for
from otel_subflow._redis.connection import connection_info
from otel_subflow.lab.servers import RedisServer

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results.json"
RUN = "bench-run"
#: Enough analyses per second that every miss of the miss-path figure is analysed.
UNLIMITED = SubflowConfig(analysis_rate_per_s=1e9, analysis_burst=1_000_000_000)
NO_JOURNAL = SubflowConfig(journal_enabled=False)


# -- the service, undecorated and decorated ----------------------------------------


def get_state(redis: redis.Redis, run_id: str, node_id: str) -> Any:
    return redis.get(f"subflow:state:{run_id}:{node_id}")


def initialize_state(redis: redis.Redis, run_id: str, node_id: str, data: str, ttl_ms: int = 600_000) -> bool:
    return bool(redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms))


decorated_get = instrument_state_get()(get_state)
decorated_init = instrument_state_init()(initialize_state)
decorated_init_no_journal = instrument_state_init(config=NO_JOURNAL)(initialize_state)
decorated_get_analysed = instrument_state_get(config=UNLIMITED)(get_state)


class NoopExporter(SpanExporter):
    """Spans go through the real batch processor and are thrown away at export."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def setup_providers() -> tuple[TracerProvider, MeterProvider]:
    resource = Resource.create({"service.name": "otel-subflow-bench"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(RunContextSpanProcessor())
    tracer_provider.add_span_processor(BatchSpanProcessor(NoopExporter()))
    meter_provider = MeterProvider(resource=resource, metric_readers=[InMemoryMetricReader()])
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    # Miss verdicts log at WARNING: the application's handlers decide what that costs, not us.
    logging.getLogger(names.LOGGER_NAME).setLevel(logging.ERROR)
    return tracer_provider, meter_provider


# -- the bare-span baselines --------------------------------------------------------


def span_attrs(client: redis.Redis, run_id: str, node_id: str, key: str) -> dict[str, Any]:
    """What a hand-written span would carry: the ids, the key and the connection attributes."""
    attrs: dict[str, Any] = {names.ATTR_RUN_ID: run_id, names.ATTR_NODE_ID: node_id, names.ATTR_STATE_KEY: key}
    info = connection_info(client)
    if info is not None:
        attrs.update(info.span_attributes())
    return attrs


def make_span_get(tracer: trace.Tracer, conn_attrs: dict[str, Any]) -> Callable[[redis.Redis, str, str], Any]:
    def span_get(client: redis.Redis, run_id: str, node_id: str) -> Any:
        key = f"subflow:state:{run_id}:{node_id}"
        attrs = {names.ATTR_RUN_ID: run_id, names.ATTR_NODE_ID: node_id, names.ATTR_STATE_KEY: key, **conn_attrs}
        with tracer.start_as_current_span(names.SPAN_STATE_GET, kind=SpanKind.INTERNAL, attributes=attrs) as span:
            value = get_state(client, run_id, node_id)
            span.set_attribute(names.ATTR_STATE_OUTCOME, names.OUTCOME_HIT if value is not None else names.OUTCOME_MISS)
            return value

    return span_get


def make_span_init(tracer: trace.Tracer, conn_attrs: dict[str, Any]) -> Callable[..., bool]:
    def span_init(client: redis.Redis, run_id: str, node_id: str, data: str, ttl_ms: int = 600_000) -> bool:
        key = f"subflow:state:{run_id}:{node_id}"
        attrs = {names.ATTR_RUN_ID: run_id, names.ATTR_NODE_ID: node_id, names.ATTR_STATE_KEY: key,
                 names.ATTR_STATE_TTL_MS: ttl_ms, **conn_attrs}
        with tracer.start_as_current_span(names.SPAN_STATE_INIT, kind=SpanKind.INTERNAL, attributes=attrs) as span:
            ok = initialize_state(client, run_id, node_id, data, ttl_ms)
            span.set_attribute(names.ATTR_STATE_OUTCOME, names.OUTCOME_CREATED)
            return ok

    return span_init


# -- measurement helpers ------------------------------------------------------------


@dataclasses.dataclass
class Figure:
    id: str
    label: str
    value: float | None
    unit: str
    target: str | None = None
    met: bool | None = None
    baseline: str = ""
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def shown(self) -> str:
        if self.value is None:
            return "n/a"
        if self.unit == "x":
            return f"{self.value:.2f}x"
        if self.unit == "ms":
            return f"{self.value:.3f} ms"
        if self.unit == "MB":
            return f"{self.value:.2f} MB"
        if self.unit == "commands":
            return str(self.detail.get("per_1000", ""))
        return f"{self.value:g} {self.unit}"


def interleaved(variants: dict[str, Callable[[int], None]], rounds: int, ops: int) -> dict[str, list[float]]:
    """Per-op seconds of each variant in each round; the order rotates round by round."""
    order = list(variants)
    times: dict[str, list[float]] = {name: [] for name in order}
    for round_no in range(rounds):
        shift = round_no % len(order)
        for name in order[shift:] + order[:shift]:
            gc.collect()
            started = time.perf_counter()
            variants[name](ops)
            times[name].append((time.perf_counter() - started) / ops)
    return times


def overhead_ratio(
    times: dict[str, list[float]], variant: str, baseline: str, floor: str
) -> tuple[float, dict[str, Any]]:
    """Median over rounds of (variant - floor) / (baseline - floor), per-op times of the same round."""
    ratios = []
    for v, b, f in zip(times[variant], times[baseline], times[floor], strict=True):
        if b - f > 0:
            ratios.append((v - f) / (b - f))
    med = {name: statistics.median(values) * 1e6 for name, values in times.items()}
    detail = {
        "median_us_per_op": {k: round(v, 2) for k, v in med.items()},
        f"{variant}_overhead_us": round(med[variant] - med[floor], 2),
        f"{baseline}_overhead_us": round(med[baseline] - med[floor], 2),
        "rounds": len(times[variant]),
        "ratio_of_median_overheads": round((med[variant] - med[floor]) / (med[baseline] - med[floor]), 3)
        if med[baseline] > med[floor] else None,
    }
    return (statistics.median(ratios) if ratios else float("nan")), detail


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100.0 * (len(ordered) - 1))))
    return ordered[index]


def commandstats(client: redis.Redis) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, value in client.info("commandstats").items():
        out[name.removeprefix("cmdstat_")] = int(value["calls"]) if isinstance(value, dict) else 0
    return out


def command_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    delta["info"] = delta.get("info", 0) - 1  # the first reading's own INFO
    return {k: v for k, v in sorted(delta.items()) if v}


# -- the figures --------------------------------------------------------------------


def bench_hit(client: redis.Redis, contrib_client: redis.Redis, tracer: trace.Tracer,
              rounds: int, ops: int) -> list[Figure]:
    client.set(f"subflow:state:{RUN}:hit", "state", px=3_600_000)
    decorated_get(client, RUN, "hit")  # the pool's CLIENT ID / run_id are fetched once, here
    conn_attrs = {k: v for k, v in span_attrs(client, RUN, "hit", "").items()
                  if k not in (names.ATTR_RUN_ID, names.ATTR_NODE_ID, names.ATTR_STATE_KEY)}
    span_get = make_span_get(tracer, conn_attrs)

    def loop(fn: Callable[[redis.Redis, str, str], Any], c: redis.Redis) -> Callable[[int], None]:
        def run(n: int) -> None:
            for _ in range(n):
                fn(c, RUN, "hit")
        return run

    times = interleaved({
        "bare_get": loop(get_state, client),
        "bare_span": loop(span_get, client),
        "contrib_redis": loop(get_state, contrib_client),
        "decorated": loop(decorated_get, client),
    }, rounds, ops)
    vs_span, d1 = overhead_ratio(times, "decorated", "bare_span", "bare_get")
    vs_contrib, d2 = overhead_ratio(times, "decorated", "contrib_redis", "bare_get")
    return [
        Figure("hit_vs_bare_span", "decorated get, hit, journal on: overhead / bare span overhead",
               vs_span, "x", "<= 1.15", vs_span <= 1.15,
               "start_as_current_span with the same attributes around the same GET", d1),
        Figure("hit_vs_contrib_redis", "decorated get, hit: overhead / opentelemetry-instrumentation-redis overhead",
               vs_contrib, "x", "<= 1.0", vs_contrib <= 1.0,
               "instrument_client() on the same kind of client, one GET", d2),
    ]


def bench_init(client: redis.Redis, tracer: trace.Tracer, rounds: int, ops: int) -> list[Figure]:
    decorated_init(client, RUN, "warm", "state")
    flush_journals(5.0)
    conn_attrs = {k: v for k, v in span_attrs(client, RUN, "x", "").items()
                  if k not in (names.ATTR_RUN_ID, names.ATTR_NODE_ID, names.ATTR_STATE_KEY)}
    span_init = make_span_init(tracer, conn_attrs)
    nodes = [f"n{i}" for i in range(ops)]
    cpu: dict[str, list[float]] = {}
    variants: dict[str, Callable[..., bool]] = {
        "bare_set": initialize_state,
        "bare_span": span_init,
        "decorated_no_journal": decorated_init_no_journal,
        "decorated": decorated_init,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for round_no in range(rounds):
        shift = round_no % len(order)
        for name in order[shift:] + order[:shift]:
            fn = variants[name]
            gc.collect()
            cpu_started = time.process_time()
            started = time.perf_counter()
            for i in range(ops):
                fn(client, RUN, nodes[i], "state")
            times[name].append((time.perf_counter() - started) / ops)
            # The caller's time stops above. The flusher's leftovers are drained before the
            # next variant starts, and the CPU of all threads (flush included) is kept apart.
            flush_journals(10.0)
            cpu.setdefault(name, []).append((time.process_time() - cpu_started) / ops)
    ratio, detail = overhead_ratio(times, "decorated", "bare_span", "bare_set")
    journal_ratio, jdetail = overhead_ratio(times, "decorated", "decorated_no_journal", "bare_set")
    cpu_ratio, cdetail = overhead_ratio(cpu, "decorated", "bare_span", "bare_set")
    cpu_med = {k: statistics.median(v) * 1e6 for k, v in cpu.items()}
    detail["cpu"] = cdetail
    jdetail["journal_cpu_us_per_init"] = round(cpu_med["decorated"] - cpu_med["decorated_no_journal"], 2)
    return [
        Figure("init_vs_bare_span", "decorated init, journal on: overhead / bare span overhead",
               ratio, "x", "<= 1.25", ratio <= 1.25,
               "start_as_current_span with the same attributes around the same SET", detail),
        Figure("init_journal_hot_path", "decorated init: overhead journal on / journal off (caller's time)",
               journal_ratio, "x", None, None,
               "the same decorator with OTEL_SUBFLOW_JOURNAL=false", jdetail),
        Figure("init_cpu_vs_bare_span", "decorated init, journal on, all threads' CPU incl. flush / bare span CPU",
               cpu_ratio, "x", None, None,
               "process CPU time per init, flusher thread included", cdetail),
    ]


def _miss_latencies(client: redis.Redis, runs: Sequence[str], calls: int) -> tuple[list[float], list[float]]:
    """Alternate an undecorated miss and an analysed one; per-call seconds of each."""
    bare: list[float] = []
    analysed: list[float] = []
    for i in range(calls):
        run, node = runs[i % len(runs)], f"missing-{i}"
        started = time.perf_counter()
        get_state(client, run, node)
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        value = decorated_get_analysed(client, run, node)
        analysed.append(time.perf_counter() - started)
        assert value is None
        if i % 100 == 99:
            flush_journals(10.0)
    flush_journals(10.0)
    return bare, analysed


def bench_miss(client: redis.Redis, calls: int) -> list[Figure]:
    # Typical: a run of 8 initialised nodes, 4 misses in it (journal of 8-12 entries).
    runs = [f"miss-run-{n}" for n in range(max(1, calls // 4))]
    for run in runs:
        for node in range(8):
            decorated_init(client, run, f"n{node}", "state")
    flush_journals(30.0)
    decorated_get_analysed(client, "warm-run", "warm")
    bare, analysed = _miss_latencies(client, runs, calls)
    # Worst case: the run's journal is at the analysis's read bound (XREVRANGE COUNT 200).
    big = "miss-run-big"
    for node in range(250):
        decorated_init(client, big, f"n{node}", "state")
    flush_journals(30.0)
    big_bare, big_analysed = _miss_latencies(client, [big], max(50, calls // 6))
    p50, p99 = percentile(analysed, 50) * 1e3, percentile(analysed, 99) * 1e3
    big_p50, big_p99 = percentile(big_analysed, 50) * 1e3, percentile(big_analysed, 99) * 1e3
    bare_p50 = percentile(bare, 50) * 1e3
    detail = {"calls": calls, "bare_get_miss_p50_ms": round(bare_p50, 3),
              "bare_get_miss_p99_ms": round(percentile(bare, 99) * 1e3, 3),
              "p50_ratio_to_bare_get": round(p50 / bare_p50, 2)}
    big_detail = {"calls": len(big_analysed), "journal_entries_read": 200,
                  "bare_get_miss_p50_ms": round(percentile(big_bare, 50) * 1e3, 3)}
    typical = "every miss analysed; run with 8 inits journalled"
    return [
        Figure("miss_p50_ms", "decorated get, miss with analysis: p50", p50, "ms", "<= 1 ms", p50 <= 1.0,
               typical, detail),
        Figure("miss_p99_ms", "decorated get, miss with analysis: p99", p99, "ms", None, None, typical, detail),
        Figure("miss_big_journal_p50_ms", "decorated get, miss, a run with 250 journalled inits: p50",
               big_p50, "ms", None, None, "every miss analysed; run with 250 inits journalled", big_detail),
        Figure("miss_big_journal_p99_ms", "decorated get, miss, a run with 250 journalled inits: p99",
               big_p99, "ms", None, None, "every miss analysed; run with 250 inits journalled", big_detail),
    ]


def bench_paused_writes(client: redis.Redis, admin: redis.Redis, calls: int) -> list[Figure]:
    """Misses while the server pauses writes (CLIENT PAUSE WRITE, as in a failover): analysed vs undecorated."""
    decorated_get_analysed(client, "paused-run", "warm")
    flush_journals(5.0)
    bare: list[float] = []
    analysed: list[float] = []
    admin.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
    try:
        for i in range(calls):
            started = time.perf_counter()
            get_state(client, "paused-run", f"m{i}")
            bare.append(time.perf_counter() - started)
            started = time.perf_counter()
            decorated_get_analysed(client, "paused-run", f"m{i}")
            analysed.append(time.perf_counter() - started)
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    flush_journals(10.0)
    added = (percentile(analysed, 50) - percentile(bare, 50)) * 1e3
    detail = {"calls": calls, "bare_p50_ms": round(percentile(bare, 50) * 1e3, 3),
              "analysed_p50_ms": round(percentile(analysed, 50) * 1e3, 3),
              "analysed_p99_ms": round(percentile(analysed, 99) * 1e3, 3)}
    return [Figure("miss_paused_writes_added_ms", "miss with analysis during CLIENT PAUSE WRITE: p50 added",
                   added, "ms", "<= 30 ms", added <= 30.0, "the same miss undecorated, same pause", detail)]


def bench_journal_footprint(runs: int) -> list[Figure]:
    """The journal's bytes on Redis: ``runs`` runs x 1 init of a 100-byte state, against the state itself."""
    from otel_subflow._config import set_config
    from otel_subflow._journal import store
    from otel_subflow._runtime import runtime

    results: dict[str, int] = {}
    with RedisServer() as server:
        client = server.client()
        for variant in ("undecorated", "decorated"):
            client.flushall()
            runtime.reset()
            base = int(client.info("memory")["used_memory"])
            set_config(SubflowConfig(journal_budget_mb=8192))  # no trimming: the shape's own cost
            init = initialize_state if variant == "undecorated" else decorated_init
            for i in range(runs):
                init(client, f"fp-{i:08d}", "node-1", "x" * 100, ttl_ms=3_600_000)
            flush_journals(60.0)
            results[variant] = int(client.info("memory")["used_memory"]) - base
        usage = store.read_usage(client)
        runtime.reset()
    state, journal = results["undecorated"], results["decorated"] - results["undecorated"]
    detail = {"runs": runs, "state_bytes": state, "journal_bytes": journal,
              "journal_estimated_bytes": usage.estimated_bytes, "buckets": usage.buckets,
              "per_100k_runs_mb": round(journal * 100_000 / runs / 1e6, 1),
              "state_per_100k_runs_mb": round(state * 100_000 / runs / 1e6, 1),
              "journal_to_state": round(journal / state, 3)}
    return [
        Figure("journal_bytes_per_1000_inits", "journal bytes per 1,000 inits (one run each, 100-byte state)",
               journal * 1000 / runs, "B", None, None, f"state itself: {state * 1000 // runs} B", detail),
        Figure("journal_mb_per_100k_runs", "journal MB per 100,000 runs x 1 init (no budget)",
               journal * 100_000 / runs / 1e6, "MB", None, None,
               f"state {detail['state_per_100k_runs_mb']} MB; per-run streams were 478 MB", detail),
    ]


_WATCHER_CHILD = """
import sys, threading, redis
from otel_subflow import KeyspaceWatcher
watcher = KeyspaceWatcher(redis.Redis.from_url(sys.argv[1])).start()
print("ready" if watcher.wait_subscribed(10) else "not subscribed", flush=True)
threading.Event().wait()  # until killed
"""


def bench_tombstones(samples: int) -> list[Figure]:
    """From a DEL to its tombstone in the journal, with the keyspace watcher in another process."""
    from otel_subflow._journal import store

    with RedisServer() as server:
        admin = server.client()
        child = subprocess.Popen([sys.executable, "-c", _WATCHER_CHILD, server.url()], stdout=subprocess.PIPE,
                                 text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            latencies: list[float] = []
            for i in range(samples):
                run = f"tomb-{i}"
                decorated_init(admin, run, "n", "v", ttl_ms=3_600_000)
                flush_journals(5.0)
                admin.delete(f"subflow:state:{run}:n")
                started = time.perf_counter()
                while not any(e.op == "del" for e in store.read_run(admin, run)):
                    if time.perf_counter() - started > 2.0:
                        break
                latencies.append((time.perf_counter() - started) * 1000.0)
        finally:
            child.kill()
            child.wait(10)
            admin.close()
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    detail = {"samples": samples, "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "max_ms": round(latencies[-1], 3)}
    return [Figure("tombstone_readable_p99_ms", "DEL to its tombstone readable in the journal (watcher in another "
                   "process): p99", p99, "ms", "<= 20 ms", p99 <= 20.0,
                   "polled with the analysis's own reads; includes one read round trip", detail)]


def bench_commands(client: redis.Redis, observer: redis.Redis) -> list[Figure]:
    """Exact Redis commands per 1,000 operations (warm connections, journal drained)."""
    client.set(f"subflow:state:{RUN}:cmd-hit", "state", px=3_600_000)
    decorated_get(client, RUN, "cmd-hit")
    flush_journals(5.0)
    figures = []

    def count(label: str, fid: str, op: Callable[[int], Any], baseline: str) -> None:
        before = commandstats(observer)
        for i in range(1000):
            op(i)
        flush_journals(10.0)
        delta = command_delta(before, commandstats(observer))
        total = sum(delta.values())
        figures.append(Figure(fid, label, float(total), "commands", None, None, baseline,
                              {"per_1000": ", ".join(f"{k} {v}" for k, v in delta.items()), "commands": delta}))

    count("Redis commands per 1,000 hits", "commands_hits", lambda i: decorated_get(client, RUN, "cmd-hit"),
          "undecorated: get 1000")
    count("Redis commands per 1,000 inits (journal flushed)", "commands_inits",
          lambda i: decorated_init(client, "bench-cmd", f"n{i}", "state"), "undecorated: set 1000")
    count("Redis commands per 1,000 misses, every one analysed", "commands_misses_analysed",
          lambda i: decorated_get_analysed(client, "bench-cmd-miss", f"m{i}"), "undecorated: get 1000")
    started = time.perf_counter()
    count("Redis commands per 1,000 misses in a burst, default rate limit", "commands_misses_default",
          lambda i: decorated_get(client, "bench-cmd-storm", f"m{i}"), "undecorated: get 1000")
    figures[-1].detail["seconds"] = round(time.perf_counter() - started, 3)
    figures[-1].detail["analysed"] = figures[-1].detail["commands"].get("pttl", 0)
    for figure in figures:  # commandstats counts the commands our script runs inside, too
        commands = figure.detail["commands"]
        figure.detail["script_calls"] = commands.get("evalsha", 0) + commands.get("eval", 0)
    return figures


# -- a restricted ACL user -----------------------------------------------------------

ACL_USER, ACL_PASSWORD = "bench-app", "bench-app-secret"


def bench_acl_hit(server: RedisServer, admin: redis.Redis, calls: int) -> list[Figure]:
    """Hits as a typical production user (``-@all +get +set +del``: CLIENT ID and INFO refused).

    The refused id fetch must cost one round trip once, not a reconnect per call:
    per-call latencies of the undecorated and the decorated GET, alternating.
    """
    admin.execute_command("ACL", "SETUSER", ACL_USER, "reset", "on", f">{ACL_PASSWORD}", "~subflow:state:*",
                          "-@all", "+get", "+set", "+del")
    connections_before = int(admin.info("stats")["total_connections_received"])
    client = redis.Redis(host=server.host, port=server.port, username=ACL_USER, password=ACL_PASSWORD)
    try:
        client.set(f"subflow:state:{RUN}:acl-hit", "state", px=3_600_000)
        decorated_get(client, RUN, "acl-hit")  # the pool's refused id fetch, once
        bare: list[float] = []
        decorated: list[float] = []
        for i in range(calls):
            first, second = (get_state, decorated_get) if i % 2 == 0 else (decorated_get, get_state)
            for fn in (first, second):
                started = time.perf_counter()
                fn(client, RUN, "acl-hit")
                (bare if fn is get_state else decorated).append(time.perf_counter() - started)
        opened = int(admin.info("stats")["total_connections_received"]) - connections_before
    finally:
        client.close()
        admin.execute_command("ACL", "DELUSER", ACL_USER)
    bare_p50, decorated_p50 = percentile(bare, 50), percentile(decorated, 50)
    ratio = decorated_p50 / bare_p50
    detail = {
        "calls": calls,
        "undecorated_p50_us": round(bare_p50 * 1e6, 2),
        "decorated_p50_us": round(decorated_p50 * 1e6, 2),
        "undecorated_p99_us": round(percentile(bare, 99) * 1e6, 2),
        "decorated_p99_us": round(percentile(decorated, 99) * 1e6, 2),
        "connections_opened": opened,
        "acl": "-@all +get +set +del ~subflow:state:*",
    }
    return [Figure("hit_restricted_acl_p50", "decorated get, hit, restricted ACL user: p50 / undecorated p50",
                   ratio, "x", "<= 3", ratio <= 3.0,
                   f"the same GET undecorated, same user, alternating calls ({opened} connection(s) opened)",
                   detail)]


# -- throughput: worker processes ---------------------------------------------------


def _throughput_worker(conn: Connection, url: str, worker_no: int) -> None:
    tracer_provider, _ = setup_providers()
    client = redis.Redis.from_url(url)
    run = f"tp-{worker_no}"
    for i in range(50):
        decorated_init(client, run, f"n{i}", "state")
    conn_attrs = {k: v for k, v in span_attrs(client, run, "x", "").items()
                  if k not in (names.ATTR_RUN_ID, names.ATTR_NODE_ID, names.ATTR_STATE_KEY)}
    tracer = tracer_provider.get_tracer("bench")
    variants: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
        "undecorated": (get_state, initialize_state),
        "bare_span": (make_span_get(tracer, conn_attrs), make_span_init(tracer, conn_attrs)),
        "decorated": (decorated_get, decorated_init),
    }
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            break
        variant, duration = message
        get, init = variants[variant]
        ops = 0
        deadline = time.perf_counter() + duration
        while time.perf_counter() < deadline:
            for i in range(50):  # 4 reads per write, as a workflow engine re-reads its state
                if i % 5 == 0:
                    init(client, run, f"n{i}", "state")
                else:
                    get(client, run, f"n{i}")
            ops += 50
        conn.send(ops)
    flush_journals(5.0)
    conn.send("done")


def bench_throughput(url: str, rounds: int, duration: float, workers: int = 4) -> list[Figure]:
    ctx = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    procs = []
    for n in range(workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_throughput_worker, args=(child, url, n), daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    try:
        for pipe in pipes:
            if not pipe.poll(60):
                raise RuntimeError("throughput worker did not start")
            pipe.recv()
        names_ = ["undecorated", "bare_span", "decorated"]
        rates: dict[str, list[float]] = {name: [] for name in names_}
        for round_no in range(rounds):
            shift = round_no % len(names_)
            for variant in names_[shift:] + names_[:shift]:
                for pipe in pipes:
                    pipe.send((variant, duration))
                total = 0
                for pipe in pipes:
                    if not pipe.poll(duration + 60):
                        raise RuntimeError("throughput worker stopped answering")
                    total += int(pipe.recv())
                rates[variant].append(total / duration)
        for pipe in pipes:
            pipe.send(None)
        for pipe in pipes:
            if pipe.poll(30):
                pipe.recv()
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    ratios = [d / u for d, u in zip(rates["decorated"], rates["undecorated"], strict=True)]
    ratio = statistics.median(ratios)
    span_ratios = [b / u for b, u in zip(rates["bare_span"], rates["undecorated"], strict=True)]
    detail = {
        "bare_span_over_undecorated": round(statistics.median(span_ratios), 3),
        "workers": workers, "cores": os.cpu_count(), "rounds": rounds, "seconds_per_round": duration,
        "median_ops_per_s": {k: round(statistics.median(v)) for k, v in rates.items()},
        "mix": "4 gets (hits) : 1 init, each worker its own client and SDK providers",
    }
    return [Figure("throughput_4_workers", f"throughput, {workers} worker processes: decorated / undecorated",
                   ratio, "x", "report and explain", None,
                   f"the same workers undecorated (bare spans: {detail['bare_span_over_undecorated']:.2f}x), "
                   "rotating rounds", detail)]


# -- memory: a child process --------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_child(url: str, operations: int, trace_allocations: bool) -> dict[str, Any]:
    """Run ``operations`` decorated calls; report how much diagnostic state stayed behind.

    Two children run this: one under tracemalloc (what our objects hold), one without
    it (RSS, which tracemalloc's own bookkeeping would inflate).
    """
    import tracemalloc

    setup_providers()
    client = redis.Redis.from_url(url)

    # Every call passes the client (connection attributes, journal, analysis) but the
    # function does no I/O itself: what is left behind is ours, not the app's.
    @instrument_state_get()
    def get(redis: redis.Redis, run_id: str, node_id: str, hit: bool) -> Any:
        return b"state" if hit else None

    @instrument_state_init()
    def init(redis: redis.Redis, run_id: str, node_id: str, ttl_ms: int = 600_000) -> bool:
        return True

    def op(i: int) -> None:
        run = f"mem-{i % 50_000}"
        kind = i % 10
        if kind < 2:
            init(client, run, f"n{i}")
        elif kind == 9:
            get(client, run, f"n{i}", False)  # a miss: analysed within the default rate limit
        else:
            get(client, run, f"n{i}", True)

    for i in range(20_000):  # warm every cache, buffer and free list first
        op(i)
    flush_journals(10.0)
    gc.collect()
    rss_before = _rss_bytes()
    if trace_allocations:
        tracemalloc.start()
        baseline = tracemalloc.take_snapshot()
    started = time.perf_counter()
    for i in range(operations):
        op(i)
    elapsed = time.perf_counter() - started
    flush_journals(30.0)
    gc.collect()
    out: dict[str, Any] = {"operations": operations, "seconds": round(elapsed, 1)}
    if trace_allocations:
        snapshot = tracemalloc.take_snapshot()
        by_file = snapshot.compare_to(baseline, "filename")
        out["traced_growth_bytes"] = sum(s.size_diff for s in by_file)
        out["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        out["top_growth"] = [f"{s.traceback[0].filename.rsplit('/', 3)[-1]}: {s.size_diff / 1e6:.2f} MB"
                             for s in by_file[:5]]
        tracemalloc.stop()
    else:
        out["rss_growth_bytes"] = _rss_bytes() - rss_before
    journal = journal_for(client, get_config())
    out["journal"] = dataclasses.asdict(journal.stats()) if journal is not None else {}
    return out


def bench_memory(url: str, operations: int) -> list[Figure]:
    """The tracemalloc child and the RSS child, side by side (memory is not timed)."""
    children = {
        mode: subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--memory-child", url, str(operations), mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for mode in ("trace", "rss")
    }
    data: dict[str, dict[str, Any]] = {}
    for mode, child in children.items():
        stdout, stderr = child.communicate(timeout=3600)
        if child.returncode != 0:
            raise RuntimeError(f"memory child ({mode}) failed: {stderr[-2000:]}")
        data[mode] = json.loads(stdout.strip().splitlines()[-1])
    traced = data["trace"]["traced_growth_bytes"] / 1e6
    rss = data["rss"]["rss_growth_bytes"] / 1e6
    label = f"{operations:,}"
    baseline = "growth after 20,000 warm-up operations, fresh process"
    return [
        Figure("memory_traced_mb", f"memory after {label} operations: tracemalloc", traced, "MB",
               "<= 10 MB", traced <= 10.0, baseline, data["trace"]),
        Figure("memory_rss_mb", f"memory after {label} operations: RSS (no tracemalloc)", rss, "MB",
               "<= 10 MB", rss <= 10.0, baseline, data["rss"]),
    ]


# -- profile --------------------------------------------------------------------------


def profile_hit(client: redis.Redis, ops: int) -> str:
    from pyinstrument import Profiler

    client.set(f"subflow:state:{RUN}:hit", "state", px=3_600_000)
    decorated_get(client, RUN, "hit")
    profiler = Profiler(interval=0.0001)
    profiler.start()
    for _ in range(ops):
        decorated_get(client, RUN, "hit")
    profiler.stop()
    return str(profiler.output_text(unicode=False, color=False, show_all=False))


# -- main -------------------------------------------------------------------------------


@dataclasses.dataclass
class Scale:
    rounds: int
    ops: int
    miss_calls: int
    tp_rounds: int
    tp_seconds: float
    memory_ops: int
    footprint_runs: int
    acl_calls: int
    tombstones: int


FULL = Scale(rounds=41, ops=500, miss_calls=3000, tp_rounds=6, tp_seconds=3.0, memory_ops=1_000_000,
             footprint_runs=100_000, acl_calls=20_000, tombstones=500)
QUICK = Scale(rounds=5, ops=100, miss_calls=200, tp_rounds=3, tp_seconds=0.5, memory_ops=20_000,
              footprint_runs=5_000, acl_calls=1000, tombstones=30)


def render(figures: list[Figure]) -> str:
    rows = [("figure", "measured", "target", "met", "baseline (same run)")]
    for f in figures:
        met = "" if f.met is None else ("yes" if f.met else "NO")
        rows.append((f.label, f.shown(), f.target or "", met, f.baseline))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |")
        if n == 0:
            lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="scaled-down run (a smoke test, not a measurement)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the table as JSON")
    parser.add_argument("--profile", action="store_true", help="print a pyinstrument profile of the hit path")
    parser.add_argument("--only", default="",
                        help="comma-separated groups: hit,init,miss,paused,acl,commands,throughput,memory,"
                             "footprint,tombstones")
    parser.add_argument("--memory-child", nargs=3, metavar=("URL", "OPS", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        url, ops, mode = args.memory_child
        print(json.dumps(memory_child(url, int(ops), trace_allocations=mode == "trace")))
        return 0
    scale = QUICK if args.quick else FULL
    groups = set(filter(None, args.only.split(","))) or {
        "hit", "init", "miss", "paused", "acl", "commands", "throughput", "memory", "footprint", "tombstones"}
    tracer_provider, _ = setup_providers()
    tracer = tracer_provider.get_tracer("bench")
    started = time.perf_counter()
    with RedisServer() as server:
        client = server.client()
        if args.profile:
            print(profile_hit(client, 20_000 if not args.quick else 2_000))
            return 0
        contrib_client = server.client()
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        RedisInstrumentor.instrument_client(contrib_client, tracer_provider=tracer_provider)
        observer = server.client()
        figures: list[Figure] = []
        if "hit" in groups:
            figures += bench_hit(client, contrib_client, tracer, scale.rounds, scale.ops)
        if "init" in groups:
            figures += bench_init(client, tracer, scale.rounds, scale.ops)
        if "miss" in groups:
            figures += bench_miss(client, scale.miss_calls)
        if "paused" in groups:
            figures += bench_paused_writes(client, observer, max(50, scale.miss_calls // 10))
        if "footprint" in groups:
            figures += bench_journal_footprint(scale.footprint_runs)
        if "acl" in groups:
            figures += bench_acl_hit(server, observer, scale.acl_calls)
        if "tombstones" in groups:
            figures += bench_tombstones(scale.tombstones)
        if "throughput" in groups:
            figures += bench_throughput(server.url(), scale.tp_rounds, scale.tp_seconds)
        if "memory" in groups:
            figures += bench_memory(server.url(), scale.memory_ops)
        if "commands" in groups:
            figures += bench_commands(client, observer)
        flush_journals(5.0)
        tracer_provider.shutdown()
    table = render(figures)
    print(table)
    elapsed = time.perf_counter() - started
    print(f"\n{'quick (smoke) run' if args.quick else 'full run'} in {elapsed:.0f} s; "
          f"python {platform.python_version()}, {os.cpu_count()} cores; JSON: {args.json}")
    document = {
        "command": "python bench/overhead.py" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "seconds": round(elapsed, 1),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "figures": [dataclasses.asdict(f) for f in figures],
        "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
