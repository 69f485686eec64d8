"""Redis Cluster (redis-py's ``RedisCluster``) as the client of decorated functions, on a real cluster:
three masters and three replicas (``redis-server --cluster-enabled yes``, ``redis-cli --cluster create``)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from opentelemetry.sdk.trace import ReadableSpan
from redis.cluster import RedisCluster

from otel_subflow import (
    KeyspaceWatcher,
    SubflowConfig,
    flush_journals,
    instrument_state_get,
    instrument_state_init,
    names,
)
from otel_subflow._config import set_config
from otel_subflow._journal import schema
from otel_subflow._journal.store import read_run
from otel_subflow._runtime import runtime
from otel_subflow._watch.cluster import ClusterWatcher
from otel_subflow.lab.cluster import ClusterServers
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import fill_until_evicted, wait_for

Spans = Callable[[], list[ReadableSpan]]


@pytest.fixture
def lab(cluster: ClusterServers) -> ClusterServers:
    """The session's cluster (conftest's ``cluster``: healed, emptied, fresh otel-subflow state)."""
    set_config(SubflowConfig(analysis_rate_per_s=1e6, analysis_burst=10**6, enable_keyspace_events=True))
    return cluster


@pytest.fixture
def app(lab: ClusterServers) -> Iterator[RedisCluster]:
    """The application's cluster client."""
    client = lab.client()
    yield client
    flush_journals(2.0)
    client.close()


@instrument_state_init()
def initialize_state(client: Any, run_id: str, node_id: str, data: bytes, ttl_ms: int = 60_000) -> None:
    client.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms)


@instrument_state_get()
def get_state(client: Any, run_id: str, node_id: str) -> bytes | None:
    return client.get(f"subflow:state:{run_id}:{node_id}")


@instrument_state_get(key="tenant:subflow:state:{run_id}:{node_id}")
def get_prefixed_state(client: Any, run_id: str, node_id: str) -> bytes | None:
    return client.get(f"tenant:subflow:state:{run_id}:{node_id}")


def key_of(run_id: str, node_id: str) -> str:
    return f"subflow:state:{run_id}:{node_id}"


def verdict(span: ReadableSpan) -> tuple[str, str]:
    [event] = [e for e in span.events if e.name == names.EVENT_STATE_MISSING]
    attributes = event.attributes or {}
    return str(attributes[names.ATTR_MISSING_CAUSE]), str(attributes[names.ATTR_MISSING_CONFIDENCE])


def last_get(spans: Spans) -> ReadableSpan:
    return [s for s in spans() if s.name == names.SPAN_STATE_GET][-1]


def test_spans_name_the_master_serving_the_key_with_the_apps_client_id(lab, app, spans):
    runs = [f"run-{i}" for i in range(12)]
    for run in runs:
        initialize_state(app, run, "n", b"x")
        assert get_state(app, run, "n") == b"x"
    owners = set()
    for span in spans():
        attributes = span.attributes or {}
        owner = lab.owner_of(str(attributes[names.ATTR_STATE_KEY]))
        owners.add(owner)
        assert (attributes[names.ATTR_SERVER_ADDRESS], attributes[names.ATTR_SERVER_PORT]) == owner
        assert attributes.get(names.ATTR_STATE_OUTCOME) in (names.OUTCOME_CREATED, names.OUTCOME_HIT)
    assert len(owners) == 3  # twelve runs reach every master
    # the client id is the app's own connection on that node (CLIENT LIST of the owner names it)
    span = spans()[-1]
    attributes = span.attributes or {}
    node = lab.node_client(*lab.owner_of(str(attributes[names.ATTR_STATE_KEY])))
    try:
        ids = {int(c["id"]) for c in node.client_list()}
        assert int(attributes[names.ATTR_REDIS_CLIENT_ID]) in ids
        assert attributes[names.ATTR_REDIS_SERVER_RUN_ID] == node.info("server")["run_id"]
    finally:
        node.close()


