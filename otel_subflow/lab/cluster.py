"""A real Redis Cluster on loopback: six ``redis-server`` nodes (three masters, a replica each), failovers on demand.

Each node is a :class:`ClusterNode`, a :class:`~otel_subflow.lab.servers.RedisServer` in cluster mode (the
lifecycle of :mod:`otel_subflow.lab.process`); :class:`ClusterServers` creates the cluster with
``redis-cli --cluster create`` and reads the topology live from ``CLUSTER NODES``: it changes after a failover.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import redis
import redis.asyncio.cluster as async_cluster
import redis.cluster

from otel_subflow.lab.process import RedisServerError, free_port
from otel_subflow.lab.servers import RedisServer, find_redis_server

#: A node's address as the lab names it: ``("127.0.0.1", port)``.
Address = tuple[str, int]
#: Every slot of a cluster.
SLOTS = 16384

_C = TypeVar("_C", bound="ClusterServers")


def find_redis_cli() -> str:
    """The redis-cli binary: ``OTEL_SUBFLOW_REDIS_CLI`` or the one on PATH."""
    found = os.environ.get("OTEL_SUBFLOW_REDIS_CLI") or shutil.which("redis-cli")
    if not found:
        raise RedisServerError("redis-cli not found: install it (Debian: apt-get install redis-tools) "
                               "or set OTEL_SUBFLOW_REDIS_CLI")
    return found


class ClusterNode(RedisServer):
    """One cluster-mode redis-server: its bus on its own free port (``--cluster-port``), its ``nodes-<port>.conf``
    and ``dump-<port>.rdb`` in the cluster's dir. The config survives :meth:`stop`: a node started again rejoins
    as the same node (with no data)."""

    kind = "cluster"

    def __init__(self, port: int, bus_port: int, *, node_timeout_ms: int, notify_keyspace_events: str,
                 workdir: Path, extra_args: Sequence[str] = ()) -> None:
        self.bus_port = bus_port
        cluster_args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-port", str(bus_port),
            # A replica's full sync starts at once (the default waits 5 s for more replicas to share it).
            "--repl-diskless-sync-delay", "0",
            # Its own RDB file: a replica's full sync writes one, and the nodes share a dir.
            "--dbfilename", f"dump-{port}.rdb",
            # A replica is always eligible for promotion, however long its link has been down: failovers the
            # tests can count on (production keeps the default factor of 10).
            "--cluster-replica-validity-factor", "0",
        ]
        super().__init__(port, notify_keyspace_events=notify_keyspace_events,
                         extra_args=[*cluster_args, *extra_args], workdir=workdir)

    @property
    def address(self) -> Address:
        return self.host, self.port

    @property
    def rdb_path(self) -> Path:
        return self.workdir / f"dump-{self.port}.rdb"

    def _prepare(self) -> None:
        """A node starts empty: the RDB of its last full sync as a replica is not loaded."""
        self.rdb_path.unlink(missing_ok=True)


@dataclass(frozen=True)
class NodeInfo:
    """One line of ``CLUSTER NODES``."""

    node_id: str
    address: Address
    flags: frozenset[str]
    master_id: str | None
    config_epoch: int
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "noaddr", "handshake"})

    def serves(self, slot: int) -> bool:
        return any(low <= slot <= high for low, high in self.slots)


def parse_cluster_nodes(text: str) -> list[NodeInfo]:
    """``CLUSTER NODES`` as :class:`NodeInfo` (slots being imported or migrated, ``[...]``, are left out)."""
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        host_port = fields[1].split("@")[0].split(",")[0]
        host, _, port = host_port.rpartition(":")
        slots = []
        for spec in fields[8:]:
            if spec.startswith("["):
                continue
            low, _, high = spec.partition("-")
            slots.append((int(low), int(high or low)))
        nodes.append(NodeInfo(fields[0], (host, int(port)), frozenset(fields[2].split(",")),
                              None if fields[3] == "-" else fields[3], int(fields[6]), tuple(sorted(slots))))
    return nodes


def _info_fields(text: str) -> dict[str, str]:
    """``CLUSTER INFO``'s ``name:value`` lines."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


