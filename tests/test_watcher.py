"""The keyspace watcher: tombstones for state keys only, flag checks, honest status, retries with back-off.

Every server-side failure is produced on a real redis-server: an ACL user without
channel permission (NOPERM), a server killed / stopped and restarted, keyspace
events off, CONFIG refused. None of them may raise into the caller or kill the
thread silently: each shows in ``status``, in one rate-limited warning, in the
``subflow.watcher.errors`` counter and the ``subflow.watcher.up`` gauge.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_subflow import KeyspaceEventsOff, KeyspaceWatcher, SubflowConfig, flush_journals, names
from otel_subflow._journal import store
from otel_subflow._journal.location import journal_for
from otel_subflow._watch.events import check_events_flags, key_pattern, merge_flags
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import wait_for

NOPERM_USER, NOPERM_PASSWORD = "watcher", "watcher-pw-7f3a"
WATCHER_LOG = "otel-subflow keyspace watcher"


def _ops(client: redis.Redis, run_id: str) -> list[str]:
    return [e.op for e in store.read_run(client, run_id)]


def _gaps(client: redis.Redis) -> list[dict[str, str]]:
    return [e.fields for e in store.read_recent(client, 1000) if e.op == "watcher_gap"]


def _flags(server: RedisServer) -> str:
    admin = server.client(decode_responses=True)
    try:
        return str(admin.config_get("notify-keyspace-events")["notify-keyspace-events"])
    finally:
        admin.close()


class Metrics:
    """An in-memory meter provider of our own: points of one test, nothing cumulative from others."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        out: list[Any] = []
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        out.extend(metric.data.data_points)
        return out

    def up(self, port: int) -> list[int]:
        return [p.value for p in self.points(names.METRIC_WATCHER_UP)
                if p.attributes.get(names.ATTR_SERVER_PORT) == port]

    def errors(self, error_type: str) -> int:
        return sum(p.value for p in self.points(names.METRIC_WATCHER_ERRORS)
                   if p.attributes.get(names.ATTR_ERROR_TYPE) == error_type)


@pytest.fixture
def meter() -> Iterator[Metrics]:
    m = Metrics()
    yield m
    m.provider.shutdown()


@pytest.fixture
def watcher_logs(caplog: pytest.LogCaptureFixture) -> Any:
    """The watcher's WARNING lines so far (caplog), optionally only those matching a regex."""
    caplog.set_level(logging.INFO, logger=names.LOGGER_NAME)

    def lines(pattern: str = "") -> list[str]:
        return [rec.getMessage() for rec in caplog.records
                if rec.levelno >= logging.WARNING and rec.getMessage().startswith(WATCHER_LOG)
                and re.search(pattern, rec.getMessage())]

    return lines


def _noperm_server(**kwargs: Any) -> RedisServer:
    """A server with an ACL user allowed every key and command but only channels ``foo*``."""
    server = RedisServer(**kwargs).start()
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", NOPERM_USER, "on", f">{NOPERM_PASSWORD}", "~*", "&foo*", "+@all")
    admin.close()
    return server


def _as_user(server: RedisServer) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port, username=NOPERM_USER, password=NOPERM_PASSWORD)


# -- the happy path ------------------------------------------------------------------------------