def test_the_journal_lives_on_the_master_of_its_slot(lab, app, spans):
    for i in range(6):
        initialize_state(app, f"run-j{i}", "n", b"x")
    assert flush_journals(5.0)
    owner = lab.owner_of(schema.INDEX_KEY)
    for host, port in lab.masters():
        node = lab.node_client(host, port)
        try:
            has_journal = bool(node.keys(names.JOURNAL_KEY_PREFIX + "*"))
            assert has_journal == ((host, port) == owner), (host, port, owner)
            if (host, port) == owner:
                entries = read_run(node, "run-j3")
                assert [(e.op, e.key) for e in entries] == [(schema.OP_INIT, key_of("run-j3", "n"))]
        finally:
            node.close()


def test_a_state_never_written_is_never_written(app, spans):
    assert get_state(app, "nobody", "n") is None
    assert verdict(last_get(spans))[0] == names.CAUSE_NEVER_WRITTEN


def test_a_key_read_under_another_prefix_is_a_key_mismatch(app, spans):
    initialize_state(app, "run-km", "n", b"x")
    assert flush_journals(5.0)
    assert get_prefixed_state(app, "run-km", "n") is None
    assert verdict(last_get(spans))[0] == names.CAUSE_KEY_MISMATCH


@pytest.fixture
def watcher(app: RedisCluster) -> Iterator[KeyspaceWatcher]:
    watching = KeyspaceWatcher(app, enable_events=True, refresh_s=0.2)
    assert isinstance(watching, ClusterWatcher)
    watching.start()
    assert watching.wait_subscribed(10)
    yield watching
    watching.stop()


def test_the_watcher_covers_every_master(lab, watcher):
    assert sorted(watcher.watchers) == sorted(lab.masters())


def test_an_expired_state_is_expired(app, watcher, spans):
    initialize_state(app, "run-x", "n", b"x", ttl_ms=100)
    assert flush_journals(5.0)
    wait_for(lambda: runtime.recent_tombstones.get(key_of("run-x", "n")) is not None, 10.0)
    assert flush_journals(5.0)
    assert get_state(app, "run-x", "n") is None
    assert verdict(last_get(spans)) == (names.CAUSE_EXPIRED, names.CONFIDENCE_DEFINITIVE)


def test_a_deleted_state_is_deleted(app, watcher, spans):
    initialize_state(app, "run-d", "n", b"x")
    assert flush_journals(5.0)
    app.delete(key_of("run-d", "n"))
    wait_for(lambda: runtime.recent_tombstones.get(key_of("run-d", "n")) is not None, 10.0)
    assert flush_journals(5.0)
    assert get_state(app, "run-d", "n") is None
    assert verdict(last_get(spans)) == (names.CAUSE_DELETED, names.CONFIDENCE_DEFINITIVE)


def test_the_watcher_follows_a_failover(lab, app, watcher):
    old = lab.owner_of(key_of("run-f", "n"))
    promoted = lab.replica_of(old)
    lab.failover(promoted)
    wait_for(lambda: promoted in watcher.watchers and old not in watcher.watchers, 15.0)
    assert watcher.wait_subscribed(10)
    assert sorted(watcher.watchers) == sorted(lab.masters())


def test_a_write_lost_in_a_failover_is_a_definitive_failover(lab, app, spans):
    """The replica is stopped (SIGSTOP) and its link cut before the write, the master killed right after
    it: the write was acknowledged and provably never reached the replica, which the cluster promotes."""
    journal_owner = lab.owner_of(schema.INDEX_KEY)  # the journal must outlive the failed master
    run = next(f"run-fo{i}" for i in range(200) if lab.owner_of(key_of(f"run-fo{i}", "n")) != journal_owner)
    old = lab.owner_of(key_of(run, "n"))
    replica = lab.replica_of(old)
    stopped = lab.node(replica).process
    assert stopped is not None
    stopped.send_signal(signal.SIGSTOP)
    try:
        with contextlib.closing(lab.node_client(*old)) as master:  # the link breaks: nothing in flight
            assert master.client_kill_filter(_type="replica") == 1
        initialize_state(app, run, "n", b"x")  # acknowledged by the master alone
        assert flush_journals(5.0)
        lab.kill(old)
    finally:
        stopped.send_signal(signal.SIGCONT)
    try:
        lab.wait_promoted(replica, 30.0)
        with contextlib.closing(lab.node_client(*replica)) as promoted:
            assert promoted.get(key_of(run, "n")) is None  # not on the promoted replica
        assert get_state(app, run, "n") is None  # the cluster client follows the slot to it
        read = last_get(spans)
        assert ((read.attributes or {})[names.ATTR_SERVER_ADDRESS],
                (read.attributes or {})[names.ATTR_SERVER_PORT]) == replica
        assert verdict(read) == (names.CAUSE_FAILOVER, names.CONFIDENCE_DEFINITIVE)
        [event] = [e for e in read.events if e.name == names.EVENT_STATE_MISSING]
        assert f"{old[0]}:{old[1]}" in str((event.attributes or {})[names.ATTR_MISSING_SUMMARY])
    finally:
        lab.heal()


