"""ArqInstrumentor with a real arq Worker (burst mode) on the real redis-server, reads through arq's API."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import arq
import arq.worker
import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.jobs import Job, ResultNotFound
from arq.worker import Worker, func

from otel_subflow import KeyspaceWatcher, SubflowConfig, names
from otel_subflow._config import set_config
from otel_subflow._journal.location import flush_journals
from otel_subflow._runtime import runtime
from otel_subflow.integrations.arq import ArqInstrumentor
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import declared_instrumentor, declared_requirements, fill_until_evicted, wait_for


async def add(ctx: dict[str, Any], a: int, b: int) -> int:
    return a + b


async def add_briefly(ctx: dict[str, Any], a: int, b: int) -> int:
    return a + b


async def retried(ctx: dict[str, Any]) -> int:
    if ctx["job_try"] == 1:
        raise arq.worker.Retry(defer=0)
    return 7


FUNCTIONS = [func(add, name="add"), func(add_briefly, name="add_briefly", keep_result=0.3),
             func(retried, name="retried")]


@pytest.fixture
def instrumented(r: Any) -> Iterator[ArqInstrumentor]:
    instrumentor = ArqInstrumentor()
    instrumentor.instrument(watch=False)
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture
async def pool(redis_server: Any, r: Any) -> AsyncIterator[ArqRedis]:
    p = await create_pool(RedisSettings(host=redis_server.host, port=redis_server.port, database=0))
    yield p
    await p.aclose()


async def _run(pool: ArqRedis, function: str, *args: Any, job_id: str) -> None:
    await pool.enqueue_job(function, *args, _job_id=job_id)
    worker = Worker(functions=FUNCTIONS, redis_pool=pool, burst=True, poll_delay=0.01, handle_signals=False)
    await worker.main()
    await worker.close()


def _gets(spans: Any) -> list[Any]:
    return [s for s in spans() if s.name == names.SPAN_STATE_GET]


def _inits(spans: Any, prefix: str = "arq:result:") -> list[Any]:
    return [s for s in spans() if s.name == names.SPAN_STATE_INIT
            and str(s.attributes[names.ATTR_STATE_KEY]).startswith(prefix)]


def _verdict(span: Any) -> tuple[str, str]:
    (event,) = [e for e in span.events if e.name == names.EVENT_STATE_MISSING]
    return str(event.attributes[names.ATTR_MISSING_CAUSE]), str(event.attributes[names.ATTR_MISSING_CONFIDENCE])


def _cause(span: Any) -> str:
    event = next(e for e in span.events if e.name == names.EVENT_STATE_MISSING)
    return str(event.attributes[names.ATTR_MISSING_CAUSE])


async def test_hit_maps_run_to_job_id_and_node_to_function(instrumented, pool, spans):
    await _run(pool, "add", 1, 2, job_id="job-hit")
    info = await Job("job-hit", pool).result_info()
    assert info is not None and info.result == 3
    assert await Job("job-hit", pool).result(timeout=1) == 3
    (init,) = _inits(spans)
    assert init.attributes[names.ATTR_RUN_ID] == "job-hit"
    assert init.attributes[names.ATTR_NODE_ID] == "add"
    assert init.attributes[names.ATTR_STATE_KEY] == "arq:result:job-hit"
    assert init.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_CREATED
    first, second = _gets(spans)
    assert first.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_HIT
    assert first.attributes[names.ATTR_NODE_ID] == "add"  # from the result read
    assert second.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_HIT
    assert not [e for s in spans() for e in s.events if e.name == names.EVENT_STATE_MISSING]


async def test_concurrent_jobs_each_get_their_own_node(instrumented, pool, spans):
    """The worker runs the jobs concurrently: each store names its own job's function."""
    for i in range(6):
        await pool.enqueue_job("add" if i % 2 else "retried", *((i, i) if i % 2 else ()), _job_id=f"job-c{i}")
    worker = Worker(functions=FUNCTIONS, redis_pool=pool, burst=True, poll_delay=0.01, handle_signals=False)
    await worker.main()
    await worker.close()
    stored = {s.attributes[names.ATTR_RUN_ID]: s.attributes[names.ATTR_NODE_ID] for s in _inits(spans)
              if s.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_CREATED}
    assert stored == {f"job-c{i}": "add" if i % 2 else "retried" for i in range(6)}


