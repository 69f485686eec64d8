"""Which exporter each signal gets: the one place that reads ``OTEL_{TRACES,METRICS,LOGS}_EXPORTER``.

Exporters are found by name through the entry points the OpenTelemetry packages
register (``opentelemetry_traces_exporter`` ...), as ``opentelemetry-instrument``
does: ``otlp`` (gRPC or HTTP by ``OTEL_EXPORTER_OTLP[_<SIGNAL>]_PROTOCOL``),
``console``, ``none``, or any installed exporter's name (``otlp_json_file``, a
vendor's). Only the first of a comma-separated list is used.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points
from typing import Literal

from otel_subflow import names

_log = logging.getLogger(names.LOGGER_NAME)

Signal = Literal["traces", "metrics", "logs"]

#: The OTLP protocols and the entry-point names of their exporters.
_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


def exporter_name(signal: Signal) -> str | None:
    """The entry-point name of the exporter the environment asks for (``None``: none)."""
    upper = signal.upper()
    value = os.environ.get(f"OTEL_{upper}_EXPORTER", "otlp").strip().lower()
    choice = value.split(",")[0].strip() if value else "otlp"
    if choice == "none":
        return None
    if choice == "otlp":
        protocol = (os.environ.get(f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
        return _OTLP_BY_PROTOCOL.get(protocol, "otlp_proto_grpc")
    return choice


def exporter_for(signal: Signal) -> object | None:
    """A new exporter for ``signal`` as the environment asks; ``None`` for ``none`` or one not installed."""
    name = exporter_name(signal)
    if name is None:
        return None
    found = entry_points(group=f"opentelemetry_{signal}_exporter", name=name)
    if not found:
        _log.warning("OTEL_%s_EXPORTER: no exporter named %r is installed; %s are not exported",
                     signal.upper(), name, signal)
        return None
    exporter: object = next(iter(found)).load()()
    return exporter
