"""Decorators that fit real code (issue 13, point 1): only Redis clients, ``missing_on=``, ``wrote=``,
watchers with several key templates, no made-up key attribute, a key prefixed on one side only."""

from __future__ import annotations

import sys
import textwrap
import traceback

import pytest
import redis.asyncio as aredis

from otel_subflow import (
    KeyspaceWatcher,
    SubflowConfig,
    SubflowInstrumentationWarning,
    SubflowInstrumentor,
    flush_journals,
    instrument_state_get,
    instrument_state_init,
    names,
)
from otel_subflow._boundary import internal_error_counts
from otel_subflow._journal import store
from otel_subflow._runtime import runtime
from otel_subflow._watch import lease
from otel_subflow._watch.events import key_matcher
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import wait_for
from tests.service import get_state


def _span(spans, name):
    return next(s for s in spans() if s.name == name)


def _missing_event(span):
    return next(e for e in span.events if e.name == names.EVENT_STATE_MISSING).attributes


# -- never a made-up key attribute ----------------------------------------------------------------


def test_no_key_attribute_when_the_call_lacks_a_template_field(r, spans):
    """A run id, node id or template field the call does not give leaves the key out (never
    ``...:None``), and the miss's verdict says the key could not be built."""

    @instrument_state_get(key="wf:{tenant}:{run_id}:{node_id}")
    def load(redis, tenant, run_id, node_id):
        return None

    load(r, "acme", "R1", None)
    load(r, None, "R1", "N1")
    load(r, "acme", "R1", "N1")
    no_node, no_tenant, full = [s for s in spans() if s.name == names.SPAN_STATE_GET]
    for span in (no_node, no_tenant):
        assert names.ATTR_STATE_KEY not in span.attributes
        assert "None" not in str(dict(span.attributes))
        assert _missing_event(span)[names.ATTR_MISSING_CAUSE] == names.CAUSE_UNKNOWN
        assert "key could not be built" in _missing_event(span)[names.ATTR_MISSING_SUMMARY]
    assert full.attributes[names.ATTR_STATE_KEY] == "wf:acme:R1:N1"


CELERY_LIKE = '''
class Backend:
    """No run_id / node_id parameters, the client in another attribute, as Celery's RedisBackend."""

    def __init__(self, client):
        self.conn = client

    def get_task_meta(self, task_id):
        return self.conn.get("celery-task-meta-" + task_id)
'''


