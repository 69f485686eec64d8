"""Decorator options: argument names, callables, key templates, client resolvers, is_missing, TTL; warnings."""

from __future__ import annotations

import datetime
import warnings

import pytest

from otel_subflow import SubflowInstrumentationWarning, instrument_state_get, instrument_state_init, names


def _span(spans, name):
    return next(s for s in spans() if s.name == name)


def test_custom_argument_names_and_key_template(r, spans):
    """run/node from other parameter names; a template naming any parameter."""

    @instrument_state_get(run_id="workflow", node_id="step", key="wf:{tenant}:{run_id}/{node_id}", client="conn")
    def load(conn, tenant, workflow, step):
        return conn.get(f"wf:{tenant}:{workflow}/{step}")

    r.set("wf:acme:R1/S1", "v")
    assert load(r, "acme", "R1", step="S1") == b"v"
    span = _span(spans, names.SPAN_STATE_GET)
    assert span.attributes[names.ATTR_RUN_ID] == "R1"
    assert span.attributes[names.ATTR_NODE_ID] == "S1"
    assert span.attributes[names.ATTR_STATE_KEY] == "wf:acme:R1/S1"
    assert span.attributes[names.ATTR_STATE_OUTCOME] == "hit"


def test_callables_receive_bound_arguments(r, spans):
    """Callables get the bound arguments with defaults applied."""

    class Job:
        run = "R9"
        node = "N9"

    @instrument_state_get(
        run_id=lambda a: a["job"].run,
        node_id=lambda a: a["job"].node,
        key=lambda a: f"custom:{a['job'].run}:{a['job'].node}:{a['suffix']}",
        client=lambda a: a["backend"],
        is_missing=lambda result: result == b"",
    )
    def load(backend, job, suffix="x"):
        return backend.get(f"custom:{job.run}:{job.node}:{suffix}") or b""

    assert load(r, Job()) == b""
    span = _span(spans, names.SPAN_STATE_GET)
    assert span.attributes[names.ATTR_RUN_ID] == "R9"
    assert span.attributes[names.ATTR_STATE_KEY] == "custom:R9:N9:x"
    assert span.attributes[names.ATTR_STATE_OUTCOME] == "miss"


def test_is_missing_predicate_decides_hit(r, spans):
    """A custom predicate: an empty dict is a miss, None is not."""

    @instrument_state_get(is_missing=lambda result: result == {})
    def load(redis, run_id, node_id):
        return redis.hgetall(f"subflow:state:{run_id}:{node_id}")

    assert load(r, "R", "N") == {}
    assert _span(spans, names.SPAN_STATE_GET).attributes[names.ATTR_STATE_OUTCOME] == "miss"


@pytest.mark.parametrize(
    ("kwargs", "value", "expected_ms"),
    [
        ({"ttl": "expiry"}, 3, 3000),
        ({"ttl_ms": "expiry"}, 250, 250),
        ({"ttl": "expiry"}, datetime.timedelta(seconds=2), 2000),
    ],
)
def test_ttl_argument(r, spans, kwargs, value, expected_ms):
    """The TTL comes from the named argument, in seconds, milliseconds or a timedelta."""

    @instrument_state_init(**kwargs)
    def init(redis, run_id, node_id, expiry):
        redis.set(f"subflow:state:{run_id}:{node_id}", 1, px=expected_ms)

    init(r, "R", "N", value)
    assert _span(spans, names.SPAN_STATE_INIT).attributes[names.ATTR_STATE_TTL_MS] == expected_ms


def test_missing_parameter_warns_once_at_decoration_never_raises_at_call(r, spans):
    """No such parameter: one warning when decorating; calls still work, without that attribute."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        @instrument_state_get(run_id="nope")
        def load(redis, run_id, node_id):
            return redis.get(f"subflow:state:{run_id}:{node_id}")

    assert [w.category for w in caught] == [SubflowInstrumentationWarning]
    assert "nope" in str(caught[0].message)
    with warnings.catch_warnings(record=True) as at_call:
        warnings.simplefilter("always")
        assert load(r, "R", "N") is None
        assert load(r, "R", "N") is None
    assert not at_call
    span = _span(spans, names.SPAN_STATE_GET)
    assert names.ATTR_RUN_ID not in span.attributes
    assert span.attributes[names.ATTR_NODE_ID] == "N"


def test_key_template_with_unknown_field_warns(r, spans):
    """A template naming a field that is not a parameter warns and leaves the key out."""
    with pytest.warns(SubflowInstrumentationWarning, match="tenant"):

        @instrument_state_get(key="{tenant}:{run_id}:{node_id}")
        def load(redis, run_id, node_id):
            return redis.get("x")

    assert load(r, "R", "N") is None
    span = _span(spans, names.SPAN_STATE_GET)
    assert names.ATTR_STATE_KEY not in span.attributes
    event = next(e for e in span.events if e.name == names.EVENT_STATE_MISSING)
    assert event.attributes[names.ATTR_MISSING_CAUSE] == names.CAUSE_UNKNOWN


def test_no_client_found_warns(r):
    """A plain function with no redis/client argument: a warning pointing at client=..."""
    with pytest.warns(SubflowInstrumentationWarning, match="client"):

        @instrument_state_get()
        def load(run_id, node_id):
            return r.get("x")

    assert load("R", "N") is None


def test_wrong_call_raises_the_functions_own_type_error(r):
    """A call with bad arguments raises what the undecorated function raises."""

    @instrument_state_get(run_id=lambda a: a["run_id"])
    def load(redis, run_id, node_id):
        return None

    with pytest.raises(TypeError, match="node_id"):
        load(r, "R")


def test_odd_ids_are_bounded_strings(r, spans):
    """bytes, ints, None and 10 kB ids become bounded strings (or are left out)."""
    huge = "x" * 10_000

    @instrument_state_get()
    def load(redis, run_id, node_id):
        return None

    load(r, b"run-\xff", 7)
    load(r, huge, None)
    first, second = [s for s in spans() if s.name == names.SPAN_STATE_GET]
    assert first.attributes[names.ATTR_RUN_ID] == "run-\\xff"
    assert first.attributes[names.ATTR_NODE_ID] == "7"
    assert len(second.attributes[names.ATTR_RUN_ID]) == 256
    assert names.ATTR_NODE_ID not in second.attributes


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_generator_function_warns_at_decoration(kind):
    """Calling a generator only creates it: the decorator says so when applied (and still wraps it)."""
    if kind == "sync":
        def read(redis, run_id, node_id):
            yield redis.get(f"subflow:state:{run_id}:{node_id}")
    else:
        async def read(redis, run_id, node_id):
            yield await redis.get(f"subflow:state:{run_id}:{node_id}")
    with pytest.warns(SubflowInstrumentationWarning, match="generator function"):
        decorated = instrument_state_get()(read)
    assert decorated.__wrapped__ is read
