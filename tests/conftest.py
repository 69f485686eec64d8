"""Test harness: a real redis-server per session (a Redis Cluster too, for the tests that ask), in-memory
OpenTelemetry exporters.

A missing redis-server fails the session; it skips only on a developer's
machine that sets OTEL_SUBFLOW_ALLOW_SKIP=1 (never in CI).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

# Our own bugs must fail tests instead of being swallowed by the error boundary.
os.environ.setdefault("OTEL_SUBFLOW_RAISE_INTERNAL_ERRORS", "1")

from otel_subflow import RunContextSpanProcessor
from otel_subflow._journal.location import flush_journals
from otel_subflow._runtime import runtime
from otel_subflow.lab.cluster import ClusterServers, find_redis_cli
from otel_subflow.lab.process import RedisServerError
from otel_subflow.lab.servers import RedisServer, find_redis_server
from tests.browser import chromium_path


def service_missing(what: str) -> None:
    """Fail (CI) or skip (a laptop with OTEL_SUBFLOW_ALLOW_SKIP=1) when a needed service is absent."""
    if os.environ.get("OTEL_SUBFLOW_ALLOW_SKIP") == "1" and not os.environ.get("CI"):
        pytest.skip(what)
    pytest.fail(what + " (set OTEL_SUBFLOW_ALLOW_SKIP=1 to skip on a developer machine)")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    try:
        server = RedisServer().start()
    except RedisServerError as exc:
        service_missing(str(exc))
        raise
    yield server
    server.cleanup()


_SPAN_EXPORTER = InMemorySpanExporter()
_METRIC_READER = InMemoryMetricReader()
_TRACER_PROVIDER = TracerProvider(resource=Resource.create({"service.name": "otel-subflow-tests"}))
_TRACER_PROVIDER.add_span_processor(RunContextSpanProcessor())
_TRACER_PROVIDER.add_span_processor(SimpleSpanProcessor(_SPAN_EXPORTER))
_METER_PROVIDER = MeterProvider(metric_readers=[_METRIC_READER])
trace.set_tracer_provider(_TRACER_PROVIDER)
metrics.set_meter_provider(_METER_PROVIDER)


@pytest.fixture
def spans() -> Iterator[Callable[[], list[ReadableSpan]]]:
    """Finished spans of this test, oldest first."""
    _SPAN_EXPORTER.clear()
    yield lambda: list(_SPAN_EXPORTER.get_finished_spans())
    _SPAN_EXPORTER.clear()


@pytest.fixture
def metric_points() -> Callable[[str], list[Any]]:
    """All data points of a metric by name (cumulative over the session: compare deltas)."""

    def read(name: str) -> list[Any]:
        data = _METRIC_READER.get_metrics_data()
        points: list[Any] = []
        if data is None:
            return points
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        points.extend(metric.data.data_points)
        return points

    return read


@pytest.fixture
def all_metrics() -> Callable[[], list[Any]]:
    def read() -> list[Any]:
        data = _METRIC_READER.get_metrics_data()
        out: list[Any] = []
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                out.extend(sm.metrics)
        return out

    return read


def _reset_state() -> None:
    flush_journals(2.0)
    runtime.reset()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client to db 0 of the session's server, on an emptied server with fresh otel-subflow state."""
    _reset_state()
    client = redis_server.client()
    client.flushall()
    yield client
    _reset_state()
    client.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ClusterServers]:
    """One Redis Cluster per session: six nodes on loopback, three masters with a replica each."""
    try:
        find_redis_server()
        find_redis_cli()
    except RedisServerError as exc:
        service_missing(str(exc))
        raise
    lab = ClusterServers().start()  # a server that is there but fails to start fails the session
    yield lab
    lab.stop()


@pytest.fixture
def cluster(redis_cluster: ClusterServers) -> Iterator[ClusterServers]:
    """The session's cluster with every node running (a test's kills undone) and ok everywhere, emptied on
    every master and replica, with fresh otel-subflow state. Its topology is whatever earlier failovers left:
    ask it (``masters()``, ``owner_of()``), never assume."""
    _reset_state()
    redis_cluster.heal()
    redis_cluster.flushall()
    yield redis_cluster
    _reset_state()


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command from INFO commandstats (``cmdstat_get`` -> ``get``)."""
    stats = client.info("commandstats")
    out: dict[str, int] = {}
    for name, value in stats.items():
        command = re.sub(r"^cmdstat_", "", name)
        out[command] = int(value["calls"]) if isinstance(value, dict) else 0
    return out


def commandstats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Calls made between two readings, less the INFO of the first reading itself."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    delta["info"] = delta.get("info", 0) - 1
    return {k: v for k, v in delta.items() if v}


@pytest.fixture(scope="module")  # (not longer: Playwright's sync API keeps an event loop running)
def browser() -> Iterator[Any]:
    """Headless Chromium from the system (never a browser download)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_missing("Playwright is not installed (pip install -e '.[test]')")
        raise
    executable = chromium_path()
    if executable is None:
        service_missing("chromium is not installed (apt-get install chromium)")
        raise AssertionError("unreachable")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable)
        yield launched
        launched.close()