def test_expired_evicted_del_become_tombstones_for_state_keys_only(redis_server, meter):
    """expired and del of state keys are journalled; other keys are ignored; status says running."""
    with RedisServer(notify_keyspace_events="Exeg") as server:
        client = server.client()
        watcher = KeyspaceWatcher(server.client(), config=SubflowConfig(), meter_provider=meter.provider).start()
        try:
            status = watcher.status
            assert (status.state, status.subscribed, status.errors, status.last_error) == (
                names.WATCHER_RUNNING, True, 0, None)
            assert status.events_flags is not None and check_events_flags(status.events_flags).ok
            assert status.describe().startswith("running since ")
            # Subscribed means confirmed by the server: the three patterns are there already.
            assert int(client.execute_command("PUBSUB", "NUMPAT")) == 3
            assert meter.up(server.port) == [1]
            client.set("subflow:state:run-w:a", 1, px=20)
            client.set("subflow:state:run-w:b", 1)
            client.delete("subflow:state:run-w:b")
            client.set("unrelated", 1)
            client.delete("unrelated")
            wait_for(lambda: (watcher.journal.flush(1), len(_ops(client, "run-w")))[1] == 2, 10)
        finally:
            watcher.stop()
        assert sorted(_ops(client, "run-w")) == ["del", "expired"]
        assert watcher.stats.tombstones == 2
        assert watcher.stats.ignored >= 1
def _ops(client: redis.Redis, run_id: str) -> list[str]:
    return [e.op for e in store.read_run(client, run_id)]


def test_key_pattern_parses_run_and_node():
    """The template parser pulls run and node out of keys, and rejects other keys."""
    pattern = key_pattern("subflow:state:{run_id}:{node_id}")
    assert pattern.match("subflow:state:r1:n1").groupdict() == {"run_id": "r1", "node_id": "n1"}
    assert pattern.match("subflow:state:r:1:n") is not None
    assert pattern.match("other:r1:n1") is None
    custom = key_pattern("wf/{tenant}/{run_id}.{node_id}")
    assert custom.match("wf/acme/R.N").groupdict() == {"run_id": "R", "node_id": "N"}


# -- NOPERM on the channels ----------------------------------------------------------------------


def test_noperm_on_the_channels_is_visible_and_retried(meter, watcher_logs):
    """An ACL user without channel permission: not subscribed, retrying with back-off, one warning,
    counted; once the channels are granted it subscribes, and journals the gap; revoked again, it retries."""
    server = _noperm_server()
    try:
        with RedisServer(notify_keyspace_events="") as journal_server:
            config = SubflowConfig(journal_url=journal_server.url())
            journal = journal_for(None, config)
            watcher = KeyspaceWatcher(_as_user(server), journal=journal, config=config, reconnect_max_s=0.2,
                                      meter_provider=meter.provider)
            started = time.monotonic()
            assert watcher.start() is watcher  # no exception
            assert time.monotonic() - started < 2.0  # returns after the first failed attempt
            try:
                wait_for(lambda: watcher.status.consecutive_errors >= 5, 10)
                status = watcher.status
                assert status.state == names.WATCHER_RETRYING
                assert status.subscribed is False and watcher.subscribed is False
                assert watcher._thread is not None and watcher._thread.is_alive()
                assert status.last_error_type == "NoPermissionError"
                assert status.last_error is not None and "no permissions" in status.last_error
                assert status.last_error_at is not None and time.time() - status.last_error_at < 5
                assert status.since is not None and status.since <= status.last_error_at
                assert status.next_retry_at is not None
                assert status.describe().startswith("retrying since ")
                assert "NoPermissionError" in status.describe()
                assert status.as_dict()["since"].endswith("Z")
                assert int(server.client().execute_command("PUBSUB", "NUMPAT")) == 0
                # Back-off: 0.1, 0.2, 0.2... (capped), not a busy loop.
                assert status.errors <= (time.monotonic() - started) / 0.1 + 2
                # Rate-limited: one line for this cause however many times it happened.
                assert len(watcher_logs("NoPermissionError")) == 1
                assert "PSUBSCRIBE" in watcher_logs("NoPermissionError")[0]
                assert meter.errors("NoPermissionError") == watcher.status.errors_by_type["NoPermissionError"]
                assert meter.up(server.port) == [0]

                admin = server.client()
                admin.execute_command("ACL", "SETUSER", NOPERM_USER, "allchannels")
                assert watcher.wait_subscribed(10)
                status = watcher.status
                assert (status.state, status.consecutive_errors) == (names.WATCHER_RUNNING, 0)
                assert status.last_error_type == "NoPermissionError"  # kept after recovery
                assert meter.up(server.port) == [1]
                assert watcher.stats.reconnects == 1
                journal.flush(2)
                (gap,) = _gaps(journal_server.client())
                assert "NoPermissionError" in gap["reason"]

                # Revoked while subscribed: Redis drops the connection; the watcher says so and retries.
                admin.execute_command("ACL", "SETUSER", NOPERM_USER, "resetchannels", "&foo*")
                wait_for(lambda: watcher.status.state == names.WATCHER_RETRYING, 10)
                assert not watcher.subscribed
                admin.close()
            finally:
                watcher.stop()
            assert watcher.status.state == names.WATCHER_STOPPED
            flush_journals()
    finally:
        server.cleanup()


