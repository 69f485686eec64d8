"""Tracer, meter instruments and the structured logger the decorators share."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from otel_subflow import names
from otel_subflow._runtime import runtime
from otel_subflow._version import __version__

logger = logging.getLogger(names.LOGGER_NAME)


class Instruments:
    """The tracer and metric instruments of one decorator.

    Taken from the providers passed in, or from the global ones. Global
    providers set later (``configure()`` after import) are picked up, since the
    API hands out proxies until a real provider is set.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.tracer = trace.get_tracer(
            names.INSTRUMENTATION_NAME, __version__, tracer_provider
        )
        meter = metrics.get_meter(names.INSTRUMENTATION_NAME, __version__, meter_provider)
        self.duration = meter.create_histogram(
            names.METRIC_OPERATION_DURATION,
            unit="s",
            description="Duration of decorated sub-flow state operations.",
            explicit_bucket_boundaries_advisory=list(names.DB_DURATION_BUCKETS),
        )
        self.missing = meter.create_counter(
            names.METRIC_STATE_MISSING,
            unit="{miss}",
            description="Sub-flow state reads that found nothing, by root cause.",
        )
        self.corrected = meter.create_counter(
            names.METRIC_STATE_MISSING_CORRECTED,
            unit="{miss}",
            description="Missing-state verdicts corrected later (a race found after the miss), by previous "
                        "and new cause: add to subflow.state.missing for the corrected counts.",
        )


def default_instruments() -> Instruments:
    """Instruments bound to the global providers, shared by all decorators that use them."""
    instruments = runtime.instruments
    if instruments is None:
        instruments = runtime.instruments = Instruments()
    return instruments


def instruments_of(instruments: Instruments | None) -> Instruments:
    """A decorator's instruments, or the global ones for records no decorator made (tombstones)."""
    return instruments if instruments is not None else default_instruments()


def log_fields(span: trace.Span | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Structured fields for a log record, plus hex trace and span ids.

    The OTel logging handler correlates records with the current span by
    itself; the explicit ids serve plain stdlib formatters and JSON logs.
    """
    out = dict(fields)
    if span is not None:
        ctx = span.get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
    return out


def emit_log(level: int, message: str, span: trace.Span | None, fields: Mapping[str, Any]) -> None:
    """Emit one of the contract's log records with structured ``extra`` fields."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra=log_fields(span, fields))
