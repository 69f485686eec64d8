"""The wrapped function returns and raises exactly what it would undecorated."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

from otel_subflow import SubflowConfig, instrument_state_get, instrument_state_init, names
from otel_subflow._boundary import internal_error_counts
from otel_subflow._config import set_config
from otel_subflow.lab.process import free_port

values = st.one_of(
    st.none(), st.integers(), st.text(), st.binary(), st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
)
ids = st.one_of(st.none(), st.text(max_size=300), st.binary(max_size=50), st.integers())


class Boom(Exception):
    pass


exceptions = st.sampled_from([ValueError("bad"), KeyError("k"), Boom("boom"), redis.ResponseError("ERR x"),
                              redis.ConnectionError("down"), TimeoutError("slow")])

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(value=values, run_id=ids, node_id=ids)
def test_sync_return_values_pass_through(r, value, run_id, node_id):
    """Any return value, for any ids, comes back as the same object."""

    @instrument_state_get()
    def load(redis, run_id, node_id):
        return value

    assert load(r, run_id, node_id) is value


@SETTINGS
@given(exc=exceptions, run_id=ids)
def test_sync_exceptions_pass_through(r, exc, run_id):
    """Any exception is re-raised as the same object."""

    @instrument_state_init()
    def init(redis, run_id, node_id):
        raise exc

    with pytest.raises(type(exc)) as caught:
        init(r, run_id, "n")
    assert caught.value is exc


@SETTINGS
@given(value=values, exc=st.one_of(st.none(), exceptions))
def test_async_returns_and_raises_pass_through(r, value, exc):
    """async def: same object back, same exception out."""

    @instrument_state_get()
    async def load(redis, run_id, node_id):
        await asyncio.sleep(0)
        if exc is not None:
            raise exc
        return value

    if exc is None:
        assert asyncio.run(load(r, "R", "N")) is value
    else:
        with pytest.raises(type(exc)) as caught:
            asyncio.run(load(r, "R", "N"))
        assert caught.value is exc


class FailingExporter(SpanExporter):
    def export(self, spans):
        raise RuntimeError("exporter down")

    def shutdown(self):
        return None


def test_failing_exporter_does_not_change_results(r, caplog):
    """A span exporter that raises does not reach the caller."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FailingExporter()))

    @instrument_state_get(tracer_provider=provider)
    def load(redis, run_id, node_id):
        return redis.get(f"subflow:state:{run_id}:{node_id}")

    r.set("subflow:state:R:N", "v")
    assert load(r, "R", "N") == b"v"
    assert load(r, "R", "missing") is None
    provider.shutdown()
    assert caplog.text.count("exporter down") >= 1 or any("Exception" in m for m in caplog.messages)


def test_unreachable_diagnostics_redis_does_not_change_results(r, spans):
    """Journal and analysis against a dead Redis: the call returns the same, the verdict says why."""
    set_config(SubflowConfig(journal_url=f"redis://127.0.0.1:{free_port()}/0", analysis_timeout_s=0.1))
    r.set("subflow:state:R:N", "v")

    @instrument_state_get()
    def load(redis, run_id, node_id):
        return redis.get(f"subflow:state:{run_id}:{node_id}")

    @instrument_state_init()
    def init(redis, run_id, node_id):
        return redis.set(f"subflow:state:{run_id}:{node_id}", "v")

    assert init(r, "R", "N2") is True
    assert load(r, "R", "N") == b"v"
    assert load(r, "R", "absent") is None
    miss = next(s for s in spans() if s.attributes.get(names.ATTR_STATE_OUTCOME) == "miss")
    event = next(e for e in miss.events if e.name == names.EVENT_STATE_MISSING)
    # the reader is reachable, only the journal is not: the verdict names the missing journal
    assert event.attributes[names.ATTR_MISSING_CAUSE] in names.ALL_CAUSES


def test_internal_errors_are_logged_once_counted_never_raised(r, monkeypatch, caplog):
    """Our own failure inside a call: logged once, counted each time, the result unchanged."""
    monkeypatch.setenv("OTEL_SUBFLOW_RAISE_INTERNAL_ERRORS", "0")
    import otel_subflow._instrument.call as deco

    def broken(*args, **kwargs):
        raise RuntimeError("our bug")

    monkeypatch.setattr(deco, "with_run_context", broken)
    caplog.set_level(logging.ERROR, logger=names.LOGGER_NAME)

    @instrument_state_get()
    def load(redis, run_id, node_id):
        return "result"

    for _ in range(3):
        assert load(r, "R", "N") == "result"
    assert internal_error_counts()["decorator.start"] == 3
    assert sum("internal error in decorator.start" in m for m in caplog.messages) == 1
