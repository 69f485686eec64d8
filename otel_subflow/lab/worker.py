"""Lab worker processes: the decorated service in its own process, with its own host identity.

A worker is a spawned Python process that sets ``OTEL_SUBFLOW_HOST_NAME``
(and any other env) before the instrumentation reads it, records its spans in
memory and answers commands over a pipe: init, get, flush. A get answers with
what the caller saw (the value) and what our instrumentation said (the
``subflow.state.missing`` event of its span), so the lab compares verdicts with
the ground truth it injected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

_CTX = multiprocessing.get_context("spawn")


@dataclasses.dataclass
class GetResult:
    """What one decorated get returned, and the verdict its span carried (None on a hit)."""

    value: Any
    outcome: str | None
    verdict: dict[str, Any] | None
    trace_id: str | None
    span_id: str | None
    host: str
    verdict_latency_ms: float | None = None
    url: str = ""


#: Where a worker sends its telemetry (env OTEL_SUBFLOW_LAB_EXPORT): "memory" (only to
#: the lab), "otlp" (configure() from the standard OTEL_* variables), or
#: "file:<dir>" (OTLP-JSON lines, one file per signal and host, for the collector's
#: otlpjsonfile receiver).
EXPORT_ENV = "OTEL_SUBFLOW_LAB_EXPORT"


def _setup_telemetry(service_name: str) -> tuple[Any, Callable[[], None]]:
    """Providers for a worker: always an in-memory copy of the spans for the lab."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_subflow import RunContextSpanProcessor, configure, shutdown
    from otel_subflow._identity import identity

    memory = InMemorySpanExporter()
    mode = os.environ.get(EXPORT_ENV, "memory")
    if mode == "memory":
        provider = TracerProvider(resource=Resource.create({"service.name": service_name, "host.name": identity.host}))
        provider.add_span_processor(RunContextSpanProcessor())
        provider.add_span_processor(SimpleSpanProcessor(memory))
        trace.set_tracer_provider(provider)
        return memory, provider.shutdown
    if mode.startswith("file:"):
        from opentelemetry.exporter.otlp.json.file import FileMetricExporter, FileSpanExporter
        from opentelemetry.exporter.otlp.json.file._log_exporter import FileLogExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        folder = mode[len("file:"):]
        os.makedirs(folder, exist_ok=True)
        base = os.path.join(folder, identity.host)
        telemetry = configure(
            service_name,
            span_exporter=FileSpanExporter(base + ".traces.jsonl"),
            metric_readers=[PeriodicExportingMetricReader(FileMetricExporter(base + ".metrics.jsonl"))],
            log_exporter=FileLogExporter(base + ".logs.jsonl"),
        )
    else:
        telemetry = configure(service_name)
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory, shutdown


def _worker_main(conn: Connection, env: dict[str, str]) -> None:
    os.environ.update(env)
    import redis

    from otel_subflow import flush_journals, names
    from otel_subflow._config import set_config
    from otel_subflow._identity import identity
    from otel_subflow.lab import service

    identity.refresh()
    set_config(None)
    exporter, stop_telemetry = _setup_telemetry(os.environ.get("OTEL_SERVICE_NAME", "subflow-lab"))
    clients: dict[str, redis.Redis] = {}

    def client(url: str) -> redis.Redis:
        if url not in clients:
            clients[url] = redis.Redis.from_url(url, socket_timeout=5)
        return clients[url]

    conn.send(("ready", identity.host))
    while True:
        try:
            command, args = conn.recv()
        except EOFError:
            break
        try:
            if command == "stop":
                flush_journals(5.0)
                stop_telemetry()
                conn.send(("ok", None))
                break
            if command == "init":
                url, run_id, node_id, data, ttl_ms = args
                conn.send(("ok", service.initialize_state(client(url), run_id, node_id, data, ttl_ms=ttl_ms)))
            elif command == "get":
                url, run_id, node_id = args
                exporter.clear()
                started = time.perf_counter()
                value = service.get_state(client(url), run_id, node_id)
                elapsed = (time.perf_counter() - started) * 1000.0
                span = next(s for s in exporter.get_finished_spans() if s.name == names.SPAN_STATE_GET)
                event = next((e for e in span.events if e.name == names.EVENT_STATE_MISSING), None)
                outcome = (span.attributes or {}).get(names.ATTR_STATE_OUTCOME)
                conn.send(("ok", GetResult(
                    value=value,
                    outcome=str(outcome) if outcome is not None else None,
                    verdict=dict(event.attributes or {}) if event is not None else None,
                    trace_id=format(span.context.trace_id, "032x") if span.context else None,
                    span_id=format(span.context.span_id, "016x") if span.context else None,
                    host=identity.host,
                    verdict_latency_ms=elapsed if event is not None else None,
                )))
            elif command == "flush":
                conn.send(("ok", flush_journals(5.0)))
            elif command == "forget_connections":
                for c in clients.values():
                    c.close()
                clients.clear()
                conn.send(("ok", None))
            else:
                conn.send(("error", f"unknown command {command!r}"))
        except Exception as exc:  # noqa: BLE001 - report to the lab, keep serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Worker:
    """A handle on one worker process.

    Example::

        with Worker("worker-a", env={"OTEL_SUBFLOW_JOURNAL_URL": url}) as worker:
            worker.init(state_url, "run-1", "node-1", ttl_ms=100)
            result = worker.get(state_url, "run-1", "node-1")
    """

    def __init__(self, host: str, env: dict[str, str] | None = None, timeout_s: float = 30.0) -> None:
        self.host = host
        self.timeout_s = timeout_s
        full_env = {"OTEL_SUBFLOW_HOST_NAME": host, **(env or {})}
        self._conn, child = _CTX.Pipe()
        self.process = _CTX.Process(target=_worker_main, args=(child, full_env), name=f"lab-{host}", daemon=True)
        self.process.start()
        child.close()
        self._expect("ready")

    def _expect(self, status: str) -> Any:
        if not self._conn.poll(self.timeout_s):
            raise TimeoutError(f"lab worker {self.host} did not answer in {self.timeout_s}s")
        got, payload = self._conn.recv()
        if got != status:
            raise RuntimeError(f"lab worker {self.host}: {payload}")
        return payload

    def _call(self, command: str, *args: Any) -> Any:
        self._conn.send((command, args))
        return self._expect("ok")

    def init(self, url: str, run_id: str, node_id: str, data: str = "state", ttl_ms: int = 60_000) -> bool:
        return bool(self._call("init", url, run_id, node_id, data, ttl_ms))

    def get(self, url: str, run_id: str, node_id: str) -> GetResult:
        result: GetResult = self._call("get", url, run_id, node_id)
        result.url = url
        return result

    def flush(self) -> bool:
        return bool(self._call("flush"))

    def forget_connections(self) -> None:
        self._call("forget_connections")

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError, EOFError, TimeoutError, RuntimeError):
                self._call("stop")
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
