"""Pools whose kwargs name no server: Sentinel's ``master_for``, unix sockets, TLS.

The endpoint is the server the app's connections actually reach: spans name
it, and our own clients (journal, analysis) go there or nowhere. Before the
fix, a Sentinel pool was reported as ``localhost:6379`` and the journal and
analysis connected there: an unrelated Redis on that port would have received
our writes and fed wrong verdicts. So every test here also watches
localhost:6379.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel

from otel_subflow import SubflowConfig, flush_journals, instrument_state_get, instrument_state_init, names
from otel_subflow._config import get_config, set_config
from otel_subflow._journal import store
from otel_subflow._journal.location import journal_for
from otel_subflow._redis.clients import Target, endpoint_of
from otel_subflow._redis.connection import connection_info
from otel_subflow.lab.process import RedisServerError
from otel_subflow.lab.sentinel import RedisSentinel
from otel_subflow.lab.servers import RedisServer
from otel_subflow.lab.tls import make_tls_files
from tests.cli_helpers import wait_for
from tests.conftest import _reset_state, service_missing

SERVICE = "mymaster"
#: What we would send to a server: none of it may reach localhost:6379.
OUR_COMMANDS = ("pttl", "scan", "eval", "evalsha", "zrange", "hmget", "hget", "client|id", "exists")


# -- localhost:6379 must hear nothing from us ----------------------------------------------


class DefaultPortWatch:
    """Whatever answers on localhost:6379 (Debian's redis-server in CI, or nothing) must see nothing of ours.

    A Redis there: its commandstats for our commands and its ``subflow:*`` keys
    must not change. Nothing there: we listen on 127.0.0.1:6379 and [::1]:6379
    ourselves and count connection attempts.
    """

    def __init__(self) -> None:
        self.redis: redis.Redis | None = None
        self.before: dict[str, int] = {}
        self.keys_before: set[bytes] = set()
        self.listeners: list[socket.socket] = []
        self.accepted: list[tuple[Any, ...]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        probe = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=1, socket_connect_timeout=1)
        try:
            probe.ping()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            probe.close()
            self._listen()
            return
        self.redis = probe
        self.keys_before = self._our_keys()
        self.before = self._stats()  # after our own SCANs

    def _listen(self) -> None:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, 6379))
                sock.listen(16)
                sock.settimeout(0.05)
            except OSError:
                sock.close()
                continue
            self.listeners.append(sock)
            thread = threading.Thread(target=self._accept, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _accept(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(peer)
            conn.close()

    def _stats(self) -> dict[str, int]:
        assert self.redis is not None
        stats = self.redis.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if isinstance(v, dict)}

    def _our_keys(self) -> set[bytes]:
        assert self.redis is not None
        keys: set[bytes] = set()
        for db in range(16):
            with contextlib.suppress(redis.ResponseError):
                c = redis.Redis(host="127.0.0.1", port=6379, db=db, socket_timeout=1)
                keys |= {f"{db}:".encode() + k for k in c.scan_iter(match="subflow:*", count=1000)}
                c.close()
        return keys

    def _drain(self) -> None:
        """Stop the accept threads and take whatever still waits in the backlog."""
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        for sock in self.listeners:
            sock.setblocking(False)
            while True:
                try:
                    conn, peer = sock.accept()
                except (BlockingIOError, OSError):
                    break
                self.accepted.append(peer)
                conn.close()

    def assert_untouched(self) -> None:
        if self.redis is not None:
            after = self._stats()
            grown = {c: after.get(c, 0) - self.before.get(c, 0) for c in OUR_COMMANDS
                     if after.get(c, 0) != self.before.get(c, 0)}
            assert not grown, f"the Redis on localhost:6379 received our commands: {grown}"
            assert self._our_keys() == self.keys_before, "subflow keys appeared on localhost:6379"
        else:
            self._drain()
            assert not self.accepted, f"something of ours connected to localhost:6379: {self.accepted}"

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        for sock in self.listeners:
            sock.close()
        if self.redis is not None:
            self.redis.close()


@pytest.fixture
def port_6379() -> Iterator[DefaultPortWatch]:
    watch = DefaultPortWatch()
    try:
        yield watch
    finally:
        watch.close()


# -- servers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel_setup() -> Iterator[tuple[RedisServer, RedisSentinel]]:
    """A master and one Sentinel watching it (quorum 1)."""
    try:
        master = RedisServer().start()
    except RedisServerError as exc:
        service_missing(str(exc))
        raise
    try:
        sentinel = RedisSentinel((master.host, master.port), service=SERVICE).start()
    except RedisServerError as exc:
        master.cleanup()
        service_missing(str(exc))
        raise
    yield master, sentinel
    sentinel.cleanup()
    master.cleanup()


@pytest.fixture
def fresh(sentinel_setup: tuple[RedisServer, RedisSentinel]) -> Iterator[tuple[RedisServer, RedisSentinel]]:
    master, sentinel = sentinel_setup
    _reset_state()
    with contextlib.closing(master.client()) as admin:
        admin.flushall()
        admin.config_resetstat()
    yield master, sentinel
    _reset_state()


def get_state(redis: Any, run_id: str, node_id: str) -> Any:
    return redis.get(f"subflow:state:{run_id}:{node_id}")


def initialize_state(redis: Any, run_id: str, node_id: str, data: str, ttl_ms: int = 60_000) -> bool:
    return bool(redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms))


decorated_get = instrument_state_get()(get_state)
decorated_init = instrument_state_init()(initialize_state)


def attrs_of(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def journal_port(client: Any) -> Any:
    journal = journal_for(client, get_config())
    assert journal is not None
    return journal.client.connection_pool.connection_kwargs.get("port")


def analysis_port(client: Any) -> Any:
    target = Target.of_client(client)
    assert target is not None
    return target.sync_client(0.25).connection_pool.connection_kwargs.get("port")


def verdict_of(span: Any) -> dict[str, Any]:
    event = next(e for e in span.events if e.name == names.EVENT_STATE_MISSING)
    return dict(event.attributes or {})


def journal_length(server: RedisServer, run_id: str) -> int:
    with contextlib.closing(server.client()) as admin:
        return len(store.read_run(admin, run_id))


# -- Sentinel -------------------------------------------------------------------------------


def test_sentinel_pool_has_no_endpoint_before_it_connects(fresh, port_6379):
    """No connection yet: no address, no journal, no analysis target (not localhost:6379)."""
    _, sentinel = fresh
    client = sentinel.sentinel().master_for(SERVICE)
    try:
        info = connection_info(client)
        assert info is not None and info.address is None and info.port is None
        assert names.ATTR_SERVER_ADDRESS not in info.span_attributes()
        assert names.ATTR_SERVER_PORT not in info.span_attributes()
        assert endpoint_of(client) is None
        assert journal_for(client, get_config()) is None
        assert Target.of_client(client) is None
    finally:
        client.close()
    port_6379.assert_untouched()


def test_sentinel_spans_journal_and_analysis_use_the_master(fresh, spans, port_6379):
    """Through master_for: span server.port, the journal and the analysis are the master's."""
    master, sentinel = fresh
    client = sentinel.sentinel().master_for(SERVICE)
    try:
        # The very first call of the pool: the address is learned during it and set on its span.
        assert decorated_init(client, "sent-run", "n1", "state") is True
        first = spans()[-1]
        assert attrs_of(first)[names.ATTR_SERVER_ADDRESS] == "127.0.0.1"
        assert attrs_of(first)[names.ATTR_SERVER_PORT] == master.port
        assert decorated_get(client, "sent-run", "n1") == b"state"
        assert flush_journals(5.0)
        assert decorated_get(client, "sent-run", "n2") is None
        assert flush_journals(5.0)
        miss = spans()[-1]
        assert attrs_of(miss)[names.ATTR_SERVER_PORT] == master.port
        verdict = verdict_of(miss)
        assert verdict[names.ATTR_MISSING_CAUSE] == names.CAUSE_NEVER_WRITTEN, verdict
        assert journal_port(client) == master.port
        assert analysis_port(client) == master.port
        assert journal_length(master, "sent-run") >= 2  # the init and the miss
        with contextlib.closing(master.client()) as admin:
            assert int(admin.info("commandstats")["cmdstat_pttl"]["calls"]) >= 1  # the analysis probed the master
    finally:
        client.close()
    port_6379.assert_untouched()


async def test_async_sentinel_spans_and_journal_use_the_master(fresh, spans, port_6379):
    """The redis.asyncio Sentinel pool: the same, learned from the async connection."""
    master, sentinel = fresh
    client = AsyncSentinel([(sentinel.host, sentinel.port)], socket_timeout=2).master_for(SERVICE)

    async def aget(redis: aredis.Redis, run_id: str, node_id: str) -> Any:
        return await redis.get(f"subflow:state:{run_id}:{node_id}")

    async def ainit(redis: aredis.Redis, run_id: str, node_id: str, data: str, ttl_ms: int = 60_000) -> bool:
        return bool(await redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms))

    try:
        assert endpoint_of(client) is None
        assert await instrument_state_init()(ainit)(client, "asent-run", "n1", "state") is True
        assert await instrument_state_get()(aget)(client, "asent-run", "n2") is None
        assert flush_journals(5.0)
        for span in spans():
            assert attrs_of(span)[names.ATTR_SERVER_PORT] == master.port
        assert verdict_of(spans()[-1])[names.ATTR_MISSING_CAUSE] == names.CAUSE_NEVER_WRITTEN
        assert journal_port(client) == master.port
        assert journal_length(master, "asent-run") >= 2
    finally:
        await client.aclose()
    port_6379.assert_untouched()


