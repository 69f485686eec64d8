"""Run context: ``subflow.run_id`` / ``subflow.node_id`` travel in baggage.

Jaeger's tag search matches within one span, so every span started inside a
decorated call (the contrib Redis spans, HTTP client spans) must carry the ids.
The decorators put them in baggage; :class:`RunContextSpanProcessor` copies them
onto each span as it starts.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import baggage, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from otel_subflow import names

_RUN_CONTEXT_KEYS = (names.ATTR_RUN_ID, names.ATTR_NODE_ID)


def with_run_context(run_id: str | None, node_id: str | None, ctx: Context | None = None) -> Context:
    """A context whose baggage carries the run and node ids (``None`` ones are left out)."""
    if run_id is not None:
        ctx = baggage.set_baggage(names.ATTR_RUN_ID, run_id, ctx)
    if node_id is not None:
        ctx = baggage.set_baggage(names.ATTR_NODE_ID, node_id, ctx)
    return ctx if ctx is not None else Context()


class RunContextSpanProcessor(SpanProcessor):
    """Copies the run and node ids from baggage onto every span started in a decorated call.

    ``configure()`` installs it. Applications that set up OpenTelemetry
    themselves add it to their provider::

        provider.add_span_processor(RunContextSpanProcessor())
    """

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        entries = baggage.get_all(parent_context)
        if not entries:
            return
        current = span.attributes
        for key in _RUN_CONTEXT_KEYS:
            value = entries.get(key)
            if value is not None:
                text = str(value)
                # The decorators' own spans start with the ids: setting them again costs
                # a lock and a validation per attribute on every decorated call.
                if current is None or current.get(key) != text:
                    span.set_attribute(key, text)

    def on_end(self, span: ReadableSpan) -> None:
        return None

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def add_run_context(provider: Any = None) -> bool:
    """Add the run-context span processor to ``provider`` (default: the global one) once.

    Only an SDK tracer provider takes processors; True when it has ours now."""
    provider = provider if provider is not None else trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return False
    if not getattr(provider, "_otel_subflow_run_context", False):
        provider.add_span_processor(RunContextSpanProcessor())
        provider._otel_subflow_run_context = True  # type: ignore[attr-defined]
    return True
