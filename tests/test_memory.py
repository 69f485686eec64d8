"""Diagnostic state stays bounded: caps on queues and caches, measured with tracemalloc."""

from __future__ import annotations

import gc
import logging
import tracemalloc

import pytest
from opentelemetry.sdk.trace import TracerProvider

from otel_subflow import SubflowConfig, flush_journals, instrument_state_get, instrument_state_init, names
from otel_subflow._config import set_config
from otel_subflow._runtime import runtime

BUDGET_BYTES = 10 * 1024 * 1024


@pytest.fixture
def quiet_logs():
    """Log records are the application's handlers' to keep; pytest's capture would keep them all."""
    subflow = logging.getLogger(names.LOGGER_NAME)
    level = subflow.level
    subflow.setLevel(logging.ERROR)
    yield
    subflow.setLevel(level)


@pytest.mark.slow
def test_hundred_thousand_operations_stay_within_budget(r, redis_server, quiet_logs):
    """100,000 mixed hits, inits and misses grow traced memory by less than 10 MB."""
    set_config(SubflowConfig(analysis_rate_per_s=50.0, analysis_burst=50))
    provider = TracerProvider()  # a real SDK provider with no exporter: spans are not kept anywhere
    app = redis_server.client()

    @instrument_state_get(tracer_provider=provider)
    def get(redis, run_id, node_id, hit):
        return b"state" if hit else None

    @instrument_state_init(tracer_provider=provider)
    def init(redis, run_id, node_id, ttl_ms=60_000):
        return True

    for i in range(2_000):  # warm every cache and buffer before measuring
        get(app, f"run-{i}", "n", i % 2 == 0)
        init(app, f"run-{i}", "n")
    flush_journals()
    gc.collect()
    tracemalloc.start()
    baseline = tracemalloc.take_snapshot()
    for i in range(100_000):
        run = f"run-{i % 5000}"
        if i % 4 == 0:
            init(app, run, f"n{i}")
        else:
            get(app, run, f"n{i}", i % 4 != 3)
    flush_journals()
    gc.collect()
    growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(baseline, "filename"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"\ntraced growth after 100k operations: {growth / 1e6:.2f} MB (peak {peak / 1e6:.2f} MB)")
    assert growth < BUDGET_BYTES
    assert len(runtime.recent_misses) <= runtime.recent_misses.capacity
    app.close()