@pytest.mark.slow
def test_sentinel_failover_moves_the_endpoint(spans, port_6379):
    """After a failover the pool reconnects to the new master: spans, journal and analysis follow it."""
    _reset_state()
    with RedisServer() as old_master, RedisServer(replicaof=("127.0.0.1", old_master.port)) as replica:
        try:
            sentinel = RedisSentinel((old_master.host, old_master.port), service=SERVICE).start()
        except RedisServerError as exc:
            service_missing(str(exc))
            raise
        client = sentinel.sentinel().master_for(SERVICE)
        try:
            assert decorated_init(client, "fo-before", "n1", "state") is True
            assert flush_journals(5.0)
            assert journal_port(client) == old_master.port
            assert journal_length(old_master, "fo-before") == 1
            sentinel.wait_replicas(1)
            assert sentinel.failover() == ("127.0.0.1", replica.port)
            # The old master goes away: the app's connections to it break and redis-py
            # reconnects through Sentinel (the connect callback reports the new address).
            old_master.stop()
            result = None
            for _ in range(50):
                try:
                    result = decorated_get(client, "fo-before", "n1")
                    break
                except redis.ConnectionError:
                    continue  # what the app sees too while the pool reconnects
            assert result == b"state"  # replicated before the failover
            assert decorated_init(client, "fo-after", "n1", "state") is True
            assert decorated_get(client, "fo-after", "n2") is None
            assert flush_journals(5.0)
            for span in spans()[-2:]:
                assert attrs_of(span)[names.ATTR_SERVER_PORT] == replica.port
            assert verdict_of(spans()[-1])[names.ATTR_MISSING_CAUSE] == names.CAUSE_NEVER_WRITTEN
            info = connection_info(client)
            assert info is not None and (info.address, info.port) == ("127.0.0.1", replica.port)
            assert journal_port(client) == replica.port
            assert analysis_port(client) == replica.port
            assert journal_length(replica, "fo-after") >= 2
        finally:
            client.close()
            sentinel.cleanup()
            _reset_state()
    port_6379.assert_untouched()