def test_elected_watchers_cover_every_master_and_follow_a_failover(lab, app, spans):
    """configure()'s watching (the lease election) on a cluster: every master gets a watcher, each with a
    lease key in a slot it serves; after a failover the promoted replica gets one, the demoted master not."""
    from otel_subflow._watch.lease import start_watching, stop_watching

    coordinator = start_watching()
    assert coordinator is not None

    def watched() -> list[str]:
        return sorted(w.endpoint for w in coordinator.watchers() if w.subscribed)

    def masters() -> list[str]:
        return sorted(f"{host}:{port}" for host, port in lab.masters())

    try:
        initialize_state(app, "run-e", "n", b"x", ttl_ms=150)  # one call: the cluster's masters are noticed
        wait_for(lambda: watched() == masters(), 20.0)
        assert flush_journals(5.0)
        wait_for(lambda: runtime.recent_tombstones.get(key_of("run-e", "n")) is not None, 10.0)
        assert flush_journals(5.0)
        assert get_state(app, "run-e", "n") is None
        assert verdict(last_get(spans)) == (names.CAUSE_EXPIRED, names.CONFIDENCE_DEFINITIVE)
        old = lab.owner_of(key_of("run-e", "n"))
        lab.failover(lab.replica_of(old))
        wait_for(lambda: watched() == masters(), 30.0)
    finally:
        stop_watching()
        lab.heal()


def run_on(lab: ClusterServers, *, journal_node: bool, prefix: str) -> str:
    """A run id whose state key lives (or not) on the master that holds the journal."""
    journal_owner = lab.owner_of(schema.INDEX_KEY)
    return next(f"{prefix}{i}" for i in range(500)
                if (lab.owner_of(key_of(f"{prefix}{i}", "n")) == journal_owner) == journal_node)


@pytest.mark.parametrize("with_journal", [False, True], ids=["journal-elsewhere", "journal-on-the-key-node"])
def test_a_miss_is_analysed_in_at_most_two_round_trips(lab, app, spans, monkeypatch, with_journal):
    """One round trip to the key's node (PTTL, SCAN, CLUSTER NODES, INFO), one to the journal's node when
    that is another; measured on the analysis's own round trips (once the process knows the journal's
    buckets and writers, as on a single server: a bucket or a writer not seen yet costs one more)."""
    from otel_subflow._analysis import miss

    trips: list[tuple[str, list[str]]] = []
    original = miss._run_sync

    def counted(target: Any, calls: list[Any], timeout_s: float) -> Any:
        endpoint = getattr(target, "endpoint", None)
        where = f"{target.host or endpoint.kwargs.get('host')}:{target.port or endpoint.kwargs.get('port')}"
        trips.append((where, [str(c[1][0] if c[0] == "execute_command" else c[0]).upper() for c in calls]))
        return original(target, calls, timeout_s)

    run = run_on(lab, journal_node=with_journal, prefix="run-rt")
    initialize_state(app, run, "other", b"x")  # the run has a journal; the node read has no init
    assert flush_journals(5.0)
    assert get_state(app, run, "warm") is None  # the first analysis also learns the journal's buckets and writers
    monkeypatch.setattr(miss, "_run_sync", counted)
    assert get_state(app, run, "n") is None
    assert verdict(last_get(spans))[0] == names.CAUSE_NEVER_WRITTEN
    owner = "{}:{}".format(*lab.owner_of(key_of(run, "n")))
    assert len(trips) == (1 if with_journal else 2), trips
    assert trips[0][0] == owner and {"PTTL", "CLUSTER", "INFO"} <= set(trips[0][1])
    if not with_journal:
        assert trips[1][0] == "{}:{}".format(*lab.owner_of(schema.INDEX_KEY)) and "ZRANGE" in trips[1][1]


