"""Spans of decorated get / init: names, kind, attributes, outcome, status (README, "The contract")."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio as aredis
from opentelemetry.trace import SpanKind, StatusCode

from otel_subflow import names
from otel_subflow.lab.process import free_port
from otel_subflow.lab.servers import RedisServer
from tests.service import AsyncStateStore, StateStore, get_state, initialize_state


def only(spans, name):
    found = [s for s in spans() if s.name == name]
    assert len(found) == 1, [s.name for s in spans()]
    return found[0]


def test_get_hit_span_carries_the_contract(r, redis_server, spans):
    """A hit: INTERNAL span with run/node/key, connection attributes, outcome hit, no error."""
    initialize_state(r, "run-1", "node-a", "payload")
    assert get_state(r, "run-1", "node-a") == b"payload"
    span = only(spans, names.SPAN_STATE_GET)
    attrs = span.attributes
    assert span.kind is SpanKind.INTERNAL
    assert attrs[names.ATTR_RUN_ID] == "run-1"
    assert attrs[names.ATTR_NODE_ID] == "node-a"
    assert attrs[names.ATTR_STATE_KEY] == "subflow:state:run-1:node-a"
    assert attrs[names.ATTR_STATE_OUTCOME] == names.OUTCOME_HIT
    assert attrs[names.ATTR_DB_SYSTEM_NAME] == "redis"
    assert attrs[names.ATTR_DB_NAMESPACE] == "0"
    assert attrs[names.ATTR_SERVER_ADDRESS] == "127.0.0.1"
    assert attrs[names.ATTR_SERVER_PORT] == redis_server.port
    assert attrs[names.ATTR_REDIS_CLIENT_ID] > 0
    assert attrs[names.ATTR_REDIS_SERVER_RUN_ID] == redis_server.run_id()
    assert span.status.status_code is StatusCode.UNSET


def test_init_span_outcome_created_with_ttl(r, spans):
    """An init: outcome created and the TTL given."""
    assert initialize_state(r, "run-1", "node-a", "x", ttl_ms=1234) is True
    span = only(spans, names.SPAN_STATE_INIT)
    assert span.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_CREATED
    assert span.attributes[names.ATTR_STATE_TTL_MS] == 1234
    assert span.kind is SpanKind.INTERNAL


def test_get_miss_is_an_error_with_a_verdict_event(r, spans):
    """A miss: outcome miss, status ERROR 'state missing: <cause>', event subflow.state.missing."""
    assert get_state(r, "run-2", "node-z") is None
    span = only(spans, names.SPAN_STATE_GET)
    assert span.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_MISS
    assert span.status.status_code is StatusCode.ERROR
    event = next(e for e in span.events if e.name == names.EVENT_STATE_MISSING)
    cause = event.attributes[names.ATTR_MISSING_CAUSE]
    assert cause in names.ALL_CAUSES
    assert span.status.description == f"state missing: {cause}"
    assert event.attributes[names.ATTR_MISSING_CONFIDENCE] in (
        names.CONFIDENCE_DEFINITIVE, names.CONFIDENCE_PROBABLE, names.CONFIDENCE_UNKNOWN)
    assert event.attributes[names.ATTR_MISSING_SUMMARY]


def test_connection_error_is_outcome_error_never_miss(spans):
    """A refused connection: outcome error with error.type, the same exception re-raised."""
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    with pytest.raises(redis.ConnectionError):
        get_state(dead, "run-3", "node-a")
    span = only(spans, names.SPAN_STATE_GET)
    assert span.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_ERROR
    assert span.attributes[names.ATTR_ERROR_TYPE] == "ConnectionError"
    assert span.status.status_code is StatusCode.ERROR
    assert not [e for e in span.events if e.name == names.EVENT_STATE_MISSING]


def test_methods_find_the_client_on_self(r, spans):
    """Methods: the client is self.redis; self is not mistaken for an id."""
    store = StateStore(r)
    store.initialize_state("run-4", "n1", "v")
    assert store.get_state("run-4", "n1") == b"v"
    get_span = only(spans, names.SPAN_STATE_GET)
    assert get_span.attributes[names.ATTR_RUN_ID] == "run-4"
    assert names.ATTR_SERVER_PORT in get_span.attributes


async def test_async_methods_on_redis_asyncio(redis_server, r, spans):
    """async def on redis.asyncio: same spans, outcomes and connection attributes."""
    client = aredis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        store = AsyncStateStore(client)
        assert await store.initialize_state("run-5", "n1", "v", ttl_ms=5000) is True
        assert await store.get_state("run-5", "n1") == b"v"
        assert await store.get_state("run-5", "n2") is None
    finally:
        await client.aclose()
    gets = [s for s in spans() if s.name == names.SPAN_STATE_GET]
    assert [s.attributes[names.ATTR_STATE_OUTCOME] for s in gets] == ["hit", "miss"]
    assert gets[0].attributes[names.ATTR_REDIS_CLIENT_ID] > 0
    assert any(e.name == names.EVENT_STATE_MISSING for e in gets[1].events)
    init = only(spans, names.SPAN_STATE_INIT)
    assert init.attributes[names.ATTR_STATE_TTL_MS] == 5000


def test_resource_is_the_providers(r, spans):
    """Spans carry the provider's resource (service.name)."""
    get_state(r, "run-6", "n")
    assert only(spans, names.SPAN_STATE_GET).resource.attributes["service.name"] == "otel-subflow-tests"


def test_second_server_reports_its_own_port(r, spans):
    """Connection attributes follow the client, not a global."""
    with RedisServer() as other:
        client = other.client()
        initialize_state(client, "run-7", "n", "v")
        get_state(client, "run-7", "n")
        span = only(spans, names.SPAN_STATE_GET)
        assert span.attributes[names.ATTR_SERVER_PORT] == other.port
        assert span.attributes[names.ATTR_REDIS_SERVER_RUN_ID] == other.run_id()
        client.close()