async def test_expired_result(instrumented, pool, spans):
    await _run(pool, "add_briefly", 1, 2, job_id="job-exp")
    flush_journals(2.0)
    await asyncio.sleep(0.5)  # keep_result=0.3 s ran out
    assert await Job("job-exp", pool).result_info() is None
    (miss,) = _gets(spans)
    assert miss.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_MISS
    assert _cause(miss) == names.CAUSE_EXPIRED


async def test_deleted_result_through_result_raising_result_not_found(instrumented, pool, r, spans):
    await _run(pool, "add", 2, 3, job_id="job-del")
    flush_journals(2.0)
    r.delete("arq:result:job-del")
    with pytest.raises(ResultNotFound):
        await Job("job-del", pool).result(timeout=1)
    (miss,) = _gets(spans)
    assert miss.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_MISS
    assert _cause(miss) == names.CAUSE_DELETED


async def test_wrong_db(instrumented, pool, redis_server, spans):
    await _run(pool, "add", 3, 4, job_id="job-db")
    flush_journals(2.0)
    other = await create_pool(RedisSettings(host=redis_server.host, port=redis_server.port, database=1))
    try:
        assert await Job("job-db", other).info() is None
    finally:
        await other.aclose()
    (miss,) = _gets(spans)  # info()'s own result_info() is not a second read
    assert _cause(miss) == names.CAUSE_WRONG_ENDPOINT


async def test_read_before_the_job_ran(instrumented, pool, spans):
    assert await Job("job-early", pool).result_info() is None
    (miss,) = _gets(spans)
    assert _cause(miss) == names.CAUSE_NEVER_WRITTEN  # nothing of the job yet: an init later is a race
    flush_journals(2.0)
    await _run(pool, "add", 4, 5, job_id="job-early")
    flush_journals(2.0)
    (init,) = _inits(spans)
    # The worker's store of the result says it came after the failed read: a race, linked to the read.
    assert [e for e in init.events if e.name == names.EVENT_STATE_RACE]
    assert [link.context.span_id for link in init.links] == [miss.context.span_id]


async def test_a_retry_with_no_result_is_not_journalled(instrumented, pool, spans):
    await _run(pool, "retried", job_id="job-retry")
    outcomes = [s.attributes[names.ATTR_STATE_OUTCOME] for s in _inits(spans)]
    assert outcomes == [names.OUTCOME_NOT_WRITTEN, names.OUTCOME_CREATED]
    assert await Job("job-retry", pool).result(timeout=1) == 7


async def test_enqueue_writes_the_job_state_with_arqs_expiry(instrumented, pool, spans):
    assert await pool.enqueue_job("add", 1, 2, _job_id="job-q") is not None
    assert await pool.enqueue_job("add", 1, 2, _job_id="job-q") is None  # arq refuses a duplicate id
    generated = await pool.enqueue_job("add", 3, 4, _defer_by=60)
    first, duplicate, deferred = _inits(spans, "arq:job:")
    assert (first.attributes[names.ATTR_STATE_KEY], first.attributes[names.ATTR_RUN_ID],
            first.attributes[names.ATTR_NODE_ID]) == ("arq:job:job-q", "job-q", "add")
    assert first.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_CREATED
    assert first.attributes[names.ATTR_STATE_TTL_MS] == pool.expires_extra_ms
    assert duplicate.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_NOT_WRITTEN
    assert deferred.attributes[names.ATTR_RUN_ID] == generated.job_id  # the id is known before the call
    assert deferred.attributes[names.ATTR_STATE_TTL_MS] == pool.expires_extra_ms + 60_000


@pytest.fixture
def watching(redis_server: Any, instrumented: ArqInstrumentor) -> Iterator[KeyspaceWatcher]:
    watcher = KeyspaceWatcher(redis_server.client(), enable_events=True).start()
    assert watcher.wait_subscribed(5)
    yield watcher
    watcher.stop()