def test_a_write_lost_in_a_sentinel_failover_is_failover(spans, port_6379):
    """The replica is stopped and its link cut before the write, the master killed right after it; Sentinel
    promotes the replica. With the journal on a Redis of its own the init survives: the read says failover,
    probable while the old master is down, definitive once Sentinel has made it a replica of the new one."""
    _reset_state()
    with RedisServer() as journal, RedisServer() as old_master, \
            RedisServer(replicaof=("127.0.0.1", old_master.port)) as replica:
        set_config(SubflowConfig(journal_url=journal.url(), analysis_rate_per_s=1e6, analysis_burst=10**6))
        try:
            sentinel = RedisSentinel((old_master.host, old_master.port), service=SERVICE).start()
        except RedisServerError as exc:
            service_missing(str(exc))
            raise
        client = sentinel.sentinel().master_for(SERVICE)
        stopped = replica.process
        assert stopped is not None
        try:
            sentinel.wait_replicas(1)
            assert decorated_init(client, "fo-warm", "n1", "state") is True
            stopped.send_signal(signal.SIGSTOP)
            try:
                with contextlib.closing(old_master.client()) as admin:  # nothing left in flight to the replica
                    assert admin.client_kill_filter(_type="replica") == 1
                assert decorated_init(client, "fo-lost", "n1", "state") is True  # acknowledged by the master alone
                assert flush_journals(5.0)
                old_master.kill()
            finally:
                stopped.send_signal(signal.SIGCONT)
            wait_for(lambda: sentinel.master_address() == ("127.0.0.1", replica.port), 30.0)

            def read() -> Any:
                for _ in range(100):
                    try:
                        return decorated_get(client, "fo-lost", "n1")
                    except redis.ConnectionError:
                        continue  # what the app sees too while the pool reconnects through Sentinel
                raise AssertionError("the pool never reached the new master")

            assert read() is None
            first = verdict_of(spans()[-1])
            assert attrs_of(spans()[-1])[names.ATTR_SERVER_PORT] == replica.port
            assert (first[names.ATTR_MISSING_CAUSE], first[names.ATTR_MISSING_CONFIDENCE]) == (
                names.CAUSE_FAILOVER, names.CONFIDENCE_PROBABLE)
            old_master.start()  # empty: Sentinel turns it into a replica of the promoted one
            with contextlib.closing(replica.client()) as promoted:
                wait_for(lambda: (promoted.info("replication").get("slave0") or {}).get("port") == old_master.port,
                         30.0)
            assert read() is None
            second = verdict_of(spans()[-1])
            assert (second[names.ATTR_MISSING_CAUSE], second[names.ATTR_MISSING_CONFIDENCE]) == (
                names.CAUSE_FAILOVER, names.CONFIDENCE_DEFINITIVE)
            assert f"127.0.0.1:{old_master.port}" in str(second[names.ATTR_MISSING_SUMMARY])
        finally:
            client.close()
            sentinel.cleanup()
            _reset_state()
    port_6379.assert_untouched()