def test_repeated_warnings_are_counted_into_the_next_line(watcher_logs):
    """At most one line per cause per log_every_s; the next line says how many were held back."""
    server = _noperm_server()
    try:
        watcher = KeyspaceWatcher(_as_user(server), config=SubflowConfig(journal_enabled=False),
                                  reconnect_max_s=0.05, log_every_s=0.5).start()
        started = time.monotonic()
        try:
            wait_for(lambda: len(watcher_logs("NoPermissionError")) >= 3, 10)
        finally:
            watcher.stop()
        elapsed = time.monotonic() - started
        lines = watcher_logs("NoPermissionError")
        assert len(lines) <= elapsed / 0.5 + 2
        held = [int(m.group(1)) if (m := re.search(r"\((\d+) more since the last such line\)", line)) else 0
                for line in lines]
        assert held[0] == 0 and all(n > 0 for n in held[1:]), lines
        # Nothing is lost from the count: every error is a line or held back (the last ones may be pending).
        assert sum(held) + len(lines) <= watcher.status.errors_by_type["NoPermissionError"]
    finally:
        server.cleanup()


# -- server killed, stopped, absent ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_reconnects_after_a_drop_and_records_the_gap(meter, watcher_logs, how):
    """Server killed (or stopped) and restarted on the same port: retrying while it is away
    (not subscribed, ConnectionError), then resubscribed with the gap journalled once."""
    with RedisServer() as journal_server, RedisServer(notify_keyspace_events="Exeg") as server:
        config = SubflowConfig(journal_url=journal_server.url())
        journal = journal_for(None, config)
        watcher = KeyspaceWatcher(server.client(), journal=journal, config=config, reconnect_max_s=0.5,
                                  meter_provider=meter.provider).start()
        try:
            assert watcher.subscribed
            getattr(server, how)()
            wait_for(lambda: watcher.status.state == names.WATCHER_RETRYING, 10)
            assert not watcher.subscribed and meter.up(server.port) == [0]
            wait_for(lambda: watcher.status.consecutive_errors >= 4, 10)  # keeps trying while down
            status = watcher.status
            assert status.last_error_type == "ConnectionError"
            assert meter.errors("ConnectionError") >= 4
            server.start()
            wait_for(lambda: watcher.stats.reconnects == 1 and watcher.subscribed, 30)
            assert watcher.status.state == names.WATCHER_RUNNING and meter.up(server.port) == [1]
            client = server.client()
            client.set("subflow:state:run-g:a", 1)
            client.delete("subflow:state:run-g:a")
            jc = journal_server.client()
            wait_for(lambda: (journal.flush(1), _ops(jc, "run-g"))[1] == ["del"], 10)
            (gap,) = _gaps(jc)
            assert int(gap["gap_end_ms"]) >= int(gap["gap_start_ms"])
            client.close()
        finally:
            watcher.stop()
        # One line for the loss (whatever the phase it was seen in, at most one per phase), one for the return.
        assert 1 <= len(watcher_logs("ConnectionError")) <= 3
        assert len(watcher_logs("subscribed again")) == 1
        flush_journals()


