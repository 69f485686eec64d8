"""Zero-code: what makes ``opentelemetry-instrument`` configure the SDK with otel-subflow alone.

``opentelemetry-instrument`` sets nothing up by itself: it asks the installed
*distro* (entry point ``opentelemetry_distro``) for defaults and the installed
*configurator* (``opentelemetry_configurator``) to build the SDK's providers and
exporters from the ``OTEL_*`` variables. Without one, nothing is exported. These
two are otel-subflow's, so that ``pip install otel-subflow`` is enough:

- :class:`SubflowDistro` defaults the exporters to OTLP (as ``opentelemetry-distro``
  does); every ``OTEL_*`` variable set wins.
- :class:`SubflowConfigurator` is the SDK's own configurator.

When ``opentelemetry-distro`` (or a vendor's) is installed too, pick one with
``OTEL_PYTHON_DISTRO`` / ``OTEL_PYTHON_CONFIGURATOR``; either way
:class:`~otel_subflow.SubflowInstrumentor` adds the run-context span processor to
the SDK's tracer provider, so every span in a decorated call (the Redis command
spans included) carries the run and node ids.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry.instrumentation.distro import BaseDistro  # type: ignore[attr-defined]
from opentelemetry.sdk._configuration import _OTelSDKConfigurator

#: The defaults of ``opentelemetry-distro``: OTLP for every signal, over gRPC.
DEFAULTS = {
    "OTEL_TRACES_EXPORTER": "otlp",
    "OTEL_METRICS_EXPORTER": "otlp",
    "OTEL_LOGS_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
}


class SubflowDistro(BaseDistro):  # type: ignore[misc]
    """Defaults for ``opentelemetry-instrument``: OTLP exporters unless ``OTEL_*`` says otherwise."""

    def _configure(self, **kwargs: Any) -> None:
        for name, value in DEFAULTS.items():
            os.environ.setdefault(name, value)


class SubflowConfigurator(_OTelSDKConfigurator):
    """The SDK's configurator: providers, processors and exporters from the ``OTEL_*`` variables."""


__all__ = ["SubflowConfigurator", "SubflowDistro"]