def test_env_var_path_never_makes_up_a_key(r, spans, tmp_path, monkeypatch):
    """``OTEL_SUBFLOW_INSTRUMENT_GET`` on a function without run/node parameters: the span has no key
    attribute (the issue saw ``subflow:state:None:None``); an attribute path the object lacks is a
    missing value, not an untraced call."""
    (tmp_path / "fit_celery_like.py").write_text(textwrap.dedent(CELERY_LIKE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OTEL_SUBFLOW_WATCH", "false")
    import fit_celery_like

    instrumentor = SubflowInstrumentor()
    with pytest.warns(UserWarning):
        instrumentor.instrument(get_targets="fit_celery_like:Backend.get_task_meta[client=self.nope.deeper]")
    try:
        assert fit_celery_like.Backend(r).get_task_meta("t-1") is None
    finally:
        instrumentor.uninstrument()
        sys.modules.pop("fit_celery_like", None)
    span = _span(spans, names.SPAN_STATE_GET)
    assert names.ATTR_STATE_KEY not in span.attributes
    assert span.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_MISS
    assert "None" not in str(dict(span.attributes))


# -- only Redis clients ---------------------------------------------------------------------------


def test_what_counts_as_a_redis_client(r):
    """A pool (sync or asyncio) or an execute_command (a cluster client): yes; the module, a class, None: no."""
    import redis as redis_module
    import redis.asyncio as aredis
    from redis.cluster import RedisCluster

    from otel_subflow._redis.endpoint import is_redis_client

    assert is_redis_client(r)
    assert is_redis_client(aredis.Redis())
    assert is_redis_client(RedisCluster.__new__(RedisCluster))  # no connection_pool, an execute_command
    assert not hasattr(RedisCluster.__new__(RedisCluster), "connection_pool")
    for other in (redis_module, redis_module.Redis, None, "redis://localhost", object()):
        assert not is_redis_client(other)


def test_celery_like_self_redis_module_warns_at_decoration_and_is_skipped(r, spans):
    """``self.redis`` is the redis-py module (a class attribute, as on Celery's RedisBackend): a warning
    when the method is decorated; at call time the next candidate (``self.client``) is the client."""
    import redis as redis_module

    with pytest.warns(SubflowInstrumentationWarning, match=r"self\.redis = the module 'redis'"):

        class Backend:
            redis = redis_module

            def __init__(self, client):
                self.client = client

            @instrument_state_get(run_id="task_id", node_id="task_id", key="celery-task-meta-{run_id}")
            def get_task_meta(self, task_id):
                return self.client.get(f"celery-task-meta-{task_id}")

    assert Backend(r).get_task_meta("t-1") is None
    span = _span(spans, names.SPAN_STATE_GET)
    assert span.attributes[names.ATTR_SERVER_PORT] == r.connection_pool.connection_kwargs["port"]
    assert _missing_event(span)[names.ATTR_MISSING_CAUSE] == names.CAUSE_NEVER_WRITTEN


def test_no_client_but_the_module_is_no_client_found(r, spans):
    """Only ``self.redis`` = the module: skipped, so the verdict says no Redis client was found."""
    import redis as redis_module

    with pytest.warns(SubflowInstrumentationWarning, match="not a Redis client"):

        class Backend:
            redis = redis_module

            @instrument_state_get()
            def get_state(self, run_id, node_id):
                return None

    assert Backend().get_state("R", "N") is None
    span = _span(spans, names.SPAN_STATE_GET)
    assert names.ATTR_SERVER_ADDRESS not in span.attributes
    assert "no Redis client was found" in _missing_event(span)[names.ATTR_MISSING_SUMMARY]


def test_a_non_client_seen_only_at_call_time_is_skipped_and_logged(r, spans, caplog):
    """``self.redis`` set on the instance (unknown at decoration): skipped at each call, said in a log
    line (never a warning raised in the caller), and the next candidate is used."""
    import redis as redis_module

    class Store:
        def __init__(self, client):
            self.redis = redis_module
            self.client = client

        @instrument_state_get()
        def get_state(self, run_id, node_id):
            return self.client.get(f"subflow:state:{run_id}:{node_id}")

    r.set("subflow:state:R:N", "v")
    with caplog.at_level("WARNING", logger=names.LOGGER_NAME):
        assert Store(r).get_state("R", "N") == b"v"
        assert Store(r).get_state("R", "N") == b"v"
    lines = [rec.getMessage() for rec in caplog.records if "not a Redis client" in rec.getMessage()]
    assert len(lines) == 1 and "self.redis is the module 'redis'" in lines[0]
    assert all(s.attributes[names.ATTR_SERVER_PORT] for s in spans() if s.name == names.SPAN_STATE_GET)


def test_instrumentor_checks_the_class_it_wraps(r, tmp_path, monkeypatch):
    """Wrapped by name after the class exists (the instrumentors): its ``redis`` attribute is checked then."""
    (tmp_path / "fit_backend.py").write_text(textwrap.dedent('''
        import redis

        class RedisBackend:
            redis = redis

            def get(self, run_id, node_id):
                return None
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OTEL_SUBFLOW_WATCH", "false")
    import fit_backend  # noqa: F401 - imported before instrumenting: wrapped at once

    instrumentor = SubflowInstrumentor()
    try:
        with pytest.warns(SubflowInstrumentationWarning, match=r"self\.redis = the module 'redis'"):
            instrumentor.instrument(get_targets="fit_backend:RedisBackend.get")
    finally:
        instrumentor.uninstrument()
        sys.modules.pop("fit_backend", None)


def test_explicit_client_that_is_no_client_never_crashes(r, spans):
    """``client=`` resolving to something else: the call returns its value; the verdict says why."""
    import redis as redis_module

    @instrument_state_get(client=lambda a: redis_module)
    def load(run_id, node_id):
        return None

    assert load("R", "N") is None
    event = _missing_event(_span(spans, names.SPAN_STATE_GET))
    assert event[names.ATTR_MISSING_CAUSE] == names.CAUSE_UNKNOWN
    assert "not a Redis client" in event[names.ATTR_MISSING_SUMMARY]
    assert event[names.EVIDENCE_PREFIX + "client_type"] == "module"


# -- missing_on: an exception that means "missing" ------------------------------------------------


class ResultNotFound(Exception):
    """As arq's: the job's result is not there."""


def _outcome_points(metric_points, operation, outcome):
    return sum(p.count for p in metric_points(names.METRIC_OPERATION_DURATION)
               if p.attributes == {names.ATTR_STATE_OPERATION: operation, names.ATTR_STATE_OUTCOME: outcome})


def _ops(client, run_id):
    flush_journals(2.0)
    return [(e.op, e.key) for e in store.read_run(client, run_id)]


def test_missing_on_exception_is_a_miss_and_is_reraised_unchanged(r, spans, metric_points):
    """The exception counts as a miss (span, metric, verdict, journal as for a None result) and reaches
    the caller as the very same object with the very same traceback."""
    raised = []

    @instrument_state_get(missing_on=(ResultNotFound,))
    def fetch(redis, run_id, node_id):
        if redis.get(f"subflow:state:{run_id}:{node_id}") is None:
            exc = ResultNotFound(node_id)
            raised.append(exc)
            raise exc
        return b"v"

    @instrument_state_get()
    def fetch_none(redis, run_id, node_id):
        return redis.get(f"subflow:state:{run_id}:{node_id}")

    misses = _outcome_points(metric_points, names.OPERATION_GET, names.OUTCOME_MISS)
    with pytest.raises(ResultNotFound) as caught:
        fetch(r, "run-mo", "a")
    assert caught.value is raised[0]
    frames = traceback.extract_tb(caught.value.__traceback__)
    assert [f.name for f in frames][-2:] == ["wrapper", "fetch"]
    assert frames[-1].line == "raise exc"
    assert fetch_none(r, "run-mo", "b") is None
    assert _outcome_points(metric_points, names.OPERATION_GET, names.OUTCOME_MISS) == misses + 2
    by_exception, by_none = [s for s in spans() if s.name == names.SPAN_STATE_GET]
    for span in (by_exception, by_none):
        assert span.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_MISS
        assert names.ATTR_ERROR_TYPE not in span.attributes
        assert _missing_event(span)[names.ATTR_MISSING_CAUSE] == names.CAUSE_NEVER_WRITTEN
    assert by_exception.status.status_code == by_none.status.status_code
    assert _ops(r, "run-mo") == [("miss", "subflow:state:run-mo:a"), ("miss", "subflow:state:run-mo:b")]


def test_other_exceptions_stay_errors(r, spans):
    """An exception not in missing_on is outcome error, no verdict."""

    @instrument_state_get(missing_on=ResultNotFound)
    def fetch(redis, run_id, node_id):
        raise KeyError(node_id)

    with pytest.raises(KeyError):
        fetch(r, "run-me", "a")
    span = _span(spans, names.SPAN_STATE_GET)
    assert span.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_ERROR
    assert not [e for e in span.events if e.name == names.EVENT_STATE_MISSING]


async def test_missing_on_async(redis_server, r, spans):
    """The async wrapper: the miss is analysed on redis.asyncio, the exception re-raised unchanged."""
    client = aredis.Redis(host=redis_server.host, port=redis_server.port)

    @instrument_state_get(missing_on=(ResultNotFound,))
    async def fetch(redis, run_id, node_id):
        if await redis.get(f"subflow:state:{run_id}:{node_id}") is None:
            raise ResultNotFound(node_id)
        return b"v"

    try:
        with pytest.raises(ResultNotFound) as caught:
            await fetch(client, "run-ma", "a")
    finally:
        await client.aclose()
    assert traceback.extract_tb(caught.value.__traceback__)[-1].name == "fetch"
    span = _span(spans, names.SPAN_STATE_GET)
    assert span.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_MISS
    assert _missing_event(span)[names.ATTR_MISSING_CAUSE] == names.CAUSE_NEVER_WRITTEN


def test_missing_on_that_is_not_an_exception_class_warns():
    with pytest.warns(SubflowInstrumentationWarning, match="missing_on"):
        instrument_state_get(missing_on=(ResultNotFound, "NotFound"))(lambda redis, run_id, node_id: None)


# -- wrote: an init that wrote nothing --------------------------------------------------------------


def test_wrote_false_is_not_journalled(r, spans, metric_points):
    """``wrote=`` false: outcome not_written, no init in the journal; true: created and journalled."""

    @instrument_state_init(wrote=lambda result: result is not None)
    def finish(redis, run_id, node_id, result=None):
        if result is None:
            return None  # a retry with no result: nothing written
        redis.set(f"subflow:state:{run_id}:{node_id}", result)
        return result

    before = _outcome_points(metric_points, names.OPERATION_INIT, names.OUTCOME_NOT_WRITTEN)
    assert finish(r, "run-w", "a") is None
    assert finish(r, "run-w", "b", "v") == "v"
    skipped, written = [s for s in spans() if s.name == names.SPAN_STATE_INIT]
    assert skipped.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_NOT_WRITTEN
    assert written.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_CREATED
    assert _outcome_points(metric_points, names.OPERATION_INIT, names.OUTCOME_NOT_WRITTEN) == before + 1
    assert _ops(r, "run-w") == [("init", "subflow:state:run-w:b")]


def test_a_not_written_init_leaves_the_race_to_the_init_that_writes(r, spans):
    """A miss, then an init that wrote nothing, then one that wrote: the race is the second init's."""

    @instrument_state_init(wrote=bool)
    def init(redis, run_id, node_id, write):
        return bool(write and redis.set(f"subflow:state:{run_id}:{node_id}", 1))

    assert get_state(r, "run-wr", "a") is None
    init(r, "run-wr", "a", False)
    init(r, "run-wr", "a", True)
    skipped, written = [s for s in spans() if s.name == names.SPAN_STATE_INIT]
    assert not [e for e in skipped.events if e.name == names.EVENT_STATE_RACE]
    assert [e for e in written.events if e.name == names.EVENT_STATE_RACE]


def test_a_failing_wrote_predicate_is_swallowed_and_counts_as_written(r, spans, monkeypatch):
    """The predicate raised: our boundary swallows it (counted), the call counts as written."""
    monkeypatch.delenv("OTEL_SUBFLOW_RAISE_INTERNAL_ERRORS", raising=False)

    def broken(result):
        raise RuntimeError("predicate bug")

    @instrument_state_init(wrote=broken)
    def init(redis, run_id, node_id):
        return redis.set(f"subflow:state:{run_id}:{node_id}", 1)

    assert init(r, "run-wx", "a") is True
    assert _span(spans, names.SPAN_STATE_INIT).attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_CREATED
    assert internal_error_counts() == {"decorator.wrote": 1}
    assert _ops(r, "run-wx") == [("init", "subflow:state:run-wx:a")]


# -- watchers with several key templates ----------------------------------------------------------


def _tombstones(client, run_id):
    flush_journals(2.0)
    return sorted((e.op, e.key, e.node_id) for e in store.read_run(client, run_id) if e.op in ("del", "expired"))


def test_a_watcher_parses_keys_of_each_of_its_templates(r):
    """``key_templates=[...]``: run and node parsed from keys of any of them, the config's still
    matched, other keys ignored."""
    with RedisServer(notify_keyspace_events="Exeg") as server:
        client = server.client()
        watcher = KeyspaceWatcher(server.client(), config=SubflowConfig(),
                                  key_templates=["arq:result:{run_id}", "rq:job:{run_id}:{node_id}:state"])
        with watcher:
            assert watcher.wait_subscribed(10)
            for key in ("arq:result:J1", "rq:job:J1:n1:state", "subflow:state:J1:n2", "rq:job:J1:n1", "other"):
                client.set(key, 1)
                client.delete(key)
            wait_for(lambda: len(_tombstones(client, "J1")) == 3, 10)
        assert _tombstones(client, "J1") == [("del", "arq:result:J1", None), ("del", "rq:job:J1:n1:state", "n1"),
                                             ("del", "subflow:state:J1:n2", "n2")]
        assert watcher.stats.ignored >= 2
        client.close()


def test_decorators_register_their_key_templates_with_every_watcher(r):
    """A decorator applied while a watcher runs: its key format is known to the watcher at once, with
    no setting; a callable key registers nothing; a template of fields only is never registered."""
    with RedisServer(notify_keyspace_events="Exeg") as server:
        client = server.client()
        with KeyspaceWatcher(server.client(), config=SubflowConfig()) as watcher:
            assert watcher.wait_subscribed(10)
            client.set("celery-task-meta-T1", 1)
            client.delete("celery-task-meta-T1")  # before any decorator named the format: not a state
            wait_for(lambda: watcher.stats.ignored >= 1, 10)

            @instrument_state_get(run_id="task_id", node_id="task_id", key="celery-task-meta-{run_id}")
            def get_meta(client, task_id):
                return client.get(f"celery-task-meta-{task_id}")

            before = runtime.key_templates.snapshot()
            instrument_state_get(key=lambda a: "x")(lambda redis, run_id, node_id: None)
            instrument_state_get(key="{run_id}{node_id}")(lambda redis, run_id, node_id: None)
            assert runtime.key_templates.snapshot() == before == ("celery-task-meta-{run_id}",)
            client.set("celery-task-meta-T1", 1)
            client.delete("celery-task-meta-T1")
            wait_for(lambda: len(_tombstones(client, "T1")) == 1, 10)
            assert "celery-task-meta-{run_id}" in watcher.templates
        assert _tombstones(client, "T1") == [("del", "celery-task-meta-T1", None)]
        client.close()


def test_the_elected_watcher_knows_the_registered_templates(r, monkeypatch):
    """The watcher the lease elects (no key_templates given) journals tombstones of a decorator's format."""
    monkeypatch.setattr(lease, "LEASE_EVERY_S", 0.2)
    with RedisServer(notify_keyspace_events="Exeg") as server:
        client = server.client()

        @instrument_state_init(key="wf:{run_id}/{node_id}")
        def save(redis, run_id, node_id):
            return redis.set(f"wf:{run_id}/{node_id}", 1)

        coordinator = lease.start_watching(SubflowConfig())
        assert coordinator is not None
        try:
            save(client, "E1", "n1")
            wait_for(lambda: any(w.subscribed for w in coordinator.watchers()), 10)
            client.delete("wf:E1/n1")
            wait_for(lambda: ("del", "wf:E1/n1", "n1") in _tombstones(client, "E1"), 10)
        finally:
            lease.stop_watching(2.0)
        client.close()


def test_key_matchers_are_compiled_once_per_template_set():
    """The same templates (duplicates aside) give the same compiled matcher; first match wins."""
    a = key_matcher(("subflow:state:{run_id}:{node_id}", "job:{run_id}"))
    assert key_matcher(("subflow:state:{run_id}:{node_id}", "job:{run_id}", "job:{run_id}")) is not a
    assert key_matcher(("subflow:state:{run_id}:{node_id}", "job:{run_id}")) is a
    assert a.match("job:J") == {"run_id": "J"}
    assert a.match("{subflow:journal}:job:J") is None
    assert a.match("nope") is None


# -- a key prefixed on one side only --------------------------------------------------------------


def test_a_prefix_on_the_writer_side_only_is_a_key_mismatch(r, spans):
    """The worker writes under a global key prefix and names no node; the service reads the plain key:
    key_mismatch (not never_written) from the run's journal, naming both spellings."""

    @instrument_state_init(node_id=lambda a: None, key=lambda a: f"myprefix:subflow:state:{a['run_id']}:{a['task']}")
    def store_result(redis, run_id, task, result):
        return redis.set(f"myprefix:subflow:state:{run_id}:{task}", result, px=60_000)

    assert store_result(r, "run-px", "n1", "v") is True
    flush_journals(2.0)
    assert get_state(r, "run-px", "n1") is None
    event = _missing_event(_span(spans, names.SPAN_STATE_GET))
    assert event[names.ATTR_MISSING_CAUSE] == names.CAUSE_KEY_MISMATCH
    assert event[names.ATTR_MISSING_CONFIDENCE] == names.CONFIDENCE_DEFINITIVE
    evidence = {k.removeprefix(names.EVIDENCE_PREFIX): v for k, v in event.items()}
    assert (evidence["read_key"], evidence["written_key"]) == ("subflow:state:run-px:n1",
                                                               "myprefix:subflow:state:run-px:n1")
    assert (evidence["key_affix"], evidence["key_affix_text"]) == ("prefix", "myprefix:")
