"""One side of traces that cross two hosts, for tests/e2e/test_two_tier.py.

The bare OpenTelemetry SDK, exporting OTLP/gRPC to the agent that OTEL_EXPORTER_OTLP_ENDPOINT names.

caller: opens a root span `e2e.hop.call` per trace (`--kept` and `--control` of them, alternating),
  prints one JSON line {"carriers": [{"kind", "trace_id", "carrier"}]} (W3C trace context) while the
  spans are still open, and ends and flushes them when a line arrives on stdin (the callee is done).
callee: reads that line on stdin and serves each carrier with a `subflow.state.get` span, a child of
  the caller's root: with the `subflow.state.missing` event on the kept traces (status left UNSET, so
  only the span-event policy can keep them) and a hit on the control ones.

Both then export a counter `--flushes` times (one OTLP export each), so a test sees where one SDK's
metric stream lands. Last line: {"done": <spans>}.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from otel_subflow import names

PROPAGATOR = TraceContextTextMapPropagator()


def call(tracer: Tracer, kept: int, control: int) -> int:
    kinds = [kind for i in range(max(kept, control)) for kind, n in (("kept", kept), ("control", control)) if i < n]
    spans, carriers = [], []
    for kind in kinds:
        span = tracer.start_span("e2e.hop.call", kind=SpanKind.CLIENT, attributes={"e2e.hop.kind": kind})
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=set_span_in_context(span))
        spans.append(span)
        trace_id = format(span.get_span_context().trace_id, "032x")
        carriers.append({"kind": kind, "trace_id": trace_id, "carrier": carrier})
    print(json.dumps({"carriers": carriers}), flush=True)
    sys.stdin.readline()  # the callee has served every carrier
    for span in spans:
        span.end()
    return len(spans)


def serve(tracer: Tracer) -> int:
    carriers = json.loads(sys.stdin.readline())["carriers"]
    for i, item in enumerate(carriers):
        parent = PROPAGATOR.extract(item["carrier"])
        run_id = f"two-tier-{item['trace_id'][:8]}"
        with tracer.start_as_current_span(names.SPAN_STATE_GET, context=parent) as span:
            span.set_attributes({names.ATTR_RUN_ID: run_id, names.ATTR_NODE_ID: f"node-{i}"})
            if item["kind"] == "kept":
                span.set_attribute(names.ATTR_STATE_OUTCOME, names.OUTCOME_MISS)
                span.add_event(
                    names.EVENT_STATE_MISSING,
                    {names.ATTR_MISSING_CAUSE: names.CAUSE_EXPIRED, names.ATTR_MISSING_CONFIDENCE: "definitive"},
                )
            else:
                span.set_attribute(names.ATTR_STATE_OUTCOME, names.OUTCOME_HIT)
    return len(carriers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["caller", "callee"])
    parser.add_argument("--kept", type=int, default=0)
    parser.add_argument("--control", type=int, default=0)
    parser.add_argument("--flushes", type=int, default=0)
    args = parser.parse_args()

    resource = Resource.create({"host.name": socket.gethostname()})  # + OTEL_SERVICE_NAME
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    # Exports only on force_flush below: one OTLP request per flush.
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=600_000)
    mp = MeterProvider(resource=resource, metric_readers=[reader])
    tracer = tp.get_tracer("e2e.two_tier")
    done = call(tracer, args.kept, args.control) if args.role == "caller" else serve(tracer)
    assert tp.force_flush(), "span export did not finish"
    hops = mp.get_meter("e2e.two_tier").create_counter("e2e.two_tier.hops")
    for _ in range(args.flushes):
        hops.add(1, {"e2e.hop.role": args.role})
        assert mp.force_flush(), "metric export did not finish"
    tp.shutdown()
    mp.shutdown()
    print(json.dumps({"done": done}), flush=True)


if __name__ == "__main__":
    main()
