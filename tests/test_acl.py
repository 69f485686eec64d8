"""Restricted ACL users: a refused command is remembered, the app's connections are never touched.

``ACL SETUSER app on >pw ~subflow:state:* -@all +get +set +del`` is a common
production user. CLIENT ID and INFO are refused (NOPERM): the decorators must
not close the app's connection over it (which made redis-py reconnect on every
call), must not ask again on every (re)connect, and must say so once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aredis

from otel_subflow import flush_journals, instrument_state_get, instrument_state_init, names
from otel_subflow._redis.connection import connection_info
from otel_subflow._redis.endpoint import endpoint_ident
from otel_subflow._redis.permissions import RateLimitedLog, Refusals, acl_name, command_name, refusal_reason
from otel_subflow._runtime import runtime
from otel_subflow.lab.servers import RedisServer

USER, PASSWORD = "app", "app-secret"
ACL_RULES = ("on", f">{PASSWORD}", "~subflow:state:*", "-@all", "+get", "+set", "+del")


@pytest.fixture
def acl_user(r: redis.Redis) -> Iterator[None]:
    """The restricted user on the session's server (the ``r`` fixture resets our caches and refusals)."""
    r.execute_command("ACL", "SETUSER", USER, "reset", *ACL_RULES)
    r.config_resetstat()  # commandstats count from here
    yield
    flush_journals(2.0)
    r.execute_command("ACL", "DELUSER", USER)


def app_client(server: RedisServer, db: int = 0, **kwargs: Any) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port, db=db, username=USER, password=PASSWORD, **kwargs)


def async_app_client(server: RedisServer, db: int = 0) -> aredis.Redis:
    return aredis.Redis(host=server.host, port=server.port, db=db, username=USER, password=PASSWORD)


def connections_received(admin: redis.Redis) -> int:
    return int(admin.info("stats")["total_connections_received"])


def command_stat(admin: redis.Redis, command: str, field: str) -> int:
    """A field of INFO commandstats (``calls``, ``rejected_calls``...) for ``client|id``, ``info``..."""
    stats = admin.info("commandstats").get(f"cmdstat_{command}")
    return int(stats.get(field, 0)) if isinstance(stats, dict) else 0


def get_state(redis: redis.Redis, run_id: str, node_id: str) -> Any:
    return redis.get(f"subflow:state:{run_id}:{node_id}")


def get_other(redis: redis.Redis, run_id: str, node_id: str) -> Any:
    return redis.get(f"other:{run_id}:{node_id}")  # a key the ACL user may not read


decorated_get = instrument_state_get()(get_state)
decorated_get_other = instrument_state_get(key="other:{run_id}:{node_id}")(get_other)


async def aget_state(redis: aredis.Redis, run_id: str, node_id: str) -> Any:
    return await redis.get(f"subflow:state:{run_id}:{node_id}")


async def aget_other(redis: aredis.Redis, run_id: str, node_id: str) -> Any:
    return await redis.get(f"other:{run_id}:{node_id}")


decorated_aget = instrument_state_get()(aget_state)
decorated_aget_other = instrument_state_get(key="other:{run_id}:{node_id}")(aget_other)


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [rec for rec in caplog.records if rec.name == names.LOGGER_NAME and rec.levelno >= logging.WARNING]


#: The contract's per-event log records (one per miss, by design): not causes to rate-limit.
CONTRACT_LOGS = {names.LOG_MISSING_STATE_ANALYSIS, names.LOG_CRITICAL_STATE_ISSUE, names.LOG_STATE_OPERATION_DETAILED}


def lines_per_cause(caplog: pytest.LogCaptureFixture) -> dict[str, int]:
    """Our other warning lines, by cause (the rate-limited helper names it; else the message)."""
    counts: dict[str, int] = {}
    for rec in ours(caplog):
        if rec.getMessage() in CONTRACT_LOGS:
            continue
        cause = str(getattr(rec, "otel_subflow_cause", rec.getMessage()))
        counts[cause] = counts.get(cause, 0) + 1
    return counts


def assert_refusal_logged_once(caplog: pytest.LogCaptureFixture, port: int) -> None:
    assert all(n == 1 for n in lines_per_cause(caplog).values()), lines_per_cause(caplog)
    messages = [rec.getMessage() for rec in ours(caplog) if rec.getMessage() not in CONTRACT_LOGS]
    client_id = [m for m in messages if m.startswith("CLIENT ID refused")]
    assert client_id == [
        f"CLIENT ID refused on 127.0.0.1:{port} for user {USER} (NOPERM); span attribute "
        f"{names.ATTR_REDIS_CLIENT_ID} will be absent; grant +client|id to enable"
    ], messages
    assert any(m.startswith("INFO refused") and "grant +info" in m for m in messages), messages


