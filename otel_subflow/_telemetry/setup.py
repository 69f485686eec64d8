"""``configure()``: one call that sets up OpenTelemetry for an application.

Applications that configure OpenTelemetry themselves skip this: the decorators
use the global providers (or the ones passed to them). They should add
:class:`RunContextSpanProcessor` to their tracer provider.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
import weakref
from collections.abc import Mapping
from typing import Any, TypeVar

from opentelemetry import metrics, trace
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from otel_subflow import names
from otel_subflow._boundary import internal_errors
from otel_subflow._config import SubflowConfig, set_config
from otel_subflow._identity import identity
from otel_subflow._instrument.context import add_run_context
from otel_subflow._journal.location import flush_journals
from otel_subflow._runtime import runtime
from otel_subflow._telemetry.exporters import Signal, exporter_for
from otel_subflow._watch.lease import start_watching, stop_watching

_log = logging.getLogger(names.LOGGER_NAME)
_E = TypeVar("_E")


@dataclasses.dataclass
class Telemetry:
    """The providers ``configure()`` built; call :meth:`shutdown` (or :func:`shutdown`) at exit."""

    resource: Resource
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    logger_provider: LoggerProvider | None
    log_handler: logging.Handler | None

    def force_flush(self, timeout_millis: int = 5000) -> None:
        flush_journals(timeout_millis / 1000.0)
        self.tracer_provider.force_flush(timeout_millis)
        self.meter_provider.force_flush(timeout_millis)
        if self.logger_provider is not None:
            self.logger_provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        stop_watching(2.0)
        flush_journals(2.0)
        if self.log_handler is not None:
            logging.getLogger(names.LOGGER_NAME).removeHandler(self.log_handler)
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self.logger_provider is not None:
            self.logger_provider.shutdown()


def build_resource(service_name: str | None = None, attributes: Mapping[str, Any] | None = None) -> Resource:
    """host.name, process.pid, service.name, service.instance.id (+ OTEL_RESOURCE_ATTRIBUTES)."""
    attrs: dict[str, Any] = {
        names.RES_HOST_NAME: identity.host,
        names.RES_PROCESS_PID: os.getpid(),
        names.RES_SERVICE_INSTANCE_ID: str(uuid.uuid4()),
    }
    name = service_name or os.environ.get("OTEL_SERVICE_NAME")
    if name:
        attrs[names.RES_SERVICE_NAME] = name
    attrs.update(attributes or {})
    return Resource.create(attrs)


def _exporter(signal: Signal, kind: type[_E]) -> _E | None:
    exporter = exporter_for(signal)
    if exporter is not None and not isinstance(exporter, kind):
        _log.warning("the %s exporter %s is not a %s; %s are not exported", signal, type(exporter).__name__,
                     kind.__name__, signal)
        return None
    return exporter


def configure(
    service_name: str | None = None,
    *,
    resource_attributes: Mapping[str, Any] | None = None,
    span_exporter: SpanExporter | None = None,
    metric_readers: list[MetricReader] | None = None,
    log_exporter: LogRecordExporter | None = None,
    instrument_redis: bool = True,
    redis_metrics: bool = True,
    config: SubflowConfig | None = None,
) -> Telemetry:
    """Set up tracer, meter and logger providers for an application, and make them global.

    Exporters come from the standard ``OTEL_*`` variables (OTLP over gRPC by
    default; ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL``,
    ``OTEL_TRACES_EXPORTER=none|console|otlp`` ...) unless given here. Also
    installs the run-context span processor, sends the ``otel_subflow`` log
    records through OpenTelemetry, instruments redis-py's commands with
    opentelemetry-instrumentation-redis, turns on redis-py's own metrics, and takes part in
    electing one keyspace watcher per Redis master (``OTEL_SUBFLOW_WATCH=false`` to opt out)::

        from otel_subflow import configure
        telemetry = configure(service_name="workflow-engine")
    """
    if config is not None:
        set_config(config)
    resource = build_resource(service_name, resource_attributes)

    tracer_provider = TracerProvider(resource=resource)
    add_run_context(tracer_provider)
    exporter = span_exporter if span_exporter is not None else _exporter("traces", SpanExporter)
    if exporter is not None:
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))

    readers = list(metric_readers or [])
    if metric_readers is None:
        metric_exporter = _exporter("metrics", MetricExporter)  # type: ignore[type-abstract]
        if metric_exporter is not None:
            readers.append(PeriodicExportingMetricReader(metric_exporter))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)

    logger_provider: LoggerProvider | None = None
    handler: logging.Handler | None = None
    log_out = log_exporter if log_exporter is not None else _exporter(
        "logs", LogRecordExporter)  # type: ignore[type-abstract]
    if log_out is not None:
        logger_provider = LoggerProvider(resource=resource)
        logger_provider.add_log_record_processor(BatchLogRecordProcessor(log_out))
        handler = LoggingHandler(level=logging.NOTSET, logger_provider=logger_provider)
        subflow_logger = logging.getLogger(names.LOGGER_NAME)
        subflow_logger.addHandler(handler)
        if subflow_logger.level == logging.NOTSET:
            subflow_logger.setLevel(logging.INFO)

    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)

    if instrument_redis:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        instrumentor = RedisInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=tracer_provider)
    if redis_metrics:
        try:
            from redis.observability import OTelConfig, get_observability_instance

            get_observability_instance().init(OTelConfig())
        except Exception as exc:  # noqa: BLE001 - optional extra; report and go on
            _log.warning("redis-py observability metrics not enabled: %s", exc)

    start_watching()
    telemetry = runtime.telemetry = Telemetry(resource, tracer_provider, meter_provider, logger_provider, handler)
    _refresh_pid_after_fork(telemetry)
    return telemetry


def _refresh_pid_after_fork(telemetry: Telemetry) -> None:
    """A forked child's telemetry must name the child: put its pid into the providers' resource.

    The SDK's providers already merge process-dependent detector output into their
    resource after fork (``_update_resource``); ``process.pid`` is ours, set by
    :func:`build_resource`, so we merge it the same way.
    """
    ref = weakref.ref(telemetry)

    def after_in_child() -> None:
        current = ref()
        if current is None:
            return
        with internal_errors("setup.fork_resource"):
            pid = Resource({names.RES_PROCESS_PID: os.getpid()})
            for provider in (current.tracer_provider, current.meter_provider, current.logger_provider):
                if provider is not None:
                    provider._update_resource(pid)  # the SDK's own after-fork path
            current.resource = current.resource.merge(pid)

    os.register_at_fork(after_in_child=after_in_child)


def shutdown() -> None:
    """Flush the journal and the providers ``configure()`` built, then shut them down."""
    telemetry, runtime.telemetry = runtime.telemetry, None
    if telemetry is not None:
        telemetry.shutdown()
    else:
        flush_journals(2.0)