async def _job_state_lost(pool: ArqRedis, spans: Any, job_id: str) -> Any:
    """Run the worker on a queued job whose state is gone: it never runs; the worker's read misses."""
    worker = Worker(functions=FUNCTIONS, redis_pool=pool, burst=True, poll_delay=0.01, handle_signals=False)
    await worker.main()
    await worker.close()
    assert worker.jobs_complete == 0 and worker.jobs_failed == 1
    (miss,) = [s for s in _gets(spans) if s.attributes[names.ATTR_STATE_KEY] == f"arq:job:{job_id}"]
    assert miss.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_MISS
    assert miss.attributes[names.ATTR_RUN_ID] == job_id
    return miss


async def test_a_job_whose_state_expired_in_the_queue_never_runs_and_says_expired(r, pool, watching, spans):
    await pool.enqueue_job("add", 1, 2, _job_id="job-stale", _expires=0.3)
    assert flush_journals(2.0)
    wait_for(lambda: runtime.recent_tombstones.get("arq:job:job-stale") is not None, 5.0)
    miss = await _job_state_lost(pool, spans, "job-stale")
    assert _verdict(miss) == (names.CAUSE_EXPIRED, names.CONFIDENCE_DEFINITIVE)


async def test_a_job_whose_state_was_deleted_in_the_queue_never_runs_and_says_deleted(r, pool, watching, spans):
    await pool.enqueue_job("add", 1, 2, _job_id="job-gone")
    assert flush_journals(2.0)
    r.delete("arq:job:job-gone")
    wait_for(lambda: runtime.recent_tombstones.get("arq:job:job-gone") is not None, 5.0)
    miss = await _job_state_lost(pool, spans, "job-gone")
    assert _verdict(miss) == (names.CAUSE_DELETED, names.CONFIDENCE_DEFINITIVE)


def test_uninstrument_restores_the_originals(r):
    originals = (Job.result, Job.result_info, Job.info, Worker.finish_job, Worker.finish_failed_job,
                 arq.worker.serialize_result, ArqRedis.enqueue_job)
    instrumentor = ArqInstrumentor()
    instrumentor.instrument(watch=False)
    assert Job.result is not originals[0] and Worker.finish_job is not originals[3]
    assert ArqRedis.enqueue_job is not originals[6]
    instrumentor.uninstrument()
    assert (Job.result, Job.result_info, Job.info, Worker.finish_job, Worker.finish_failed_job,
            arq.worker.serialize_result, ArqRedis.enqueue_job) == originals
    ArqInstrumentor().instrument(watch=False)
    ArqInstrumentor().uninstrument()  # the singleton's __init__ ran again in between: still restored
    assert (Job.result, Worker.finish_job, arq.worker.serialize_result) == (originals[0], originals[3], originals[5])
    assert ArqInstrumentor().instrumentation_dependencies() == ("arq >= 0.25",)


async def test_evicted_result(instrumented, r, spans):
    """A server of its own under volatile-ttl with keyspace events off: arq's result (it has a TTL, the
    ballast has none) is evicted; Redis's counters since the worker's store say so."""
    set_config(dataclasses.replace(SubflowConfig(analysis_rate_per_s=1e6, analysis_burst=10**6),
                                   journal_budget_pct=25.0))
    with RedisServer(notify_keyspace_events="", maxmemory="4mb", maxmemory_policy="volatile-ttl") as server:
        p = await create_pool(RedisSettings(host=server.host, port=server.port))
        app = server.client()
        try:
            await _run(p, "add", 0, 0, job_id="job-warm")  # the first flush samples the counters the next carry
            assert flush_journals(5.0)
            await _run(p, "add", 5, 6, job_id="job-ev")
            assert flush_journals(5.0)
            fill_until_evicted(app, "arq:result:job-ev", value_bytes=200)
            assert not app.exists("arq:result:job-ev")
            assert await Job("job-ev", p).result_info() is None
        finally:
            app.close()
            await p.aclose()
    miss = _gets(spans)[-1]
    assert _cause(miss) == names.CAUSE_EVICTED


def test_the_core_never_imports_arq():
    code = ("import sys, otel_subflow, otel_subflow.integrations, otel_subflow.cli, otel_subflow.distro; "
            "print(sorted(m for m in sys.modules if m == 'arq' or m.startswith('arq.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_entry_point_and_extras_are_declared():
    assert declared_instrumentor("arq") == ["otel_subflow.integrations.arq:ArqInstrumentor"]
    assert declared_requirements("arq") == ["arq<1,>=0.25"]
    assert "arq<1,>=0.25" in declared_requirements("test")