def test_start_with_the_server_down_does_not_raise(meter):
    """Connection refused at start: start() returns, status says why, and the watcher subscribes once
    the server is there."""
    server = RedisServer(notify_keyspace_events="Exeg")  # not started yet
    try:
        watcher = KeyspaceWatcher(server.client(), config=SubflowConfig(journal_enabled=False),
                                  reconnect_max_s=0.2, meter_provider=meter.provider)
        watcher.start()
        try:
            status = watcher.status
            assert status.state == names.WATCHER_RETRYING and not status.subscribed
            assert status.last_error_type == "ConnectionError" and meter.errors("ConnectionError") >= 1
            server.start()
            assert watcher.wait_subscribed(10)
            assert watcher.status.state == names.WATCHER_RUNNING
        finally:
            watcher.stop()
    finally:
        server.cleanup()


# -- keyspace events off, enabling them, CONFIG refused -------------------------------------------


def test_flags_check_and_merge():
    """Missing flags are named; merging adds them and keeps the others."""
    assert check_events_flags("").missing == "Exeg"
    assert check_events_flags("KEA").ok
    assert check_events_flags("Ex").missing == "eg"
    assert merge_flags("Kl") == "KlExeg"
    assert SubflowConfig.from_env({"OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS": "true"}).enable_keyspace_events is True
    assert SubflowConfig.from_env({}).enable_keyspace_events is False


def test_keyspace_events_off_warns_once_and_does_not_raise(meter, watcher_logs):
    """Flags off: start() does not raise; status says why with the exact fix; one warning; it keeps
    re-checking and subscribes once the flags are set. Explicit callers still get KeyspaceEventsOff."""
    with RedisServer(notify_keyspace_events="Kl") as server:
        watcher = KeyspaceWatcher(server.client(), config=SubflowConfig(journal_enabled=False),
                                  reconnect_max_s=0.1, meter_provider=meter.provider)
        with pytest.raises(KeyspaceEventsOff, match="lacks 'Exeg'"):
            watcher.ensure_events()
        watcher.start()
        try:
            wait_for(lambda: watcher.status.consecutive_errors >= 5, 10)
            status = watcher.status
            assert status.state == names.WATCHER_RETRYING and not status.subscribed
            assert status.last_error_type == "KeyspaceEventsOff"
            flags = _flags(server)  # as the server spells them
            fix = f"CONFIG SET notify-keyspace-events {merge_flags(flags)!r}"
            assert fix in (status.last_error or "")
            assert status.events_flags == flags
            (line,) = watcher_logs("")
            assert fix in line
            assert "OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS" in line
            assert meter.errors("KeyspaceEventsOff") == status.errors
            assert _flags(server) == flags  # never touched without enable_events
            server.client().config_set("notify-keyspace-events", "KlExeg")  # the operator applies the fix
            assert watcher.wait_subscribed(10)
            assert watcher.status.state == names.WATCHER_RUNNING
        finally:
            watcher.stop()


@pytest.mark.parametrize("via", ["argument", "config", "env"])
def test_enable_events_adds_flags_and_keeps_the_others(monkeypatch, watcher_logs, via):
    """enable_events (argument, config field or OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS) adds E, x, e, g
    to the server's flags; K, A and m already set survive."""
    with RedisServer(notify_keyspace_events="KAm") as server:
        before = _flags(server)
        assert set("KAm") <= set(before) and "E" not in before
        if via == "argument":
            watcher = KeyspaceWatcher(server.client(), config=SubflowConfig(journal_enabled=False),
                                      enable_events=True)
        elif via == "config":
            watcher = KeyspaceWatcher(server.client(),
                                      config=SubflowConfig(journal_enabled=False, enable_keyspace_events=True))
        else:
            monkeypatch.setenv("OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS", "true")
            monkeypatch.setenv("OTEL_SUBFLOW_JOURNAL", "false")
            watcher = KeyspaceWatcher(server.client(), config=SubflowConfig.from_env())
        watcher.start()
        try:
            assert watcher.subscribed and watcher.status.errors == 0
        finally:
            watcher.stop()
        after = _flags(server)
        assert set(before) | {"E"} <= set(after), (before, after)
        assert check_events_flags(after).ok
        (line,) = watcher_logs("enabled keyspace events")
        assert repr(before) in line and repr(after) in line