# -- the decorated hit path ---------------------------------------------------------


def test_restricted_user_hits_keep_the_apps_connection(redis_server, r, acl_user, spans, caplog):
    """1,000 decorated hits: at most 2 connections, CLIENT ID / INFO asked once, the same results, one log line."""
    caplog.set_level(logging.WARNING, logger=names.LOGGER_NAME)
    r.set("subflow:state:acl-run:n1", "state")
    before = connections_received(r)
    client = app_client(redis_server)
    try:
        for _ in range(1000):
            assert decorated_get(client, "acl-run", "n1") == get_state(client, "acl-run", "n1") == b"state"
        opened = connections_received(r) - before
        assert opened <= 2, f"{opened} connections for 1,000 hits: the app's connection is being closed"
        # Asked once, refused once, never again (the refusal is remembered for the endpoint).
        assert command_stat(r, "client|id", "rejected_calls") == 1
        assert command_stat(r, "info", "rejected_calls") == 1
        assert_refusal_logged_once(caplog, redis_server.port)
        span = spans()[-1]
        attrs = dict(span.attributes or {})
        assert attrs[names.ATTR_STATE_OUTCOME] == names.OUTCOME_HIT
        assert attrs[names.ATTR_SERVER_PORT] == redis_server.port
        assert names.ATTR_REDIS_CLIENT_ID not in attrs and names.ATTR_REDIS_SERVER_RUN_ID not in attrs
        ident = endpoint_ident(client)
        assert runtime.refusals.refused_commands(ident) == ["CLIENT ID", "INFO"]
    finally:
        client.close()


def test_restricted_user_exceptions_and_misses_pass_through(redis_server, r, acl_user, caplog):
    """A refused key raises the same NoPermissionError decorated or not; a miss returns None; the connection stays."""
    caplog.set_level(logging.WARNING, logger=names.LOGGER_NAME)
    before = connections_received(r)
    client = app_client(redis_server)
    try:
        for i in range(50):
            with pytest.raises(redis.exceptions.NoPermissionError) as bare:
                get_other(client, "acl-run", f"n{i}")
            with pytest.raises(redis.exceptions.NoPermissionError) as decorated:
                decorated_get_other(client, "acl-run", f"n{i}")
            assert str(decorated.value) == str(bare.value)
            assert decorated_get(client, "acl-run", f"missing-{i}") is None
        # The app's connection, plus our own analysis / journal clients (each opened once).
        assert connections_received(r) - before <= 4
        assert command_stat(r, "client|id", "rejected_calls") == 1
        assert all(n == 1 for n in lines_per_cause(caplog).values()), lines_per_cause(caplog)
    finally:
        client.close()


def test_reconnects_do_not_reset_refusals(redis_server, r, acl_user):
    """A killed connection reconnects (redis-py's doing); the refused commands are still not sent."""
    r.set("subflow:state:acl-run:n1", "state")
    client = app_client(redis_server)
    try:
        assert decorated_get(client, "acl-run", "n1") == b"state"
        assert command_stat(r, "client|id", "rejected_calls") == 1
        for _ in range(5):
            r.execute_command("CLIENT", "KILL", "USER", USER)
            for _ in range(20):
                assert decorated_get(client, "acl-run", "n1") == b"state"
        assert command_stat(r, "client|id", "rejected_calls") == 1
        assert command_stat(r, "info", "rejected_calls") == 1
        info = connection_info(client)
        assert info is not None and info.fetched and info.failures == 0
    finally:
        client.close()


def test_refusals_are_per_endpoint_not_per_db(redis_server, r, acl_user):
    """ACLs do not depend on the db: a pool on db 3 does not ask again what db 0's pool was refused."""
    r.execute_command("ACL", "SETUSER", USER, "+select")
    r.set("subflow:state:acl-run:n1", "state")
    first, other_db = app_client(redis_server), app_client(redis_server, db=3)
    try:
        decorated_get(first, "acl-run", "n1")
        assert decorated_get(other_db, "acl-run", "n1") is None
        assert command_stat(r, "client|id", "rejected_calls") == 1
        assert endpoint_ident(first) == endpoint_ident(other_db) == ("127.0.0.1", redis_server.port, USER)
    finally:
        first.close()
        other_db.close()


