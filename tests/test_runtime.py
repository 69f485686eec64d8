"""Process-wide state lives in one runtime object; a decorator's config= and providers are honoured everywhere."""

from __future__ import annotations

from typing import Any

import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_subflow import SubflowConfig, flush_journals, instrument_state_get, instrument_state_init, names
from otel_subflow._config import get_config
from otel_subflow._journal import store
from otel_subflow._journal.location import journal_for
from otel_subflow._runtime import runtime
from tests.cli_helpers import wait_for
from tests.service import get_state, initialize_state


def _points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [point for rm in data.resource_metrics for sm in rm.scope_metrics for metric in sm.metrics
            if metric.name == name for point in metric.data.data_points]


def test_reset_returns_the_process_to_a_fresh_start(r: redis.Redis) -> None:
    """After inits, misses and a refusal, reset() leaves no journal, client, cache or count behind."""
    initialize_state(r, "run-rt", "n1", "v")
    assert get_state(r, "run-rt", "n2") is None
    runtime.refusals.note(("10.0.0.1", 6379, None), "PTTL", redis.exceptions.NoPermissionError("NOPERM pttl"))
    assert flush_journals(5.0)
    journals = list(runtime.journals.values())
    assert journals and runtime.connections and runtime.sync_clients and runtime.recent_inits
    assert runtime.rate_limit is not None and runtime.refusals.refused_commands(("10.0.0.1", 6379, None))

    runtime.reset()

    assert not runtime.journals and not runtime.sync_clients and not runtime.connections
    assert len(runtime.recent_inits) == 0 and len(runtime.recent_misses) == 0
    assert runtime.rate_limit is None and runtime.config is None and not runtime.internal_errors
    assert runtime.refusals.refused_commands(("10.0.0.1", 6379, None)) == []
    wait_for(lambda: all(j._thread is None or not j._thread.is_alive() for j in journals), 5.0)


def test_a_decorators_config_gets_a_journal_with_its_own_settings(r: redis.Redis) -> None:
    """Two decorators on one server with different journal settings: each journal is built from its own."""
    small = SubflowConfig(journal_budget_mb=1.0, journal_queue_size=100)

    @instrument_state_init(config=small)
    def init_small(redis: redis.Redis, run_id: str, node_id: str, data: str) -> bool:
        return bool(redis.set(f"subflow:state:{run_id}:{node_id}", data))

    initialize_state(r, "run-cfg", "default", "v")
    init_small(r, "run-cfg", "small", "v")
    assert flush_journals(5.0)
    default_journal, small_journal = journal_for(r, get_config()), journal_for(r, small)
    assert default_journal is not None and small_journal is not None
    assert default_journal is not small_journal
    assert small_journal.settings == small.journal_settings()
    assert small_journal.stats().written == 1 and default_journal.stats().written == 1
    assert {e.node_id for e in store.read_run(r, "run-cfg") if e.op == "init"} == {"default", "small"}


def test_race_span_and_correction_go_to_the_decorators_providers(r: redis.Redis, spans) -> None:
    """A race found by the write script (the init's process had not seen the miss): its span goes to the
    init decorator's tracer provider and the correction to its meter provider, not to the global ones."""
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[reader])

    @instrument_state_get(tracer_provider=tracer_provider, meter_provider=meter_provider)
    def get_own(redis: redis.Redis, run_id: str, node_id: str) -> Any:
        return redis.get(f"subflow:state:{run_id}:{node_id}")

    @instrument_state_init(tracer_provider=tracer_provider, meter_provider=meter_provider)
    def init_own(redis: redis.Redis, run_id: str, node_id: str, data: str) -> bool:
        return bool(redis.set(f"subflow:state:{run_id}:{node_id}", data))

    assert get_own(r, "run-race", "n") is None
    assert flush_journals(5.0)  # the miss and its marker are in the journal
    runtime.recent_misses.clear()  # as if the init ran in another process
    assert init_own(r, "run-race", "n", "v")
    assert flush_journals(5.0)

    races = [s for s in exporter.get_finished_spans() if s.name == names.SPAN_STATE_RACE]
    assert len(races) == 1, [s.name for s in exporter.get_finished_spans()]
    assert races[0].attributes["subflow.race.detected_by"] == "cross_process_init"
    assert not [s for s in spans() if s.name == names.SPAN_STATE_RACE]
    corrected = _points(reader, names.METRIC_STATE_MISSING_CORRECTED)
    assert [(p.attributes[names.ATTR_MISSING_CAUSE], p.value) for p in corrected] == [
        (names.CAUSE_GET_BEFORE_INIT, 1)]
    tracer_provider.shutdown()
    meter_provider.shutdown()
