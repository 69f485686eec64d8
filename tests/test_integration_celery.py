"""CeleryResultInstrumentor with a real Celery worker on the real redis-server.

The worker is Celery's own (``celery.contrib.testing.worker.start_worker``: a ``WorkController``
with the solo pool, in a thread of this process), its broker and result backend the session's
redis-server. Reads go through Celery's public API: ``AsyncResult(id).state``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery, chord
from celery.contrib.testing.worker import start_worker
from celery.result import AsyncResult
from opentelemetry.sdk.trace import ReadableSpan

from otel_subflow import KeyspaceWatcher, SubflowConfig, flush_journals, names
from otel_subflow._config import set_config
from otel_subflow._runtime import runtime
from otel_subflow.integrations.celery import ATTR_ROOT_ID, CeleryResultInstrumentor
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import declared_instrumentor, declared_requirements, fill_until_evicted, wait_for
from tests.conftest import commandstats, commandstats_delta

Spans = Callable[[], list[ReadableSpan]]
BROKER_DB = 1

#: Header tasks of a chord wait on these (by name) before they return: the test deletes or lets
#: expire the join state in between.
GATES: dict[str, threading.Event] = {}
#: What the chords' callbacks were called with.
CALLBACKS: list[Any] = []


def make_app(server: RedisServer, db: int = 0, **conf: Any) -> Celery:
    url = f"redis://{server.host}:{server.port}"
    app = Celery("subflow-test", broker=f"{url}/{BROKER_DB}", backend=f"{url}/{db}", set_as_current=False)
    app.conf.update(task_default_queue="subflow", worker_hijack_root_logger=False, broker_connection_retry=False,
                    broker_connection_retry_on_startup=False, result_extended=True, **conf)

    @app.task(name="add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="gated", shared=False)
    def gated(gate: str, value: int) -> int:
        assert GATES[gate].wait(20), f"gate {gate} never opened"
        return value

    @app.task(name="collect", shared=False)
    def collect(values: list[int]) -> int:
        CALLBACKS.append(values)
        return sum(values)

    return app


@pytest.fixture
def instrumented(r: redis.Redis) -> Iterator[CeleryResultInstrumentor]:
    set_config(SubflowConfig(analysis_rate_per_s=1e6, analysis_burst=10**6))
    instrumentor = CeleryResultInstrumentor()
    instrumentor.instrument(watch=False)
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture
def watcher(redis_server: RedisServer, instrumented: CeleryResultInstrumentor) -> Iterator[KeyspaceWatcher]:
    watching = KeyspaceWatcher(redis_server.client(), enable_events=True).start()
    assert watching.wait_subscribed(5)
    yield watching
    watching.stop()


@pytest.fixture
def app(redis_server: RedisServer, instrumented: CeleryResultInstrumentor) -> Iterator[Celery]:
    celery_app = make_app(redis_server, result_expires=600)
    yield celery_app
    celery_app.close()


def worker(app: Celery) -> Any:
    """Celery's worker (solo pool) consuming the app's queue, in a thread, until the block ends."""
    return start_worker(app, pool="solo", concurrency=1, perform_ping_check=False, loglevel="WARNING",
                        shutdown_timeout=10)


def run_task(app: Celery, x: int = 2, y: int = 3, **options: Any) -> AsyncResult:
    with worker(app):
        result = app.tasks["add"].apply_async((x, y), **options)
        assert result.get(timeout=20) == x + y
    assert flush_journals(5.0)
    return result


def task_key(task_id: str, prefix: str = "") -> str:
    return f"{prefix}celery-task-meta-{task_id}"


def reads(spans: Spans, key: str) -> list[ReadableSpan]:
    return [s for s in spans() if s.name == names.SPAN_STATE_GET
            and (s.attributes or {}).get(names.ATTR_STATE_KEY) == key]


def state_of(app: Celery, task_id: str, spans: Spans) -> tuple[str, ReadableSpan]:
    """``AsyncResult(id).state`` and the span of that read."""
    since = len(spans())
    state = AsyncResult(task_id, app=app).state
    [span] = [s for s in spans()[since:] if s.name == names.SPAN_STATE_GET]
    return state, span


def verdict(span: ReadableSpan) -> tuple[str, str]:
    events = [e for e in span.events if e.name == names.EVENT_STATE_MISSING]
    assert len(events) == 1, span.events
    attributes = events[0].attributes or {}
    return str(attributes[names.ATTR_MISSING_CAUSE]), str(attributes[names.ATTR_MISSING_CONFIDENCE])


def tombstone_seen(key: str) -> None:
    """Wait until this process's keyspace watcher has journalled the key's tombstone."""
    wait_for(lambda: runtime.recent_tombstones.get(key) is not None, 10.0)


def test_a_stored_result_read_is_a_hit_with_celerys_key_run_and_node(r, app, spans):
    result = run_task(app)
    state, read = state_of(app, result.id, spans)
    assert state == "SUCCESS"
    attributes = read.attributes or {}
    assert attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_HIT
    assert attributes[names.ATTR_STATE_KEY] == task_key(result.id)
    assert (attributes[names.ATTR_RUN_ID], attributes[names.ATTR_NODE_ID]) == (result.id, "add")
    assert (attributes[names.ATTR_SERVER_PORT], attributes[names.ATTR_DB_NAMESPACE]) == (r.connection_pool
        .connection_kwargs["port"], "0")
    [store] = [s for s in spans() if s.name == names.SPAN_STATE_INIT]
    attributes = store.attributes or {}
    assert (attributes[names.ATTR_STATE_KEY], attributes[names.ATTR_NODE_ID]) == (task_key(result.id), "add")
    assert attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_CREATED
    assert attributes[names.ATTR_STATE_TTL_MS] == 600_000
    assert attributes[ATTR_ROOT_ID] == result.id
    # the backend's own check inside the store is not a read of the user's
    assert [s for s in spans() if s.name == names.SPAN_STATE_GET
            and (s.attributes or {}).get(names.ATTR_STATE_OUTCOME) == names.OUTCOME_MISS] == []


def test_a_result_read_after_it_expired_is_expired(r, redis_server, watcher, spans):
    app = make_app(redis_server, result_expires=1)
    try:
        result = run_task(app)
        wait_for(lambda: not r.exists(task_key(result.id)), 10.0)
        tombstone_seen(task_key(result.id))
        state, read = state_of(app, result.id, spans)
    finally:
        app.close()
    assert state == "PENDING"
    assert read.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_MISS
    assert verdict(read) == (names.CAUSE_EXPIRED, names.CONFIDENCE_DEFINITIVE)


def test_a_forgotten_result_is_deleted(r, app, watcher, spans):
    result = run_task(app)
    AsyncResult(result.id, app=app).forget()
    tombstone_seen(task_key(result.id))
    state, read = state_of(app, result.id, spans)
    assert state == "PENDING"
    assert verdict(read) == (names.CAUSE_DELETED, names.CONFIDENCE_DEFINITIVE)


def test_a_result_evicted_under_allkeys_lru_is_evicted(instrumented, spans):
    with RedisServer(maxmemory="6mb", maxmemory_policy="allkeys-lru") as server:
        client = server.client()
        client.config_set("notify-keyspace-events", "Exeg")
        watching = KeyspaceWatcher(server.client()).start()
        app = make_app(server)
        try:
            assert watching.wait_subscribed(5)
            result = run_task(app)
            fill_until_evicted(client, task_key(result.id))
            tombstone_seen(task_key(result.id))
            state, read = state_of(app, result.id, spans)
            assert state == "PENDING"
            assert verdict(read) == (names.CAUSE_EVICTED, names.CONFIDENCE_DEFINITIVE)
        finally:
            app.close()
            watching.stop()
            client.close()


def test_a_result_read_on_another_db_is_a_wrong_endpoint(redis_server, app, spans):
    result = run_task(app)
    elsewhere = make_app(redis_server, db=3)
    try:
        state, read = state_of(elsewhere, result.id, spans)
    finally:
        elsewhere.close()
    assert state == "PENDING"
    assert verdict(read)[0] == names.CAUSE_WRONG_ENDPOINT


def test_a_result_read_before_the_task_ran_is_get_before_init(app, spans):
    """Nothing was written at the read (``never_written``, probable); the worker's store then corrects
    it: its init span carries the race event, ``get_before_init``, linked to the failed read."""
    state, read = state_of(app, "early-task", spans)
    assert state == "PENDING"
    assert verdict(read) == (names.CAUSE_NEVER_WRITTEN, names.CONFIDENCE_PROBABLE)
    run_task(app, task_id="early-task")
    races = [(s, e) for s in spans() if s.name == names.SPAN_STATE_INIT for e in s.events
             if e.name == names.EVENT_STATE_RACE]
    assert len(races) == 1
    init, event = races[0]
    assert (event.attributes or {})[names.ATTR_MISSING_CAUSE] == names.CAUSE_GET_BEFORE_INIT
    assert (init.attributes or {})[names.ATTR_STATE_KEY] == task_key("early-task")
    assert [link.context.span_id for link in init.links] == [read.context.span_id]


def test_a_store_celery_skips_after_a_success_is_not_written(app, spans):
    result = run_task(app)
    app.backend.store_result(result.id, None, "STARTED")
    inits = [s for s in spans() if s.name == names.SPAN_STATE_INIT]
    assert [(s.attributes or {})[names.ATTR_STATE_OUTCOME] for s in inits] == [
        names.OUTCOME_CREATED, names.OUTCOME_NOT_WRITTEN]
    assert AsyncResult(result.id, app=app).state == "SUCCESS"


def test_a_global_keyprefix_on_the_worker_only_is_a_key_mismatch(redis_server, instrumented, spans):
    """The worker stores under its ``global_keyprefix``, the web tier reads without one."""
    worker_app = make_app(redis_server, result_backend_transport_options={"global_keyprefix": "wf"})
    web_app = make_app(redis_server)
    try:
        result = run_task(worker_app)
        state, read = state_of(web_app, result.id, spans)
    finally:
        worker_app.close()
        web_app.close()
    assert state == "PENDING"
    assert verdict(read)[0] == names.CAUSE_KEY_MISMATCH
    assert [s.attributes[names.ATTR_STATE_KEY] for s in spans() if s.name == names.SPAN_STATE_INIT] == [
        task_key(result.id, "wf_")]


# --- chords: the join state ---


def join_key(group_id: str, suffix: str) -> str:
    return f"celery-taskset-meta-{group_id}{suffix}"


def run_chord_losing_its_join_state(app: Celery, r: redis.Redis, lose: Callable[[str], None]) -> str:
    """A chord of three header tasks whose third waits until ``lose(group_id)`` has run; returns the
    group id once the worker has handled everything (the callback would have run before the probe)."""
    gates = {name: threading.Event() for name in ("first", "second", "third")}
    GATES.update(gates)
    gates["first"].set()
    gates["second"].set()
    CALLBACKS.clear()
    header = [app.tasks["gated"].s(name, i) for i, name in enumerate(gates)]
    with worker(app):
        chord_result = chord(header)(app.tasks["collect"].s())
        group_id = chord_result.parent.id
        wait_for(lambda: AsyncResult(chord_result.parent.results[1].id, app=app).state == "SUCCESS", 20.0)
        wait_for(lambda: r.exists(join_key(group_id, ".j")) == 1, 10.0)
        lose(group_id)
        gates["third"].set()
        wait_for(lambda: AsyncResult(chord_result.parent.results[2].id, app=app).state == "SUCCESS", 20.0)
        probe = app.tasks["add"].delay(1, 1)  # one queue, one solo worker: it runs after a callback
        assert probe.get(timeout=20) == 2
    assert flush_journals(5.0)
    return group_id


def join_reads(spans: Spans, group_id: str) -> list[ReadableSpan]:
    return [s for s in spans() if s.name == names.SPAN_STATE_GET
            and (s.attributes or {}).get(names.ATTR_RUN_ID) == group_id]


def test_a_chord_runs_its_callback_and_every_join_state_read_hits(r, app, spans):
    with worker(app):
        GATES["open"] = threading.Event()
        GATES["open"].set()
        result = chord([app.tasks["gated"].s("open", i) for i in range(3)])(app.tasks["collect"].s())
        assert result.get(timeout=20) == 3
    group_id = result.parent.id
    reads_ = join_reads(spans, group_id)
    assert [(s.attributes or {})[names.ATTR_STATE_OUTCOME] for s in reads_] == [names.OUTCOME_HIT] * 2
    assert {(s.attributes or {})[names.ATTR_STATE_KEY] for s in reads_} == {join_key(group_id, ".j")}
    appends = [s for s in spans() if s.name == names.SPAN_STATE_INIT
               and (s.attributes or {})[names.ATTR_STATE_KEY] == join_key(group_id, ".j")]
    assert [(s.attributes or {})[names.ATTR_NODE_ID] for s in appends] == ["gated"] * 3
    [size] = [s for s in spans() if s.name == names.SPAN_STATE_INIT
              and (s.attributes or {})[names.ATTR_STATE_KEY] == join_key(group_id, ".s")]
    assert (size.attributes or {})[names.ATTR_RUN_ID] == group_id


def test_a_chord_whose_join_state_was_deleted_never_calls_back_and_says_deleted(r, app, watcher, spans):
    group_id = run_chord_losing_its_join_state(
        app, r, lambda gid: (r.delete(join_key(gid, ".j"), join_key(gid, ".t")),
                             tombstone_seen(join_key(gid, ".j"))))
    assert CALLBACKS == []
    misses = [s for s in join_reads(spans, group_id)
              if (s.attributes or {})[names.ATTR_STATE_OUTCOME] == names.OUTCOME_MISS]
    assert len(misses) == 1
    assert misses[0].attributes[names.ATTR_STATE_KEY] == join_key(group_id, ".j")
    assert misses[0].attributes[names.ATTR_NODE_ID] == "gated"
    assert verdict(misses[0]) == (names.CAUSE_DELETED, names.CONFIDENCE_DEFINITIVE)


def test_a_chord_whose_join_state_expired_never_calls_back_and_says_expired(r, redis_server, watcher, spans):
    # Celery 5.7 gives the join state result_chord_expires (default: result_expires); 5.5 and 5.6
    # result_expires. Both run out here.
    app = make_app(redis_server, result_expires=2)
    try:
        group_id = run_chord_losing_its_join_state(
            app, r, lambda gid: (wait_for(lambda: not r.exists(join_key(gid, ".j")), 10.0),
                                 tombstone_seen(join_key(gid, ".j"))))
    finally:
        app.close()
    assert CALLBACKS == []
    misses = [s for s in join_reads(spans, group_id)
              if (s.attributes or {})[names.ATTR_STATE_OUTCOME] == names.OUTCOME_MISS]
    assert len(misses) == 1
    assert misses[0].attributes[names.ATTR_STATE_KEY] == join_key(group_id, ".j")
    assert verdict(misses[0]) == (names.CAUSE_EXPIRED, names.CONFIDENCE_DEFINITIVE)


def test_the_join_state_check_costs_two_exists_and_one_get_per_header_task(r, redis_server):
    """Measured on the backend's server (INFO commandstats), the same chord bare and instrumented:
    each header task's check adds EXISTS .j, EXISTS .s and GET .c, nothing else there (the journal,
    and so the history read of a first header task, is on a server of its own here)."""
    with RedisServer() as broker, RedisServer() as journal:
        set_config(SubflowConfig(journal_url=journal.url(), analysis_rate_per_s=1e6, analysis_burst=10**6))
        app = make_app(redis_server)
        app.conf.broker_url = broker.url(BROKER_DB)
        GATES["open"] = threading.Event()
        GATES["open"].set()

        def chord_calls() -> dict[str, int]:
            CALLBACKS.clear()
            before = commandstats(r)
            with worker(app):  # (leaving the block waits for the task in progress: the callback's store)
                chord([app.tasks["gated"].s("open", i) for i in range(3)])(app.tasks["collect"].s())
                wait_for(lambda: CALLBACKS == [[0, 1, 2]], 20.0)
            return commandstats_delta(before, commandstats(r))

        try:
            bare = chord_calls()
            instrumentor = CeleryResultInstrumentor()
            instrumentor.instrument(watch=False)
            try:
                traced = chord_calls()
            finally:
                instrumentor.uninstrument()
        finally:
            app.close()
    added = {command: traced.get(command, 0) - bare.get(command, 0) for command in ("exists", "get")}
    assert added == {"exists": 6, "get": 3}, (bare, traced)
    assert r.keys(names.JOURNAL_KEY_PREFIX + "*") == []  # the journal is elsewhere


def test_uninstrument_restores_the_backend(redis_server):
    from celery.backends.redis import RedisBackend

    attrs = ("_get_task_meta_for", "_store_result", "set_chord_size", "on_chord_part_return")
    before = {attr: vars(RedisBackend).get(attr) for attr in attrs}
    instrumentor = CeleryResultInstrumentor()
    instrumentor.instrument(watch=False)
    try:
        assert all(vars(RedisBackend).get(attr) is not before[attr] for attr in attrs)
    finally:
        instrumentor.uninstrument()
    assert {attr: vars(RedisBackend).get(attr) for attr in attrs} == before
    assert "_get_task_meta_for" not in vars(RedisBackend)  # inherited: restored by deleting ours


def test_the_core_never_imports_celery_and_the_entry_point_is_declared():
    import subprocess
    import sys

    code = ("import sys, otel_subflow, otel_subflow.integrations, otel_subflow._instrument.instrumentor, "
            "otel_subflow.cli; print('celery' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
    assert declared_instrumentor("celery_results") == [
        "otel_subflow.integrations.celery:CeleryResultInstrumentor"]
    assert declared_requirements("celery") == ["celery<6,>=5.5"]
    assert "celery<6,>=5.5" in declared_requirements("test")