def test_partial_acl_fetches_what_is_allowed(redis_server, r, acl_user, spans):
    """+info but not +client|id: the run id is fetched, the client id is not asked for again."""
    r.execute_command("ACL", "SETUSER", USER, "+info")
    r.set("subflow:state:acl-run:n1", "state")
    client = app_client(redis_server)
    try:
        for _ in range(3):
            decorated_get(client, "acl-run", "n1")
        attrs = dict(spans()[-1].attributes or {})
        assert attrs[names.ATTR_REDIS_SERVER_RUN_ID] == redis_server.run_id()
        assert names.ATTR_REDIS_CLIENT_ID not in attrs
        assert command_stat(r, "client|id", "rejected_calls") == 1
        assert command_stat(r, "info", "rejected_calls") == 0
    finally:
        client.close()


async def test_restricted_user_async_hits_keep_the_apps_connection(redis_server, r, acl_user, spans, caplog):
    """The redis.asyncio twin: 1,000 hits, at most 2 connections, refusals asked once, one log line per cause."""
    caplog.set_level(logging.WARNING, logger=names.LOGGER_NAME)
    r.set("subflow:state:acl-run:n1", "state")
    before = connections_received(r)
    client = async_app_client(redis_server)
    try:
        for _ in range(1000):
            assert await decorated_aget(client, "acl-run", "n1") == await aget_state(client, "acl-run", "n1")
        for i in range(20):
            with pytest.raises(redis.exceptions.NoPermissionError) as bare:
                await aget_other(client, "acl-run", f"n{i}")
            with pytest.raises(redis.exceptions.NoPermissionError) as decorated:
                await decorated_aget_other(client, "acl-run", f"n{i}")
            assert str(decorated.value) == str(bare.value)
        opened = connections_received(r) - before
        assert opened <= 2, f"{opened} connections for 1,000 async hits"
        assert command_stat(r, "client|id", "rejected_calls") == 1
        assert command_stat(r, "info", "rejected_calls") == 1
        assert_refusal_logged_once(caplog, redis_server.port)
        attrs = dict(spans()[0].attributes or {})
        assert attrs[names.ATTR_SERVER_PORT] == redis_server.port
    finally:
        await client.aclose()


# -- timeouts: redis-py's own policy, and an exponential back-off -----------------------


@contextlib.contextmanager
def paused_after_call(admin: redis.Redis, pause_ms: int) -> Iterator[None]:
    """Wait out a ``CLIENT PAUSE`` on exit (every client, ours included, is held until it ends)."""
    try:
        yield
    finally:
        deadline = time.monotonic() + pause_ms / 1000.0 + 5.0
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.TimeoutError, redis.ConnectionError):
                if admin.ping():
                    break


def _pausing_get(admin: redis.Redis, pause_ms: int) -> Any:
    """A get_state that pauses the server right after its own GET: our fetch that follows times out."""

    def get_then_pause(redis: redis.Redis, run_id: str, node_id: str) -> Any:
        value = redis.get(f"subflow:state:{run_id}:{node_id}")
        admin.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
        return value

    return get_then_pause


def test_fetch_timeout_backs_off_exponentially(redis_server, r):
    """A fetch that times out is not retried on the next call nor on the reconnect; the delay doubles."""
    from otel_subflow import SubflowConfig

    admin = redis_server.client(socket_timeout=5)
    config = SubflowConfig(analysis_timeout_s=0.05)
    r.set("subflow:state:slow-run:n1", "state")
    client = redis_server.client()
    try:
        get_then_pause = instrument_state_get(config=config)(_pausing_get(admin, 300))
        with paused_after_call(admin, 300):
            assert get_then_pause(client, "slow-run", "n1") == b"state"
        info = connection_info(client)
        assert info is not None and not info.fetched and info.failures == 1
        first_delay = info.retry_at - time.monotonic()
        assert 20.0 < first_delay <= 30.0
        # redis-py closed the timed-out connection; the app reconnects once, and the connect
        # callback does not reset the back-off: no fetch, no more reconnects.
        calls_before = command_stat(r, "client|id", "calls")
        before = connections_received(r)
        plain = instrument_state_get(config=config)(get_state)
        for _ in range(200):
            assert plain(client, "slow-run", "n1") == b"state"
        assert connections_received(r) - before <= 1
        assert command_stat(r, "client|id", "calls") == calls_before
        # Due again (time passes): a second timeout doubles the delay.
        info.retry_at = 0.0
        with paused_after_call(admin, 300):
            get_then_pause(client, "slow-run", "n1")
        assert info.failures == 2
        assert 50.0 < info.retry_at - time.monotonic() <= 60.0
        # The connection the app gets back answers its own command, not a late reply of ours.
        for i in range(20):
            r.set(f"subflow:state:slow-run:k{i}", f"v{i}")
            assert plain(client, "slow-run", f"k{i}") == f"v{i}".encode()
        # A fetch that works resets the back-off.
        info.retry_at = 0.0
        assert plain(client, "slow-run", "n1") == b"state"
        assert info.fetched and info.failures == 0 and info.client_id is not None
    finally:
        client.close()
        admin.close()