def test_a_read_before_the_init_is_corrected_to_get_before_init(app, spans):
    assert get_state(app, "run-early", "n") is None
    read = last_get(spans)
    assert verdict(read) == (names.CAUSE_NEVER_WRITTEN, names.CONFIDENCE_PROBABLE)
    initialize_state(app, "run-early", "n", b"x")
    [init] = [s for s in spans() if s.name == names.SPAN_STATE_INIT]
    [race] = [e for e in init.events if e.name == names.EVENT_STATE_RACE]
    assert (race.attributes or {})[names.ATTR_MISSING_CAUSE] == names.CAUSE_GET_BEFORE_INIT
    assert [link.context.span_id for link in init.links] == [read.context.span_id]


def test_a_state_evicted_on_its_node_is_evicted(lab, app, watcher, spans):
    run = run_on(lab, journal_node=False, prefix="run-ev")
    key = key_of(run, "n")
    initialize_state(app, run, "n", b"x" * 100)
    assert flush_journals(5.0)
    owner = lab.node_client(*lab.owner_of(key))
    try:
        owner.config_set("maxmemory-policy", "allkeys-random")
        owner.config_set("maxmemory", int(owner.info("memory")["used_memory"]) + 2 * 1024 * 1024)
        fill_until_evicted(owner, key, tag="{" + key + "}:")  # ballast in the state's own slot: its node fills up
        wait_for(lambda: runtime.recent_tombstones.get(key) is not None, 10.0)
        assert flush_journals(5.0)
        assert get_state(app, run, "n") is None
        assert verdict(last_get(spans)) == (names.CAUSE_EVICTED, names.CONFIDENCE_DEFINITIVE)
    finally:
        owner.config_set("maxmemory", 0)
        owner.config_set("maxmemory-policy", "noeviction")
        owner.close()


def test_a_master_restarted_before_its_replica_took_over_is_a_server_restart(lab, app, spans):
    """Killed and started again within the node timeout: the same address, a new run_id, no data (the
    replica resynchronises from it and is emptied too)."""
    run = run_on(lab, journal_node=False, prefix="run-rs")
    initialize_state(app, run, "n", b"x")
    assert flush_journals(5.0)
    owner = lab.owner_of(key_of(run, "n"))
    lab.kill(owner)
    lab.start_node(owner)
    assert lab.owner_of(key_of(run, "n")) == owner  # back before an election
    for _ in range(50):
        try:
            assert get_state(app, run, "n") is None
            break
        except redis.ConnectionError:
            continue  # the app's connection to the node broke: what the app sees too
    assert verdict(last_get(spans)) == (names.CAUSE_SERVER_RESTART, names.CONFIDENCE_DEFINITIVE)


# -- redis.asyncio's RedisCluster ------------------------------------------------------------------


@instrument_state_init()
async def initialize_state_async(client: Any, run_id: str, node_id: str, data: bytes, ttl_ms: int = 60_000) -> None:
    await client.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms)


@instrument_state_get()
async def get_state_async(client: Any, run_id: str, node_id: str) -> bytes | None:
    result: bytes | None = await client.get(f"subflow:state:{run_id}:{node_id}")
    return result