def test_enable_events_refused_by_acl_is_reported_not_raised(watcher_logs):
    """enable_events with a user that may not CONFIG SET: no exception, retrying, the refusal named."""
    with RedisServer(notify_keyspace_events="") as server:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "reader", "on", ">reader-pw", "~*", "&*", "+@all", "-config|set")
        admin.close()
        client = redis.Redis(host=server.host, port=server.port, username="reader", password="reader-pw")
        watcher = KeyspaceWatcher(client, config=SubflowConfig(journal_enabled=False), enable_events=True,
                                  reconnect_max_s=0.1).start()
        try:
            wait_for(lambda: watcher.status.consecutive_errors >= 3, 10)
            status = watcher.status
            assert status.state == names.WATCHER_RETRYING and not watcher.subscribed
            assert status.last_error_type == "KeyspaceEventsOff"
            assert "adding them was refused (NoPermissionError" in (status.last_error or "")
            assert len(watcher_logs("KeyspaceEventsOff")) == 1
        finally:
            watcher.stop()
        assert _flags(server) == ""


def test_config_refused_subscribes_anyway_and_says_so(watcher_logs):
    """CONFIG renamed away (managed Redis): the flags cannot be read; the watcher subscribes anyway,
    tombstones work (the server has the flags), and the status and one warning say the check was refused."""
    with RedisServer(notify_keyspace_events="Exeg", extra_args=["--rename-command", "CONFIG", ""]) as server:
        client = server.client()
        watcher = KeyspaceWatcher(server.client(), config=SubflowConfig()).start()
        try:
            status = watcher.status
            assert status.state == names.WATCHER_RUNNING and status.subscribed and status.errors == 0
            assert status.events_flags is None
            assert status.events_note is not None and "CONFIG GET refused" in status.events_note
            assert "CONFIG GET refused" in status.describe()
            client.set("subflow:state:run-c:a", 1)
            client.delete("subflow:state:run-c:a")
            wait_for(lambda: (watcher.journal.flush(1), _ops(client, "run-c"))[1] == ["del"], 10)
        finally:
            watcher.stop()
        assert len(watcher_logs("cannot read notify-keyspace-events")) == 1
        client.close()


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_fall_back_to_the_global_provider_without_run_or_node_ids(metric_points):
    """No meter_provider: the global one gets subflow.watcher.up (per server) and the errors counter;
    their attributes are the server and the error type only."""
    with RedisServer(notify_keyspace_events="") as server:
        off = KeyspaceWatcher(server.client(), config=SubflowConfig(journal_enabled=False), reconnect_max_s=0.1)
        off.start()
        try:
            wait_for(lambda: off.status.errors >= 2, 10)
            up = [p for p in metric_points(names.METRIC_WATCHER_UP)
                  if p.attributes.get(names.ATTR_SERVER_PORT) == server.port]
            assert [p.value for p in up] == [0]
            errors = [p for p in metric_points(names.METRIC_WATCHER_ERRORS)
                      if p.attributes.get(names.ATTR_SERVER_PORT) == server.port]
            assert errors and errors[0].attributes[names.ATTR_ERROR_TYPE] == "KeyspaceEventsOff"
            allowed = {names.ATTR_ERROR_TYPE, names.ATTR_SERVER_ADDRESS, names.ATTR_SERVER_PORT}
            for point in up + errors:
                assert set(point.attributes) <= allowed
        finally:
            off.stop()
