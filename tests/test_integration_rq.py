"""RQInstrumentor with the real RQ on a real redis-server: jobs run by an in-process SimpleWorker.

Each read goes through RQ's public API (``Job.fetch(id, connection)``, ``job.return_value()``);
the failed read's span carries the verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from opentelemetry.sdk.trace import ReadableSpan
from rq import Queue, SimpleWorker
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.results import Result

from otel_subflow import KeyspaceWatcher, SubflowConfig, flush_journals, names
from otel_subflow._config import set_config
from otel_subflow._runtime import runtime
from otel_subflow.integrations import rq as rq_integration
from otel_subflow.integrations.rq import RQInstrumentor
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import declared_instrumentor, declared_requirements, fill_until_evicted, wait_for

Spans = Callable[[], list[ReadableSpan]]


def add(x: int, y: int) -> int:
    return x + y


@pytest.fixture
def instrumented(r: redis.Redis) -> Iterator[RQInstrumentor]:
    set_config(SubflowConfig(analysis_rate_per_s=1e6, analysis_burst=10**6))
    instrumentor = RQInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture
def watcher(redis_server: RedisServer, instrumented: RQInstrumentor) -> Iterator[KeyspaceWatcher]:
    watching = KeyspaceWatcher(redis_server.client(), enable_events=True).start()
    assert watching.wait_subscribed(5)
    yield watching
    watching.stop()


def run_job(connection: redis.Redis, *, job_id: str | None = None, result_ttl: int = 500,
            meta: dict[str, Any] | None = None) -> Job:
    queue = Queue("subflow", connection=connection)
    job = queue.enqueue(add, 2, 3, job_id=job_id, result_ttl=result_ttl, meta=meta)
    SimpleWorker([queue], connection=connection).work(burst=True)
    assert flush_journals(5.0)
    return job


def gets(spans: Spans, key_prefix: str = "rq:job:", since: int = 0) -> list[ReadableSpan]:
    """The get spans of RQ's keys (the worker's own fetches too: pass ``since``)."""
    return [s for s in spans()[since:] if s.name == names.SPAN_STATE_GET
            and str((s.attributes or {}).get(names.ATTR_STATE_KEY, "")).startswith(key_prefix)]


def verdict(span: ReadableSpan) -> tuple[str, str]:
    events = [e for e in span.events if e.name == names.EVENT_STATE_MISSING]
    assert len(events) == 1, span.events
    attributes = events[0].attributes or {}
    return str(attributes[names.ATTR_MISSING_CAUSE]), str(attributes[names.ATTR_MISSING_CONFIDENCE])


def test_a_finished_job_fetched_is_a_hit_with_rq_keys_run_and_node(r, instrumented, spans):
    job = run_job(r, meta={"workflow_id": "wf-1"})
    since = len(spans())
    fetched = Job.fetch(job.id, connection=r)
    assert fetched.return_value() == 5
    [fetch] = gets(spans, since=since)
    attributes = fetch.attributes or {}
    assert attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_HIT
    assert attributes[names.ATTR_STATE_KEY] == f"rq:job:{job.id}"
    assert attributes[names.ATTR_RUN_ID] == job.id
    [result] = gets(spans, "rq:results:", since)
    attributes = result.attributes or {}
    assert attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_HIT
    assert (attributes[names.ATTR_RUN_ID], attributes[names.ATTR_NODE_ID]) == ("wf-1", fetched.func_name)
    inits = [s for s in spans() if s.name == names.SPAN_STATE_INIT]
    assert {str((s.attributes or {})[names.ATTR_STATE_KEY]) for s in inits} >= {
        f"rq:job:{job.id}", f"rq:results:{job.id}"}


def tombstone_seen(key: str) -> None:
    """Wait until this process's keyspace watcher has journalled the key's tombstone."""
    wait_for(lambda: runtime.recent_tombstones.get(key) is not None, 5.0)


def test_a_job_read_after_its_ttl_ran_out_is_expired(r, watcher, spans):
    job = run_job(r, result_ttl=1)
    wait_for(lambda: not r.exists(f"rq:job:{job.id}"), 5.0)
    tombstone_seen(f"rq:job:{job.id}")
    with pytest.raises(NoSuchJobError):
        Job.fetch(job.id, connection=r)
    assert verdict(gets(spans)[-1]) == (names.CAUSE_EXPIRED, names.CONFIDENCE_DEFINITIVE)


def test_a_result_read_after_its_ttl_ran_out_is_expired(r, watcher, spans):
    job = run_job(r, result_ttl=1)
    wait_for(lambda: not r.exists(f"rq:results:{job.id}"), 5.0)
    tombstone_seen(f"rq:results:{job.id}")
    assert job.latest_result() is None
    [read] = gets(spans, "rq:results:")
    assert verdict(read) == (names.CAUSE_EXPIRED, names.CONFIDENCE_DEFINITIVE)


def test_a_deleted_job_fetched_is_deleted(r, watcher, spans):
    job = run_job(r)
    Job.fetch(job.id, connection=r).delete()
    tombstone_seen(f"rq:job:{job.id}")
    with pytest.raises(NoSuchJobError):
        Job.fetch(job.id, connection=r)
    assert verdict(gets(spans)[-1]) == (names.CAUSE_DELETED, names.CONFIDENCE_DEFINITIVE)


def test_a_deleted_job_without_a_watcher_says_the_watcher_is_missing(r, instrumented, spans):
    """A DEL leaves no trace in Redis's counters: without a keyspace watcher the core cannot tell
    it from an expiry or an eviction that was not counted, and says what evidence was missing."""
    job = run_job(r)
    r.delete(f"rq:job:{job.id}")
    with pytest.raises(NoSuchJobError):
        Job.fetch(job.id, connection=r)
    span = gets(spans)[-1]
    assert verdict(span) == (names.CAUSE_UNKNOWN, names.CONFIDENCE_UNKNOWN)
    [event] = [e for e in span.events if e.name == names.EVENT_STATE_MISSING]
    assert "keyspace watcher" in str((event.attributes or {})[names.ATTR_MISSING_SUMMARY])


def test_a_job_evicted_under_allkeys_lru_is_evicted(instrumented, spans):
    with RedisServer(maxmemory="4mb", maxmemory_policy="allkeys-lru") as server:
        app = server.client()
        app.config_set("notify-keyspace-events", "Exeg")
        watching = KeyspaceWatcher(server.client()).start()
        try:
            assert watching.wait_subscribed(5)
            job = run_job(app)
            fill_until_evicted(app, f"rq:job:{job.id}")
            tombstone_seen(f"rq:job:{job.id}")
            with pytest.raises(NoSuchJobError):
                Job.fetch(job.id, connection=app)
            assert verdict(gets(spans)[-1]) == (names.CAUSE_EVICTED, names.CONFIDENCE_DEFINITIVE)
        finally:
            watching.stop()
            app.close()


def test_a_job_fetched_on_another_db_is_a_wrong_endpoint(r, redis_server, instrumented, spans):
    job = run_job(r)
    other = redis_server.client(db=3)
    try:
        with pytest.raises(NoSuchJobError):
            Job.fetch(job.id, connection=other)
    finally:
        other.close()
    assert verdict(gets(spans)[-1])[0] == names.CAUSE_WRONG_ENDPOINT


def test_a_job_fetched_before_it_was_enqueued_is_get_before_init(r, instrumented, spans):
    """At the read nothing was ever written (``never_written``, probable); the enqueue's save then
    corrects it: its init span carries the race event, ``get_before_init``, linked to the failed fetch."""
    with pytest.raises(NoSuchJobError):
        Job.fetch("early-job", connection=r)
    run_job(r, job_id="early-job")
    fetch = gets(spans)[0]
    assert verdict(fetch) == (names.CAUSE_NEVER_WRITTEN, names.CONFIDENCE_PROBABLE)
    races = [(s, e) for s in spans() if s.name == names.SPAN_STATE_INIT for e in s.events
             if e.name == names.EVENT_STATE_RACE]
    assert len(races) == 1
    init, event = races[0]
    assert (event.attributes or {})[names.ATTR_MISSING_CAUSE] == names.CAUSE_GET_BEFORE_INIT
    assert (init.attributes or {})[names.ATTR_STATE_KEY] == "rq:job:early-job"
    assert [link.context.span_id for link in init.links] == [fetch.context.span_id]


def test_a_workflow_jobs_fetch_misses_get_the_same_verdicts(r, redis_server, watcher, spans):
    """Its save is journalled under the workflow, its fetch analysed under the job id: the verdicts hold."""
    expiring = run_job(r, result_ttl=1, meta={"workflow_id": "wf-9"})
    elsewhere = run_job(r, meta={"workflow_id": "wf-9"})
    wait_for(lambda: not r.exists(f"rq:job:{expiring.id}"), 5.0)
    tombstone_seen(f"rq:job:{expiring.id}")
    with pytest.raises(NoSuchJobError):
        Job.fetch(expiring.id, connection=r)
    assert verdict(gets(spans)[-1]) == (names.CAUSE_EXPIRED, names.CONFIDENCE_DEFINITIVE)
    other = redis_server.client(db=2)
    try:
        with pytest.raises(NoSuchJobError):
            Job.fetch(elsewhere.id, connection=other)
    finally:
        other.close()
    assert verdict(gets(spans)[-1])[0] == names.CAUSE_WRONG_ENDPOINT


def test_uninstrument_restores_the_originals(r):
    originals = {(owner, attr): owner.__dict__[attr] for owner, attr in (
        (Job, "fetch"), (Job, "latest_result"), (Job, "save"), (Result, "save"))}
    instrumentor = RQInstrumentor()
    instrumentor.instrument()
    try:
        assert all(owner.__dict__[attr] is not raw for (owner, attr), raw in originals.items())
    finally:
        instrumentor.uninstrument()
    assert all(owner.__dict__[attr] is raw for (owner, attr), raw in originals.items())
    assert instrumentor.instrumentation_dependencies() == ("rq >= 2.0",)
    assert rq_integration.KEY_TEMPLATES == ("rq:job:{run_id}", "rq:results:{run_id}")


def test_the_core_never_imports_rq_and_the_entry_point_is_declared():
    import subprocess
    import sys

    code = ("import sys, otel_subflow, otel_subflow.integrations, otel_subflow._instrument.instrumentor, "
            "otel_subflow.cli; print('rq' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
    assert declared_instrumentor("rq") == ["otel_subflow.integrations.rq:RQInstrumentor"]
    assert declared_requirements("rq") == ["rq<4,>=2"]
    assert "rq<4,>=2" in declared_requirements("test")
