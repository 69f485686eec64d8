"""Run context: spans started inside a decorated call carry subflow.run_id / node_id."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import baggage, trace
from opentelemetry.instrumentation.redis import RedisInstrumentor

from otel_subflow import instrument_state_get, names
from tests.service import get_state, initialize_state


@pytest.fixture
def redis_instrumented() -> Iterator[None]:
    instrumentor = RedisInstrumentor()
    instrumentor.instrument(tracer_provider=trace.get_tracer_provider())
    yield
    instrumentor.uninstrument()


def test_contrib_redis_get_span_carries_run_and_node(r, spans, redis_instrumented):
    """opentelemetry-instrumentation-redis's GET span nests under ours and carries the ids."""
    initialize_state(r, "run-ctx", "node-ctx", "v")
    get_state(r, "run-ctx", "node-ctx")
    ours = next(s for s in spans() if s.name == names.SPAN_STATE_GET)
    redis_gets = [s for s in spans() if s.name == "GET"]
    assert len(redis_gets) == 1, [s.name for s in spans()]
    child = redis_gets[0]
    assert child.parent is not None and child.parent.span_id == ours.context.span_id
    assert child.attributes[names.ATTR_RUN_ID] == "run-ctx"
    assert child.attributes[names.ATTR_NODE_ID] == "node-ctx"


def test_any_span_inside_the_call_gets_the_ids_and_context_is_restored(r, spans):
    """A span the user starts inside the call carries the ids; after the call baggage is gone."""
    tracer = trace.get_tracer("user-code")

    @instrument_state_get()
    def load(redis, run_id, node_id):
        with tracer.start_as_current_span("user.http.call"):
            assert baggage.get_baggage(names.ATTR_RUN_ID) == run_id
        return redis.get("nothing")

    load(r, "R-ctx", "N-ctx")
    user_span = next(s for s in spans() if s.name == "user.http.call")
    assert user_span.attributes[names.ATTR_RUN_ID] == "R-ctx"
    assert user_span.attributes[names.ATTR_NODE_ID] == "N-ctx"
    assert baggage.get_baggage(names.ATTR_RUN_ID) is None
    assert not trace.get_current_span().get_span_context().is_valid
