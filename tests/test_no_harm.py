"""First, do no harm: log volume, restricted users, the minimal ACL, paused writes, a hanging journal.

Each test is a situation a production Redis puts the decorators in, produced on a
real redis-server: a burst of misses, an ACL user with only ``+get +set +del``,
the documented minimal ACL (:data:`~otel_subflow._redis.permissions.MINIMAL_ACL`),
``CLIENT PAUSE ... WRITE`` (a failover), a journal endpoint that accepts
connections and never answers.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from otel_subflow import (
    KeyspaceWatcher,
    SubflowConfig,
    flush_journals,
    instrument_state_get,
    instrument_state_init,
    names,
)
from otel_subflow._config import set_config
from otel_subflow._redis.permissions import MINIMAL_ACL
from tests.cli_helpers import wait_for
from tests.conftest import commandstats, commandstats_delta
from tests.test_acl import ACL_RULES, PASSWORD, USER, app_client, get_state

ROOT = Path(__file__).resolve().parent.parent
BURST = 1000
MAX_LINES = 50


def initialize_state(redis: redis.Redis, run_id: str, node_id: str, data: str, ttl_ms: int = 3_600_000) -> bool:
    return bool(redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms))


decorated_get = instrument_state_get()(get_state)
decorated_init = instrument_state_init()(initialize_state)


def _misses(spans: Any, since: int = 0) -> list[dict[str, Any]]:
    out = []
    for span in spans()[since:]:
        if span.name != names.SPAN_STATE_GET:
            continue
        out += [dict(e.attributes or {}) for e in span.events if e.name == names.EVENT_STATE_MISSING]
    return out


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [rec for rec in caplog.records if rec.name.startswith(names.LOGGER_NAME) and rec.levelno >= logging.WARNING]


@pytest.fixture
def user(r: redis.Redis) -> Iterator[Any]:
    """Make an ACL user (``user(rules)``) on the session's server; deleted afterwards."""
    made: list[str] = []

    def make(*rules: str, name: str = USER) -> str:
        r.execute_command("ACL", "SETUSER", name, "reset", "on", f">{PASSWORD}", *rules)
        made.append(name)
        return name

    yield make
    flush_journals(2.0)
    for name in made:
        r.execute_command("ACL", "DELUSER", name)


# -- log volume ----------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["default", "restricted"])
def test_a_burst_of_misses_logs_at_most_fifty_warnings(who, r, redis_server, user, caplog, spans):
    """1,000 misses in a burst at the default settings: ≤ 50 WARNING lines from our logger.

    Analysed misses may log one record each (the rate limit bounds them); misses past the limit
    and repeated refusals are counted, not logged one by one."""
    if who == "restricted":
        user(*ACL_RULES[2:])
        app = app_client(redis_server)
    else:
        app = redis_server.client()
    caplog.set_level(logging.INFO, logger=names.LOGGER_NAME)
    try:
        for i in range(BURST):
            assert decorated_get(app, "burst-run", f"n{i}") is None
        flush_journals(5.0)
    finally:
        app.close()
    lines = _warnings(caplog)
    assert len(_misses(spans)) == BURST  # every miss is still on its span
    assert len(lines) <= MAX_LINES, [rec.getMessage()[:120] for rec in lines[:60]]


# -- restricted users ------------------------------------------------------------------------


def test_restricted_verdicts_name_what_was_refused_and_nothing_is_asked_twice(r, redis_server, user, spans):
    """``-@all +get +set +del``: the first miss's verdict names the refused commands; later misses
    send none of them again (INFO commandstats: one rejected call per command at most)."""
    user(*ACL_RULES[2:])
    app = app_client(redis_server)
    r.config_resetstat()
    try:
        for i in range(20):
            assert decorated_get(app, "acl-run", f"n{i}") is None
        initialize_state(app, "acl-run", "x", "v")
        assert decorated_get(app, "acl-run", "x") == b"v"
    finally:
        app.close()
    first, *rest = _misses(spans)
    refused = list(first.get(names.EVIDENCE_PREFIX + "refused_commands", [first]))
    assert {"PTTL", "SCAN", "INFO"} <= {str(c) for c in refused}, refused
    summary = str(first[names.ATTR_MISSING_SUMMARY])
    assert "refused" in summary and "PTTL" in summary and "docs/acl.md" in summary, summary
    # Later misses: not analysed (nothing left that is allowed), and they say why.
    assert rest and all(m[names.ATTR_MISSING_CAUSE] == names.CAUSE_UNKNOWN for m in rest)
    assert all("not permitted" in str(m[names.ATTR_MISSING_SUMMARY]) for m in rest), rest[-1]
    stats = r.info("commandstats")
    rejected = {k.removeprefix("cmdstat_"): int(v.get("rejected_calls", 0)) for k, v in stats.items()}
    assert all(n <= 1 for n in rejected.values()), {k: v for k, v in rejected.items() if v}
    assert rejected.get("pttl") == 1 and rejected.get("info", 0) >= 1