async def test_asyncio_cluster_spans_journal_and_verdicts(lab, spans):
    """The same on ``redis.asyncio.cluster.RedisCluster``: the node serving the key (the app's own
    connection's client id), the journal on its slot's master, a watcher on every master, verdicts."""
    app = lab.async_client()
    watching = KeyspaceWatcher(app, refresh_s=0.2)
    try:
        await app.initialize()
        watching.start()
        assert watching.wait_subscribed(10)
        assert sorted(watching.watchers) == sorted(lab.masters())
        for i in range(6):
            await initialize_state_async(app, f"arun-{i}", "n", b"x")
            assert await get_state_async(app, f"arun-{i}", "n") == b"x"
        for span in spans():
            attributes = span.attributes or {}
            owner = lab.owner_of(str(attributes[names.ATTR_STATE_KEY]))
            assert (attributes[names.ATTR_SERVER_ADDRESS], attributes[names.ATTR_SERVER_PORT]) == owner
        attributes = spans()[-1].attributes or {}
        with contextlib.closing(lab.node_client(*lab.owner_of(str(attributes[names.ATTR_STATE_KEY])))) as node:
            assert int(attributes[names.ATTR_REDIS_CLIENT_ID]) in {int(c["id"]) for c in node.client_list()}
        assert flush_journals(5.0)
        with contextlib.closing(lab.node_client(*lab.owner_of(schema.INDEX_KEY))) as journal:
            assert [e.op for e in read_run(journal, "arun-3")] == [schema.OP_INIT]

        assert await get_state_async(app, "arun-none", "n") is None
        assert verdict(last_get(spans))[0] == names.CAUSE_NEVER_WRITTEN
        await initialize_state_async(app, "arun-x", "n", b"x", ttl_ms=100)
        wait_for(lambda: runtime.recent_tombstones.get(key_of("arun-x", "n")) is not None, 10.0)
        assert flush_journals(5.0)
        assert await get_state_async(app, "arun-x", "n") is None
        assert verdict(last_get(spans)) == (names.CAUSE_EXPIRED, names.CONFIDENCE_DEFINITIVE)
    finally:
        watching.stop()
        await app.aclose()


def test_a_reader_pointed_at_another_redis_is_a_wrong_endpoint(lab, app, redis_server, spans):
    """Writer on the cluster, a reader configured with a single server's URL; the journal is shared
    (OTEL_SUBFLOW_JOURNAL_URL), so the reader sees where the init went."""
    with RedisServer() as journal:
        set_config(SubflowConfig(journal_url=journal.url(), analysis_rate_per_s=1e6, analysis_burst=10**6))
        initialize_state(app, "run-we", "n", b"x")
        assert flush_journals(5.0)
        with contextlib.closing(redis_server.client()) as elsewhere:
            assert get_state(elsewhere, "run-we", "n") is None
        assert verdict(last_get(spans))[0] == names.CAUSE_WRONG_ENDPOINT
        assert flush_journals(5.0)



def test_a_read_served_by_a_lagging_replica_is_replica_lag(lab, spans):
    """A cluster client that reads from replicas; the replica's replication stream is held
    (``CLIENT PAUSE WRITE`` on the replica: it still serves reads), the state written, then read: the
    replica answers without it, its master has it, and its init came before the read."""
    from redis.cluster import LoadBalancingStrategy

    writer = lab.client()
    for i in range(30):  # CLUSTER SLOTS lists a replica once it has replicated something
        writer.set(f"warm:{i}", "x")
    with contextlib.closing(lab.node_client(*lab.masters()[0])) as any_master:
        wait_for(lambda: all(len(entry) > 3 for entry in any_master.execute_command("CLUSTER SLOTS")), 10.0)
    reader = lab.client(load_balancing_strategy=LoadBalancingStrategy.ROUND_ROBIN_REPLICAS)
    run = run_on(lab, journal_node=False, prefix="run-lag")
    replica = lab.node_client(*lab.replica_of(lab.owner_of(key_of(run, "n"))))
    try:
        assert reader.get(key_of(run, "n")) is None  # (undecorated) the reader's connection to the replica
        replica.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
        initialize_state(writer, run, "n", b"x")
        assert get_state(reader, run, "n") is None
        with contextlib.closing(lab.node_client(*lab.owner_of(key_of(run, "n")))) as master:  # it lags
            assert replica.info("replication")["master_repl_offset"] < master.info("replication")["master_repl_offset"]
        assert verdict(last_get(spans)) == (names.CAUSE_REPLICA_LAG, names.CONFIDENCE_DEFINITIVE)
    finally:
        replica.execute_command("CLIENT", "UNPAUSE")
        replica.close()
        reader.close()
        writer.close()