_View = frozenset[tuple[Address, "Address | None", int, tuple[tuple[int, int], ...]]]


def _view(topology: list[NodeInfo]) -> _View | None:
    """The live nodes of one node's ``CLUSTER NODES``: each with its master, config epoch and slots; ``None``
    when the masters' slots do not cover the cluster or two masters share a config epoch (a collision, as after
    a ``TAKEOVER``, that Redis is still resolving: the slots may still move)."""
    by_id = {n.node_id: n.address for n in topology}
    live = [n for n in topology if not n.failed]
    masters = [n for n in live if n.is_master and n.slots]
    if sum(high - low + 1 for n in masters for low, high in n.slots) != SLOTS:
        return None
    if len({n.config_epoch for n in masters}) != len(masters):
        return None
    return frozenset((n.address, by_id.get(n.master_id) if n.master_id else None, n.config_epoch, n.slots)
                     for n in live)


class ClusterServers:
    """Six redis-server nodes on 127.0.0.1 made into one cluster: three masters with a replica each.

    Example::

        with ClusterServers() as cluster:
            client = cluster.client()
            client.set("k", "v")
            master = cluster.owner_of("k")
            cluster.failover(cluster.replica_of(master))
    """

    def __init__(self, *, masters: int = 3, replicas_per_master: int = 1, node_timeout_ms: int = 1000,
                 notify_keyspace_events: str = "Exeg", extra_args: Sequence[str] = (),
                 workdir: str | Path | None = None) -> None:
        """``notify_keyspace_events``: as :class:`RedisServer`'s default; each node notifies of its own keys."""
        self.masters_count = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.notify_keyspace_events = notify_keyspace_events
        self.extra_args = list(extra_args)
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="subflow-cluster-"))
        self.nodes: list[ClusterNode] = []
        #: When each node was last promoted by an election (monotonic seconds).
        self._elected_at: dict[Address, float] = {}

    # -- lifecycle ---------------------------------------------------------------

    def start(self: _C, timeout_s: float = 60.0) -> _C:
        """Start the nodes, create the cluster, and wait until it is ok everywhere; anything left is torn down
        when a step fails."""
        if self.nodes:
            return self
        try:
            self._start_nodes()
            self._create()
            self.wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nodes(self) -> None:
        find_redis_server()
        find_redis_cli()
        self.workdir.mkdir(parents=True, exist_ok=True)
        count = self.masters_count * (1 + self.replicas_per_master)
        ports: list[int] = []
        while len(ports) < 2 * count:  # a port and a bus port per node, all different
            port = free_port()
            if port not in ports:
                ports.append(port)
        for port, bus_port in zip(ports[:count], ports[count:], strict=True):
            node = ClusterNode(port, bus_port, node_timeout_ms=self.node_timeout_ms, workdir=self.workdir,
                               notify_keyspace_events=self.notify_keyspace_events, extra_args=self.extra_args)
            self.nodes.append(node)
            node.start()

    def _create(self) -> None:
        command = [find_redis_cli(), "--cluster", "create", *(f"{n.host}:{n.port}" for n in self.nodes),
                   "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise RedisServerError(f"redis-cli --cluster create failed ({done.returncode}):\n"
                                   f"{done.stdout}{done.stderr}{self._log_tails()}")

    def stop(self) -> None:
        """Stop every node and remove the temp dir when the lab made it."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.cleanup()
        self.nodes = []
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    cleanup = stop

    def __enter__(self: _C) -> _C:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------

    def client(self, **kwargs: object) -> redis.cluster.RedisCluster:
        """redis-py's cluster client, started from a running node (it discovers the rest)."""
        host, port = self._any_running().address
        return redis.cluster.RedisCluster(host=host, port=port, **kwargs)  # type: ignore[arg-type]

    def async_client(self, **kwargs: object) -> async_cluster.RedisCluster:
        """redis-py's asyncio cluster client (``await client.aclose()`` when done)."""
        host, port = self._any_running().address
        return async_cluster.RedisCluster(host=host, port=port, **kwargs)  # type: ignore[arg-type]

    def node_client(self, host: str, port: int, **kwargs: object) -> redis.Redis:
        """A plain client to one node (``READONLY`` first to read a replica's keys)."""
        return redis.Redis(host=host, port=port, socket_timeout=2, **kwargs)  # type: ignore[arg-type]

    def node(self, address: Address) -> ClusterNode:
        for node in self.nodes:
            if node.address == address:
                return node
        raise KeyError(f"no node of this cluster at {address}")

    # -- topology, read live -----------------------------------------------------

    def topology(self) -> list[NodeInfo]:
        """``CLUSTER NODES`` as a running node sees it (after :meth:`wait_ok` every running node agrees)."""
        return parse_cluster_nodes(self._ask(self._any_running().address, "CLUSTER", "NODES"))

    def masters(self) -> list[Address]:
        """The masters serving slots (a failed one too, until its replica is promoted), by port."""
        return sorted(n.address for n in self.topology() if n.is_master and n.slots and "fail" not in n.flags)

    def replicas(self) -> list[Address]:
        """The replicas not marked failed, by port."""
        return sorted(n.address for n in self.topology() if "slave" in n.flags and "fail" not in n.flags)

    def owner_of(self, key: str | bytes) -> Address:
        """The master serving the key's slot (``CLUSTER KEYSLOT`` on a node, then the topology)."""
        slot = int(self._ask(self._any_running().address, "CLUSTER", "KEYSLOT", key))
        for node in self.topology():
            if node.is_master and "fail" not in node.flags and node.serves(slot):
                return node.address
        raise RedisServerError(f"no master serves slot {slot}")

    def replica_of(self, master: Address) -> Address:
        """A replica of that master (the lab gives each master one)."""
        topology = self.topology()
        ids = [n.node_id for n in topology if n.address == master]
        found = sorted(n.address for n in topology if ids and n.master_id == ids[0] and "fail" not in n.flags)
        if not found:
            raise RedisServerError(f"{master} has no replica")
        return found[0]

    # -- faults ------------------------------------------------------------------

    def failover(self, replica: Address, *, force: bool = True, takeover: bool = False,
                 timeout_s: float = 30.0) -> None:
        """``CLUSTER FAILOVER FORCE`` (``TAKEOVER``; neither: the coordinated one) on the replica, then wait
        until it is a master, its old master (when running) its replica, and the cluster ok everywhere.

        An election (not ``TAKEOVER``) in a shard that had a promotion less than :attr:`election_retry_s` ago
        waits out the rest of that time first: Redis 7.0 does not reset a replica's won election (it would
        "win" the next one at once with the old votes and epoch, and lose its slots again), and masters refuse
        to vote for a shard twice within two node timeouts."""
        old_master = self._master_of(replica)
        if old_master is None:
            raise RedisServerError(f"{replica} is not a replica")
        if not takeover:
            last = max(self._elected_at.get(replica, -1e9), self._elected_at.get(old_master, -1e9))
            remaining = last + self.election_retry_s - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)  # a Redis timer to wait out, not a poll
        option = ["TAKEOVER"] if takeover else ["FORCE"] if force else []
        with contextlib.closing(self.node_client(*replica)) as client:
            client.execute_command("CLUSTER", "FAILOVER", *option)  # type: ignore[no-untyped-call]
        self.wait_promoted(replica, timeout_s)
        if self.node(old_master).running:
            self._wait(lambda: self._role(old_master) == "slave" and self._master_of(old_master) == replica,
                       timeout_s, f"{old_master} did not become a replica of {replica}")
            self.wait_ok(timeout_s)

    def kill(self, node: Address) -> None:
        """SIGKILL a node, as in a crash: after the node timeout the cluster marks it failed and, for a master,
        promotes its replica (:meth:`wait_promoted`)."""
        self.node(node).kill()

    def start_node(self, node: Address, timeout_s: float = 30.0) -> None:
        """Start a stopped or killed node again (empty, persistence is off); it rejoins with its nodes.conf, a
        former master as a replica of the one promoted meanwhile. Waits until the cluster is ok everywhere."""
        self.node(node).start()
        self.wait_ok(timeout_s)

    def wait_promoted(self, replica: Address, timeout_s: float = 30.0) -> None:
        """Until that node is a master serving slots and the cluster is ok everywhere."""
        self._wait(lambda: self._role(replica) == "master" and replica in self.masters(), timeout_s,
                   f"{replica} was not promoted")
        self._elected_at[replica] = time.monotonic()
        self.wait_ok(timeout_s)

    @property
    def election_retry_s(self) -> float:
        """Redis's election retry time: twice the auth timeout, itself twice the node timeout (2 s at least)."""
        return 2 * max(2 * self.node_timeout_ms, 2000) / 1000

    def heal(self, timeout_s: float = 60.0) -> None:
        """Start every node that is down and wait until the cluster is ok (a test's faults undone)."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_ok(timeout_s)

    def flushall(self, timeout_s: float = 10.0) -> None:
        """``FLUSHALL`` on every master, then wait until every replica is empty too."""
        for master in self.masters():
            self._ask(master, "FLUSHALL")
        self._wait(lambda: all(self._ask(r, "DBSIZE") == "0" for r in self.replicas()), timeout_s,
                   "the replicas are not empty after FLUSHALL")

    # -- waiting -----------------------------------------------------------------

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every running node says ``cluster_state:ok`` with all 16384 slots ok, they all see the same
        live nodes (the running ones; the stopped ones failed), masters, replicas, config epochs and slots and
        have the same current epoch, and every replica's link to its master is up."""
        self._wait(self._ok, timeout_s, "the cluster is not ok")

    def _ok(self) -> bool:
        running = {n.address for n in self.nodes if n.running}
        views: set[tuple[str, _View]] = set()
        for address in running:
            info = _info_fields(self._ask(address, "CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                return False
            view = _view(parse_cluster_nodes(self._ask(address, "CLUSTER", "NODES")))
            if view is None or {a for a, *_ in view} != running:  # the dead failed, the running not
                return False
            views.add((info.get("cluster_current_epoch", ""), view))
            with contextlib.closing(self.node_client(*address)) as client:
                replication = client.info("replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return len(views) == 1

    def _wait(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                if done():
                    return
            if time.monotonic() >= deadline:
                raise RedisServerError(f"{what} after {timeout_s}s{self._log_tails()}")
            time.sleep(0.05)

    # -- helpers -----------------------------------------------------------------

    def _role(self, address: Address) -> str:
        with contextlib.closing(self.node_client(*address)) as client:
            return str(client.info("replication").get("role"))

    def _master_of(self, address: Address) -> Address | None:
        """The master a node replicates, as its own ``CLUSTER NODES`` says (``None`` for a master)."""
        topology = parse_cluster_nodes(self._ask(address, "CLUSTER", "NODES"))
        me = next((n for n in topology if "myself" in n.flags), None)
        if me is None or me.master_id is None:
            return None
        return next((n.address for n in topology if n.node_id == me.master_id), None)

    def _ask(self, address: Address, *args: str | bytes) -> str:
        with contextlib.closing(self.node_client(*address)) as client:
            reply = client.execute_command(*args)  # type: ignore[no-untyped-call]
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def _any_running(self) -> ClusterNode:
        for node in self.nodes:
            if node.running:
                return node
        raise RedisServerError("no node of the cluster is running")

    def _log_tails(self) -> str:
        return "".join(f"\n-- {node.log_path.name}:{node.log_tail(8)}" for node in self.nodes)