def test_minimal_acl_gives_full_verdicts_and_no_refusal(r, redis_server, user, spans, caplog):
    """The documented minimal ACL: a watcher running as the user, a DEL gives ``deleted``
    (definitive), a never-written key ``never_written``, and the server logs no refusal."""
    name = user("~subflow:state:*", "-@all", "+get", "+set", "+del", *MINIMAL_ACL)
    r.config_set("notify-keyspace-events", "Exeg")  # an admin's job: CONFIG SET is not in the minimal ACL
    r.execute_command("ACL", "LOG", "RESET")
    caplog.set_level(logging.INFO, logger=names.LOGGER_NAME)
    app = app_client(redis_server)
    watcher = KeyspaceWatcher(app_client(redis_server), enable_events=False).start()
    try:
        assert watcher.subscribed, watcher.status
        assert decorated_init(app, "min-run", "gone", "v") is True
        flush_journals(5.0)
        r.delete("subflow:state:min-run:gone")
        wait_for(lambda: (watcher.journal.flush(1.0), watcher.stats.tombstones)[1] >= 1, 10.0)
        assert decorated_get(app, "min-run", "gone") is None
        assert decorated_get(app, "min-run", "never") is None
        flush_journals(5.0)
    finally:
        watcher.stop()
        watcher.client.close()
        app.close()
    gone, never = _misses(spans)
    assert (gone[names.ATTR_MISSING_CAUSE], gone[names.ATTR_MISSING_CONFIDENCE]) == (
        names.CAUSE_DELETED, names.CONFIDENCE_DEFINITIVE), gone
    assert never[names.ATTR_MISSING_CAUSE] == names.CAUSE_NEVER_WRITTEN, never
    assert names.EVIDENCE_PREFIX + "refused_commands" not in gone
    log = r.execute_command("ACL", "LOG")
    assert [entry for entry in log if name.encode() in repr(entry).encode()] == [], log
    assert not [rec for rec in _warnings(caplog) if "refused" in rec.getMessage()]


def test_minimal_acl_is_the_documented_one():
    """docs/acl.md shows every rule of MINIMAL_ACL (the docs and the code cannot drift apart)."""
    text = (ROOT / "docs" / "acl.md").read_text()
    missing = [rule for rule in MINIMAL_ACL if rule not in text]
    assert not missing, missing


# -- paused writes, a hanging journal -------------------------------------------------------


def test_misses_during_client_pause_write_are_analysed_without_waiting(r, redis_server, spans):
    """During ``CLIENT PAUSE 10000 WRITE`` (a failover), a miss is analysed at once: the analysis
    writes nothing, so nothing of it waits for the pause to end."""
    app = redis_server.client()
    decorated_init(app, "pause-run", "other", "v")
    assert decorated_get(app, "pause-run", "warm") is None
    flush_journals(5.0)
    since = len(spans())
    before = commandstats(r)
    r.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
    try:
        started = time.monotonic()
        for i in range(5):
            assert decorated_get(app, "pause-run", f"p{i}") is None
        took = time.monotonic() - started
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
        app.close()
    delta = commandstats_delta(before, commandstats(r))
    # A write would have blocked until UNPAUSE (10 s) or timed out; reads are served at once.
    assert took < 5.0, took
    misses = _misses(spans, since)
    assert [m[names.ATTR_MISSING_CAUSE] for m in misses] == [names.CAUSE_NEVER_WRITTEN] * 5, misses
    written = {c for c in delta if c in {"evalsha", "eval", "set", "hset", "zadd", "xadd", "del", "unlink"}}
    assert written == set(), delta


class Silent:
    """A TCP endpoint that accepts connections and never answers (a hung Redis)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_a_hanging_journal_endpoint_trips_the_breaker(r, redis_server, spans):
    """A dedicated journal whose server hangs: the first analyses time out on it and are decided
    without it; then the breaker skips it, and each miss says so instead of waiting."""
    silent = Silent()
    timeout_s = 0.2
    set_config(SubflowConfig(journal_url=f"redis://127.0.0.1:{silent.port}/0", analysis_timeout_s=timeout_s,
                             analysis_rate_per_s=1e9, analysis_burst=10**9))
    app = redis_server.client()
    try:
        took = []
        for i in range(12):
            started = time.monotonic()
            assert decorated_get(app, "hang-run", f"n{i}") is None
            took.append(time.monotonic() - started)
    finally:
        app.close()
        silent.close()
    misses = _misses(spans)
    errors = [str(m.get(names.EVIDENCE_PREFIX + "probe_errors", "")) for m in misses]
    assert "journal unreachable (TimeoutError)" in errors[0], errors[0]
    assert all("server slow, skipped" in e for e in errors[-5:]), errors
    # Decided without the journal, and saying so (not 'analysis failed', not a made-up cause).
    assert all("journal could not be read" in str(m[names.ATTR_MISSING_SUMMARY]) for m in misses), misses[-1]
    # Once skipped, a miss does not wait for the hung server at all.
    assert max(took[-5:]) < timeout_s, took
