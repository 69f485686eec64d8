"""Emit contract-shaped telemetry with the bare OpenTelemetry SDK (no otel_subflow).

Proves the collector / Jaeger / Prometheus / vendor plumbing independently of the
package: each "run" is a trace `e2e.step` -> `subflow.state.get` with the contract
attributes; a missing run adds the `subflow.state.missing` event and status ERROR,
a quiet_missing run has the event but status UNSET (the package's "no error
status on a miss" option), an error run has status ERROR and no event. Prints one
JSON line: {"success": [run_id...], "missing": [...], "quiet_missing": [...],
"error": [...], "trace_ids": {run_id: hex}}.
"""

from __future__ import annotations

import argparse
import json
import socket
import time

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--success", type=int, default=0)
    parser.add_argument("--missing", type=int, default=0)
    parser.add_argument("--quiet-missing", type=int, default=0)
    parser.add_argument("--error", type=int, default=0)
    parser.add_argument("--protocol", default="grpc")
    args = parser.parse_args()

    resource = Resource.create({"host.name": socket.gethostname()})  # + OTEL_SERVICE_NAME
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(BatchSpanProcessor(GrpcSpans() if args.protocol == "grpc" else HttpSpans()))
    reader = PeriodicExportingMetricReader(
        GrpcMetrics() if args.protocol == "grpc" else HttpMetrics(), export_interval_millis=500
    )
    mp = MeterProvider(resource=resource, metric_readers=[reader])
    tracer = tp.get_tracer("e2e.raw")
    meter = mp.get_meter("e2e.raw")
    duration = meter.create_histogram("subflow.state.operation.duration", unit="s")
    missing = meter.create_counter("subflow.state.missing", unit="{miss}")

    out: dict[str, object] = {"success": [], "missing": [], "quiet_missing": [], "error": [], "trace_ids": {}}
    trace_ids: dict[str, str] = out["trace_ids"]  # type: ignore[assignment]
    kinds = (
        ("success", args.success),
        ("missing", args.missing),
        ("quiet_missing", args.quiet_missing),
        ("error", args.error),
    )
    for kind, count in kinds:
        for i in range(count):
            run_id = f"{args.prefix}-{kind}-{i}"
            node_id = f"node-{i}"
            with tracer.start_as_current_span("e2e.step") as root:
                trace_ids[run_id] = format(root.get_span_context().trace_id, "032x")
                start = time.perf_counter()
                with tracer.start_as_current_span("subflow.state.get") as span:
                    span.set_attributes(
                        {
                            "subflow.run_id": run_id,
                            "subflow.node_id": node_id,
                            "subflow.state.key": f"subflow:state:{run_id}:{node_id}",
                            "server.address": "127.0.0.1",
                            "server.port": 6379,
                        }
                    )
                    outcome = {"success": "hit", "missing": "miss", "quiet_missing": "miss", "error": "error"}[kind]
                    span.set_attribute("subflow.state.outcome", outcome)
                    if kind in ("missing", "quiet_missing"):
                        span.add_event(
                            "subflow.state.missing",
                            {"subflow.missing.cause": "expired", "subflow.missing.confidence": "definitive"},
                        )
                        if kind == "missing":
                            span.set_status(Status(StatusCode.ERROR, "state missing: expired"))
                        missing.add(1, {"subflow.missing.cause": "expired"})
                    elif kind == "error":
                        span.set_status(Status(StatusCode.ERROR, "ConnectionError"))
                duration.record(
                    time.perf_counter() - start, {"subflow.state.operation": "get", "subflow.state.outcome": outcome}
                )
            out[kind].append(run_id)  # type: ignore[attr-defined]
    tp.force_flush()
    tp.shutdown()
    mp.force_flush()
    mp.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
