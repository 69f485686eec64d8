"""The lab's Redis Cluster: its shape, where keys live, failovers the clients follow, keyspace events per node.

Every test reads the topology from the cluster itself: earlier tests' failovers move the masters.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
from redis.client import PubSub
from redis.exceptions import MovedError

from otel_subflow.lab.cluster import SLOTS, Address, ClusterServers
from otel_subflow.lab.process import RedisServerError

#: Keys spread over the slots (and so over every master).
KEYS = [f"subflow:lab:{i}" for i in range(30)]


def _role(cluster: ClusterServers, node: Address) -> str:
    with contextlib.closing(cluster.node_client(*node)) as client:
        return str(client.info("replication")["role"])


def _replicated(cluster: ClusterServers, master: Address) -> None:
    """Until the master's replica has acknowledged every write so far (WAIT)."""
    with contextlib.closing(cluster.node_client(*master)) as client:
        assert client.wait(1, 5000) == 1


def test_three_masters_each_with_one_replica_serving_every_slot(cluster: ClusterServers) -> None:
    masters, replicas = cluster.masters(), cluster.replicas()
    assert len(masters) == 3 and len(replicas) == 3
    assert not set(masters) & set(replicas)
    assert sorted(masters + replicas) == sorted(node.address for node in cluster.nodes)
    assert sorted(cluster.replica_of(m) for m in masters) == replicas
    for master in masters:
        assert _role(cluster, master) == "master"
    for replica in replicas:
        assert _role(cluster, replica) == "slave"
    served = [slot for n in cluster.topology() if n.is_master for low, high in n.slots for slot in range(low, high + 1)]
    assert sorted(served) == list(range(SLOTS))
    with pytest.raises(RedisServerError, match="not a replica"):
        cluster.failover(masters[0])


def test_a_key_written_through_the_cluster_client_is_on_its_owner_and_its_replica(cluster: ClusterServers) -> None:
    with contextlib.closing(cluster.client()) as client:
        for key in KEYS:
            client.set(key, key.encode() + b"!")
    owners = {key: cluster.owner_of(key) for key in KEYS}
    assert set(owners.values()) == set(cluster.masters())  # 30 keys reach every master
    for master in set(owners.values()):
        _replicated(cluster, master)
        mine = sorted(k for k, owner in owners.items() if owner == master)
        with contextlib.closing(cluster.node_client(*master)) as node:
            assert [node.get(k) for k in mine] == [k.encode() + b"!" for k in mine]
            assert node.dbsize() == len(mine)
        replica = cluster.replica_of(master)
        with contextlib.closing(cluster.node_client(*replica, single_connection_client=True)) as node:
            node.execute_command("READONLY")  # type: ignore[no-untyped-call]
            assert [node.get(k) for k in mine] == [k.encode() + b"!" for k in mine]
    other = next(m for m in cluster.masters() if m != owners[KEYS[0]])
    with contextlib.closing(cluster.node_client(*other)) as node, pytest.raises(MovedError) as moved:
        node.get(KEYS[0])  # another master sends the client to the owner
    assert (moved.value.host, moved.value.port) == owners[KEYS[0]]


async def test_the_async_client_reads_and_writes_every_shard(cluster: ClusterServers) -> None:
    client = cluster.async_client()
    try:
        for key in KEYS:
            await client.set(key, key)
        assert [await client.get(key) for key in KEYS] == [key.encode() for key in KEYS]
        assert sorted((n.host, int(n.port)) for n in client.get_primaries()) == cluster.masters()
    finally:
        await client.aclose()
    with contextlib.closing(cluster.node_client(*cluster.owner_of(KEYS[0]))) as node:
        assert node.get(KEYS[0]) == KEYS[0].encode()