async def test_async_fetch_timeout_leaves_no_stale_reply(redis_server, r):
    """redis.asyncio returns None on our read timeout and keeps the socket: the late reply must never reach the app."""
    from otel_subflow import SubflowConfig

    admin = redis_server.client(socket_timeout=5)
    config = SubflowConfig(analysis_timeout_s=0.05)
    r.set("subflow:state:slow-run:n1", "state")
    client = aredis.Redis(host=redis_server.host, port=redis_server.port)

    async def get_then_pause(redis: aredis.Redis, run_id: str, node_id: str) -> Any:
        value = await redis.get(f"subflow:state:{run_id}:{node_id}")
        admin.execute_command("CLIENT", "PAUSE", 300, "ALL")
        return value

    plain = instrument_state_get(config=config)(aget_state)
    pausing = instrument_state_get(config=config)(get_then_pause)
    try:
        with paused_after_call(admin, 300):
            assert await pausing(client, "slow-run", "n1") == b"state"
        info = connection_info(client)
        assert info is not None and info.failures == 1 and not info.needs_fetch()
        for i in range(20):
            r.set(f"subflow:state:slow-run:k{i}", f"v{i}")
            assert await plain(client, "slow-run", f"k{i}") == f"v{i}".encode()
    finally:
        await client.aclose()
        admin.close()


# -- the registry and the log helper ------------------------------------------------------


def test_refusal_reason_of_real_error_replies(redis_server, r, acl_user):
    """Classify what a real server answers: refusals vs. other errors."""
    client = app_client(redis_server)
    errors: dict[str, BaseException] = {}
    try:
        for label, args in {"noperm": ("CLIENT", "ID"), "noperm_keys": ("GET", "other:x"),
                            "subcommand": ("CLIENT", "NOPE")}.items():
            with pytest.raises(redis.ResponseError) as caught:
                (r if label == "subcommand" else client).execute_command(*args)
            errors[label] = caught.value
        r.set("plain", "x")
        with pytest.raises(redis.ResponseError) as wrongtype:
            r.hget("plain", "f")
    finally:
        client.close()
    with RedisServer(extra_args=["--rename-command", "CONFIG", ""]) as renamed, \
            contextlib.closing(renamed.client()) as c, pytest.raises(redis.ResponseError) as unknown:
        c.execute_command("CONFIG", "GET", "maxmemory")
    assert refusal_reason(errors["noperm"]) == "NOPERM"
    assert refusal_reason(errors["noperm_keys"]) == "NOPERM (keys)"
    assert refusal_reason(errors["subcommand"]) == "unknown subcommand"
    assert refusal_reason(unknown.value) == "unknown command"
    assert refusal_reason(wrongtype.value) is None
    assert refusal_reason(redis.TimeoutError("Timeout reading from socket")) is None
    assert refusal_reason(redis.ConnectionError("Connection refused")) is None
    assert refusal_reason(redis.ResponseError("ERR command not allowed inside a transaction")) is None
    assert refusal_reason(redis.ResponseError("ERR DEBUG command not allowed. If the enable-debug-command "
                                              "option is set to \"local\", you can run it from a local connection")) \
        == "not allowed"
    assert refusal_reason(redis.ResponseError("ERR unknown command 'EVALSHA', renamed by the admin")) == \
        "unknown command"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_refusal_registry(monkeypatch, caplog):
    """note / is_refused / refused_commands, names normalised, re-checked after RECHECK_AFTER_S, one log line."""
    import otel_subflow._redis.permissions as permissions

    clock = _Clock()
    monkeypatch.setattr(permissions, "time", clock)
    caplog.set_level(logging.WARNING, logger=names.LOGGER_NAME)
    registry = Refusals(RateLimitedLog(logging.getLogger(names.LOGGER_NAME)), recheck_after_s=3600.0)
    here, there = ("10.0.0.1", 6379, "app"), ("10.0.0.1", 6380, "app")
    refused = redis.exceptions.NoPermissionError("this user has no permissions to run the 'evalsha' command")
    assert not registry.note(here, "EVALSHA", redis.TimeoutError("slow"))
    assert not registry.note(None, "EVALSHA", refused)
    assert not registry.is_refused(here, "evalsha")
    for _ in range(5):
        assert registry.note(here, "evalsha", refused, consequence="races are found in process only")
    registry.note(here, "client|id", refused)
    assert registry.is_refused(here, "EVALSHA") and registry.is_refused(here, "CLIENT ID")
    assert not registry.is_refused(there, "EVALSHA")
    assert registry.refused_commands(here) == ["CLIENT ID", "EVALSHA"]
    assert registry.reason(here, "evalsha") == "NOPERM"
    messages = [rec.getMessage() for rec in ours(caplog)]
    assert messages.count(
        "EVALSHA refused on 10.0.0.1:6379 for user app (NOPERM); races are found in process only; "
        "grant +evalsha to enable") == 1, messages
    clock.now += 3599.0
    assert registry.is_refused(here, "EVALSHA")
    clock.now += 2.0
    assert not registry.is_refused(here, "EVALSHA")  # asked once more: the operator may have granted it
    assert command_name(" client|ID ") == "CLIENT ID" and acl_name("CLIENT ID") == "client|id"