# -- unix sockets and TLS ----------------------------------------------------------------------


def test_unix_socket_pool(tmp_path, spans, port_6379):
    """A unix-socket-only server: spans name the socket, the journal and the analysis use it."""
    _reset_state()
    sock = tmp_path / "redis.sock"
    with RedisServer(unixsocket=sock, tcp=False) as server:
        client = server.client()
        try:
            assert decorated_init(client, "unix-run", "n1", "state") is True
            assert decorated_get(client, "unix-run", "n1") == b"state"
            assert flush_journals(5.0)
            assert decorated_get(client, "unix-run", "n2") is None
            assert flush_journals(5.0)
            for span in spans():
                assert attrs_of(span)[names.ATTR_SERVER_ADDRESS] == str(sock)
                assert names.ATTR_SERVER_PORT not in attrs_of(span)
            assert verdict_of(spans()[-1])[names.ATTR_MISSING_CAUSE] == names.CAUSE_NEVER_WRITTEN
            journal = journal_for(client, get_config())
            assert journal is not None
            assert journal.client.connection_pool.connection_kwargs.get("path") == str(sock)
            target = Target.of_client(client)
            assert target is not None
            assert target.sync_client(0.25).connection_pool.connection_kwargs.get("path") == str(sock)
            assert journal_length(server, "unix-run") >= 2
        finally:
            client.close()
            _reset_state()
    port_6379.assert_untouched()


def test_tls_pool(tmp_path, spans, port_6379):
    """A TLS-only port: our journal and analysis clients speak TLS with the app's CA settings."""
    _reset_state()
    try:
        files = make_tls_files(tmp_path / "tls")
        server = RedisServer(tls=files).start()
    except RedisServerError as exc:
        pytest.skip(f"no TLS test server here: {exc}")
    try:
        client = server.client()
        try:
            assert decorated_init(client, "tls-run", "n1", "state") is True
            assert decorated_get(client, "tls-run", "n2") is None
            assert flush_journals(5.0)
            for span in spans():
                assert attrs_of(span)[names.ATTR_SERVER_PORT] == server.port
            assert verdict_of(spans()[-1])[names.ATTR_MISSING_CAUSE] == names.CAUSE_NEVER_WRITTEN
            journal = journal_for(client, get_config())
            assert journal is not None
            assert journal.client.connection_pool.connection_class is redis.SSLConnection
            assert journal_length(server, "tls-run") >= 2
        finally:
            client.close()
            _reset_state()
    finally:
        server.cleanup()
    port_6379.assert_untouched()