def test_a_forced_failover_swaps_the_roles_and_the_client_follows(cluster: ClusterServers) -> None:
    key = KEYS[0]
    with contextlib.closing(cluster.client()) as client:
        client.set(key, b"before")
        master = cluster.owner_of(key)
        replica = cluster.replica_of(master)
        _replicated(cluster, master)

        started = time.monotonic()
        cluster.failover(replica)
        took = time.monotonic() - started

        assert replica in cluster.masters() and master in cluster.replicas()
        assert _role(cluster, replica) == "master" and _role(cluster, master) == "slave"
        assert cluster.replica_of(replica) == master
        assert cluster.owner_of(key) == replica
        # The client still maps the slot to the old master: it follows the MOVED.
        assert client.get(key) == b"before"
        client.set(key, b"after")
        for other in KEYS[1:]:
            client.set(other, b"x")
        assert [client.get(other) for other in KEYS[1:]] == [b"x"] * (len(KEYS) - 1)
    with contextlib.closing(cluster.node_client(*replica)) as node:
        assert node.get(key) == b"after"
    assert took < 30, took


def test_a_killed_master_s_replica_is_promoted_and_the_master_comes_back_as_its_replica(
        cluster: ClusterServers) -> None:
    key = KEYS[1]
    with contextlib.closing(cluster.client()) as client:
        client.set(key, b"kept")
        master = cluster.owner_of(key)
        replica = cluster.replica_of(master)
        _replicated(cluster, master)

        cluster.kill(master)
        assert not cluster.node(master).running
        cluster.wait_promoted(replica)
        assert cluster.owner_of(key) == replica and master not in cluster.masters()
        assert client.get(key) == b"kept"

        cluster.start_node(master)
        assert cluster.replica_of(replica) == master and _role(cluster, master) == "slave"
        assert len(cluster.masters()) == 3 and len(cluster.replicas()) == 3


@contextlib.contextmanager
def _subscribed(cluster: ClusterServers, node: Address, channel: str) -> Iterator[PubSub]:
    client = cluster.node_client(*node)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(channel)
    confirmed = pubsub.get_message(timeout=5)
    assert confirmed is not None and confirmed["type"] == "subscribe", confirmed
    try:
        yield pubsub
    finally:
        pubsub.close()
        client.close()


def _messages(pubsub: PubSub, until: float) -> list[bytes]:
    """What the channel carried until the deadline."""
    received = []
    while (remaining := until - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=remaining)
        if message is not None and message["type"] == "message":
            received.append(message["data"])
    return received


def test_keyspace_notifications_arrive_from_the_owning_node_only(cluster: ClusterServers) -> None:
    key, channel = KEYS[2], "__keyevent@0__:expired"
    owner = cluster.owner_of(key)
    others = [node.address for node in cluster.nodes if node.address != owner]
    with contextlib.ExitStack() as stack:
        watch = {node: stack.enter_context(_subscribed(cluster, node, channel)) for node in [owner, *others]}
        with contextlib.closing(cluster.client()) as client:
            client.set(key, b"v", px=100)
        deadline = time.monotonic() + 10
        seen: list[bytes] = []
        while key.encode() not in seen and time.monotonic() < deadline:
            message = watch[owner].get_message(timeout=deadline - time.monotonic())
            if message is not None and message["type"] == "message":
                seen.append(message["data"])
        assert seen == [key.encode()]
        # The others had as long again to hear of it: an expiry is the owner's alone.
        grace = time.monotonic() + 0.5
        assert {node: _messages(watch[node], grace) for node in others} == {node: [] for node in others}


def test_a_failed_start_leaves_no_server_running(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []

    def broken_create(self: ClusterServers) -> None:
        started.extend(node.port for node in self.nodes if node.running)
        raise RedisServerError("redis-cli --cluster create failed (test)")

    monkeypatch.setattr(ClusterServers, "_create", broken_create)
    lab = ClusterServers()
    with pytest.raises(RedisServerError, match="test"):
        lab.start()
    assert len(started) == 6 and lab.nodes == []
    for port in started:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert not lab.workdir.exists()  # the lab's own temp dir, with the nodes' configs and logs