def test_rate_limited_log_counts_repeats(monkeypatch):
    """One line per cause per minute; the repeats held back are counted into the next line."""
    import otel_subflow._redis.permissions as permissions

    clock = _Clock()
    monkeypatch.setattr(permissions, "time", clock)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("otel_subflow.test_rate_limited")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = Keep()
    logger.addHandler(handler)
    try:
        log = RateLimitedLog(logger, interval_s=60.0)
        assert log.log("a", logging.WARNING, "cause a: %s", "x")
        for _ in range(7):
            assert not log.log("a", logging.WARNING, "cause a: %s", "x")
        assert log.log("b", logging.WARNING, "cause b")
        assert log.held_back("a") == 7
        clock.now += 59.9
        assert not log.log("a", logging.WARNING, "cause a: %s", "x")
        clock.now += 0.2
        assert log.log("a", logging.WARNING, "cause a: %s", "y")
        assert [r.getMessage() for r in records] == [
            "cause a: x", "cause b", "cause a: y (8 more since the last such line)"]
        assert [r.otel_subflow_repeats for r in records] == [0, 0, 8]
        assert log.held_back("a") == 0
    finally:
        logger.removeHandler(handler)


def test_rate_limited_log_is_thread_safe():
    """Many threads, one cause: exactly one line within the interval, every other call counted."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("otel_subflow.test_rate_limited_threads")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = Keep()
    logger.addHandler(handler)
    try:
        log = RateLimitedLog(logger, interval_s=3600.0)
        barrier = threading.Barrier(8)

        def hammer() -> None:
            barrier.wait()
            for _ in range(500):
                log.log("same", logging.WARNING, "same cause")

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(records) == 1 and log.held_back("same") == 8 * 500 - 1
    finally:
        logger.removeHandler(handler)


def test_limited_log_is_our_logger():
    assert runtime.log.logger.name == names.LOGGER_NAME


async def test_async_restricted_user_with_init(redis_server, r, acl_user):
    """Decorated inits with the restricted user return what they would undecorated."""
    client = async_app_client(redis_server)

    async def ainit(redis: aredis.Redis, run_id: str, node_id: str, data: str, ttl_ms: int = 60_000) -> bool:
        return bool(await redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms))

    decorated = instrument_state_init()(ainit)
    try:
        for i in range(20):
            assert await decorated(client, "acl-init", f"n{i}", "s") is await ainit(client, "acl-init", f"m{i}", "s")
        assert command_stat(r, "client|id", "rejected_calls") == 1
    finally:
        await client.aclose()


def test_refusals_survive_fork_and_locks_are_fresh():
    """A child keeps what was learned, and a lock another thread held at fork() does not hang it."""
    import os

    runtime.reset()
    here = ("10.0.0.9", 6379, "app")
    runtime.refusals.note(here, "CLIENT ID", redis.exceptions.NoPermissionError("no permissions to run 'client|id'"))
    held, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with runtime.refusals._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    held.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # the child: note() takes the lock
            ok = runtime.refusals.is_refused(here, "client|id") and runtime.refusals.note(
                here, "INFO", redis.exceptions.NoPermissionError("no permissions to run 'info'"))
            os._exit(0 if ok and runtime.refusals.refused_commands(here) == ["CLIENT ID", "INFO"] else 1)
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on a lock held at fork()")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        holder.join(5)
        runtime.reset()
