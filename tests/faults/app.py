"""The application under fault, in its own process: ``python tests/faults/app.py MODE ...``.

Modes (each prints one JSON line on stdout at the end):

``load REDIS_URL SECONDS``
    configure() from the environment (OTLP exporters), then decorated inits and
    gets for SECONDS; reports each call's wall-clock start and latency.
``fork REDIS_URL RUN_ID SPANS_FILE``
    configure() with a file exporter, queue inits, fork, init in the child too;
    every exported span is one JSON line with the exporting pid.
``secrets REDIS_URL RUN_ID OUT_DIR``
    configure() with file exporters for spans, logs and metrics, plus a stdlib
    log file at DEBUG; hits, inits, misses and a connection error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from redis.backoff import NoBackoff
from redis.retry import Retry

import otel_subflow
from otel_subflow import flush_journals, instrument_state_get, instrument_state_init


@instrument_state_init()
def initialize_state(redis: redis.Redis, run_id: str, node_id: str, data: str, ttl_ms: int = 60_000) -> bool:
    return bool(redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms))


@instrument_state_get()
def get_state(redis: redis.Redis, run_id: str, node_id: str) -> Any:
    return redis.get(f"subflow:state:{run_id}:{node_id}")


class JsonLinesSpanExporter(SpanExporter):
    """Appends each exported span as one JSON line (with the exporting pid)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.path.open("a", encoding="utf-8") as out:
            for span in spans:
                record = json.loads(span.to_json())
                record["exported_by_pid"] = os.getpid()
                out.write(json.dumps(record) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class JsonLinesLogExporter(LogRecordExporter):
    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        with self.path.open("a", encoding="utf-8") as out:
            for record in batch:
                out.write(record.to_json(indent=None) + "\n")
        return LogRecordExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def shutdown(self) -> None:
        return None


class EveryField(logging.Formatter):
    """Every attribute of the record, structured ``extra`` fields included."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname} {record.getMessage()} {record.__dict__!r}"


def load(url: str, seconds: float) -> dict[str, Any]:
    telemetry = otel_subflow.configure(service_name="fault-load")
    client = redis.Redis.from_url(url, socket_timeout=5)
    calls: list[tuple[float, float]] = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        started_wall = time.time()
        started = time.perf_counter()
        if i % 5 == 0:
            initialize_state(client, "load-run", f"n{i % 100}", "state")
        elif i % 50 == 7:
            get_state(client, "load-run", f"absent-{i}")  # a miss: analysis and a verdict log
        else:
            get_state(client, "load-run", f"n{(i // 5 * 5) % 100}")
        calls.append((started_wall, time.perf_counter() - started))
        i += 1
    flush_started = time.perf_counter()
    telemetry.shutdown()
    return {"calls": calls, "shutdown_s": time.perf_counter() - flush_started}


def fork(url: str, run_id: str, spans_file: Path) -> dict[str, Any]:
    config = otel_subflow.SubflowConfig(journal_flush_interval_s=30.0, journal_batch_size=10_000)
    telemetry = otel_subflow.configure(
        service_name="fault-fork", span_exporter=JsonLinesSpanExporter(spans_file),
        metric_readers=[InMemoryMetricReader()], log_exporter=None, instrument_redis=False,
        redis_metrics=False, config=config,
    )
    client = redis.Redis.from_url(url)
    for n in range(5):  # queued in the journal and the span processor, not yet written
        initialize_state(client, run_id, f"parent-{n}", "state")
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child_client = redis.Redis.from_url(url)
            for n in range(5):
                initialize_state(child_client, run_id, f"child-{n}", "state")
            get_state(child_client, run_id, "child-0")
            ok = flush_journals(10.0)
            telemetry.shutdown()
            code = 0 if ok else 3
        except BaseException:  # noqa: BLE001 - the child reports through its exit code
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    flushed = flush_journals(10.0)
    telemetry.shutdown()
    return {"parent_pid": os.getpid(), "child_pid": pid, "child_exit": os.waitstatus_to_exitcode(status),
            "parent_flushed": flushed}


def secrets(url: str, run_id: str, out_dir: Path) -> dict[str, Any]:
    reader = InMemoryMetricReader()
    telemetry = otel_subflow.configure(
        service_name="fault-secrets", span_exporter=JsonLinesSpanExporter(out_dir / "spans.jsonl"),
        metric_readers=[reader], log_exporter=JsonLinesLogExporter(out_dir / "otel-logs.jsonl"),
    )
    handler = logging.FileHandler(out_dir / "app.log")
    handler.setFormatter(EveryField())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.getLogger("otel_subflow").setLevel(logging.DEBUG)
    client = redis.Redis.from_url(url)
    for n in range(3):
        initialize_state(client, run_id, f"n{n}", "state")
        get_state(client, run_id, f"n{n}")
    get_state(client, run_id, "never-written")
    flush_journals(5.0)
    get_state(client, run_id, "never-written-2")
    # A connection error: same credentials, nothing listening on the port.
    dead = redis.Redis.from_url(url.rsplit(":", 1)[0] + ":1/0", socket_connect_timeout=0.5,
                                retry=Retry(NoBackoff(), 0))
    with contextlib.suppress(redis.ConnectionError):
        get_state(dead, run_id, "n0")
    flush_journals(5.0)
    telemetry.force_flush()
    data = reader.get_metrics_data()
    (out_dir / "metrics.json").write_text(data.to_json() if data is not None else "{}")
    telemetry.shutdown()
    return {"ok": True}


def main(argv: Sequence[str]) -> int:
    mode = argv[0]
    if mode == "load":
        result = load(argv[1], float(argv[2]))
    elif mode == "fork":
        result = fork(argv[1], argv[2], Path(argv[3]))
    elif mode == "secrets":
        result = secrets(argv[1], argv[2], Path(argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
