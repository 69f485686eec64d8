"""The fault campaign: each fault injected in a real process against real servers.

Every test checks the three promises: the application's calls return (or raise)
exactly what they would without us, no exception of ours escapes (the error
boundary runs in production mode here and must count nothing), and the wait we
add stays within the configured timeouts.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.backoff import NoBackoff
from redis.retry import Retry

from otel_subflow import (
    KeyspaceWatcher,
    SubflowConfig,
    SubflowInstrumentationWarning,
    flush_journals,
    instrument_state_get,
    instrument_state_init,
    names,
)
from otel_subflow._boundary import internal_error_counts
from otel_subflow._config import get_config, set_config
from otel_subflow._journal import store
from otel_subflow._journal.location import journal_for
from otel_subflow._watch.events import key_pattern
from otel_subflow.lab.process import free_port
from otel_subflow.lab.servers import RedisServer
from tests.conftest import _reset_state, commandstats, commandstats_delta, service_missing

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "faults" / "app.py"
FUZZ = ROOT / "tests" / "faults" / "fuzz_key_template.py"


# -- the service, undecorated (the twin) and decorated --------------------------------


def raw_get(redis: redis.Redis, run_id: Any, node_id: Any) -> Any:
    return redis.get(f"subflow:state:{run_id}:{node_id}")


def raw_init(redis: redis.Redis, run_id: Any, node_id: Any, data: str, ttl_ms: int = 60_000) -> bool:
    return bool(redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms))


get_state = instrument_state_get()(raw_get)
initialize_state = instrument_state_init()(raw_init)


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any, float]:
    """What a call did: ('ok', value) or ('raise', (type, message)), and how long it took."""
    started = time.perf_counter()
    try:
        value = fn(*args)
    except Exception as exc:  # noqa: BLE001 - compared with the twin's
        return "raise", (type(exc), str(exc)), time.perf_counter() - started
    return "ok", value, time.perf_counter() - started


def same_as_twin(raw: Callable[..., Any], decorated: Callable[..., Any], *args: Any) -> tuple[str, Any, float, float]:
    """Run the undecorated twin, then the decorated function; they must agree exactly."""
    kind_raw, value_raw, took_raw = outcome(raw, *args)
    kind, value, took = outcome(decorated, *args)
    assert (kind, value) == (kind_raw, value_raw), f"decorated {kind} {value!r} != undecorated {kind_raw} {value_raw!r}"
    return kind, value, took_raw, took


@pytest.fixture
def production_boundary(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Our error boundary as users run it (swallowing); the test asserts it had nothing to swallow."""
    monkeypatch.delenv("OTEL_SUBFLOW_RAISE_INTERNAL_ERRORS", raising=False)
    _reset_state()
    yield
    counted = internal_error_counts()
    _reset_state()
    assert counted == {}, f"internal errors of ours under the fault: {counted}"


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def span_events(span: Any) -> list[str]:
    return [e.name for e in span.events]


# -- Redis SIGKILL mid-workload, then back ------------------------------------------------


def test_redis_killed_mid_workload_then_back(production_boundary, spans):
    """Calls fail exactly as redis-py fails them (outcome error, no verdict); the journal counts and
    drops what it could not write and resumes; the watcher reconnects and journals the gap."""
    config = SubflowConfig(journal_flush_interval_s=30.0, journal_batch_size=10_000, analysis_timeout_s=0.2)
    set_config(config)
    with RedisServer() as server:
        # No client retries: redis-py's default retries back off with jitter, which would drown
        # the comparison of the two calls' durations in noise.
        app = server.client(socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))
        watcher = KeyspaceWatcher(server.client(socket_timeout=1.0), config=config, reconnect_max_s=0.2).start()
        assert watcher.subscribed
        try:
            for n in range(5):
                same_as_twin(raw_init, initialize_state, app, "kill-run", f"n{n}", "v")
                assert same_as_twin(raw_get, get_state, app, "kill-run", f"n{n}")[1] == b"v"
            assert flush_journals(5.0)
            journal = journal_for(app, config)
            assert journal is not None
            written_before = journal.stats().written
            for n in range(20):  # queued (flush interval 30 s): in memory when the server dies
                initialize_state(app, "kill-run", f"pending-{n}", "v")
            old_run_id = server.run_id()
            spans_before = len(spans())

            server.kill()
            for n in range(3):
                kind, value, took_raw, took = same_as_twin(raw_get, get_state, app, "kill-run", "n0")
                assert kind == "raise" and issubclass(value[0], redis.ConnectionError)
                # No analysis, no id fetch on a dead server: our share of the wait is tiny.
                assert took <= took_raw + config.analysis_timeout_s, (took, took_raw)
                kind, value, _, _ = same_as_twin(raw_init, initialize_state, app, "kill-run", f"down-{n}", "v")
                assert kind == "raise" and issubclass(value[0], redis.ConnectionError)
            down = spans()[spans_before:]
            assert len(down) == 6
            for span in down:
                assert span.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_ERROR
                assert span.attributes[names.ATTR_ERROR_TYPE] == "ConnectionError"
                assert names.EVENT_STATE_MISSING not in span_events(span)
            flush_journals(1.5)  # the 20 pending records cannot be written: counted and dropped
            stats = journal.stats()
            assert stats.failed_flushes >= 1 and stats.dropped >= 20, stats
            assert stats.written == written_before

            server.start()
            wait_for(lambda: outcome(raw_get, app, "kill-run", "n0")[0] == "ok", 10.0, "redis-py reconnects")
            same_as_twin(raw_init, initialize_state, app, "kill-run", "after", "v2")
            kind, value, _, _ = same_as_twin(raw_get, get_state, app, "kill-run", "after")
            assert value == b"v2"
            assert same_as_twin(raw_get, get_state, app, "kill-run", "n0")[1] is None  # no persistence
            hit = [s for s in spans() if s.name == names.SPAN_STATE_GET][-2]
            assert hit.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_HIT
            new_run_id = server.run_id()
            assert new_run_id != old_run_id
            # The cached server run_id is refreshed after the restart (a stale one would fake a verdict).
            assert hit.attributes[names.ATTR_REDIS_SERVER_RUN_ID] == new_run_id

            wait_for(lambda: watcher.stats.reconnects >= 1 and watcher.stats.gaps >= 1, 15.0, "watcher reconnect")
            assert flush_journals(5.0)
            assert journal.stats().written > written_before  # the journal resumed
            check = server.client(decode_responses=True)
            ops = [e.op for e in store.read_recent(check, 1000)]
            assert "watcher_gap" in ops and "init" in ops, ops
            run_ops = [e.fields["node_id"] for e in store.read_run(check, "kill-run") if e.op == "init"]
            assert run_ops == ["after"]  # the pending records were dropped, not replayed late
            check.close()
        finally:
            watcher.stop(2.0)
            app.close()


# -- Redis slow: DEBUG SLEEP, CLIENT PAUSE ---------------------------------------------------


@pytest.fixture(scope="module")
def debug_server() -> Iterator[RedisServer]:
    with RedisServer(extra_args=["--enable-debug-command", "yes"]) as server:
        yield server


def _server_blocked(server: RedisServer, within_s: float = 0.05) -> bool:
    """True when the server does not answer a PING within ``within_s`` (it is sleeping or paused)."""
    with socket.create_connection((server.host, server.port), timeout=1.0) as sock:
        sock.sendall(b"PING\r\n")
        readable, _, _ = select.select([sock], [], [], within_s)
        return not readable


def _slow_down(server: RedisServer, how: str, seconds: float) -> None:
    """Make the server slow now; return once it is (DEBUG SLEEP blocks it, CLIENT PAUSE holds clients)."""
    if how == "pause":
        with server.client() as pauser:
            pauser.execute_command("CLIENT", "PAUSE", str(int(seconds * 1000)), "ALL")
        return
    sleeper = server.client(socket_timeout=seconds + 5)
    thread = threading.Thread(target=sleeper.execute_command, args=("DEBUG", "SLEEP", str(seconds)), daemon=True)
    thread.start()
    wait_for(lambda: _server_blocked(server), 2.0, "DEBUG SLEEP in effect", every_s=0.0)


def _wait_responsive(server: RedisServer) -> None:
    wait_for(lambda: not _server_blocked(server, 0.2), 10.0, "server answers again")


@pytest.mark.parametrize("how", ["sleep", "pause"])
def test_slow_redis_analysis_times_out_and_says_unknown(how, debug_server, production_boundary, spans):
    """The server stalls right after the app's read: the analysis gives up at its timeout, the verdict
    is 'unknown' with the reason, and the call returns what it would have."""
    timeout_s = 0.1
    set_config(SubflowConfig(analysis_timeout_s=timeout_s))
    app = debug_server.client(socket_timeout=5.0)
    own: list[float] = []

    def read_then_stall(redis: redis.Redis, run_id: str, node_id: str) -> Any:
        started = time.perf_counter()
        value = raw_get(redis, run_id, node_id)
        _slow_down(debug_server, how, 1.0)
        own.append(time.perf_counter() - started)
        return value

    decorated = instrument_state_get()(read_then_stall)
    try:
        decorated(app, "slow-run", "warm")  # pool ids and the analysis connection, while healthy
        _wait_responsive(debug_server)
        spans_before = len(spans())
        started = time.perf_counter()
        value = decorated(app, "slow-run", "absent")
        took = time.perf_counter() - started
        assert value is None
        # Our share: the analysis round trip(s), each cut at the configured timeout.
        assert took - own[-1] <= 2 * timeout_s + 0.15, (took, own[-1])
        (span,) = [s for s in spans()[spans_before:] if s.name == names.SPAN_STATE_GET]
        (event,) = [e for e in span.events if e.name == names.EVENT_STATE_MISSING]
        attrs = dict(event.attributes or {})
        assert attrs[names.ATTR_MISSING_CAUSE] == names.CAUSE_UNKNOWN
        assert attrs[names.ATTR_MISSING_CONFIDENCE] == names.CONFIDENCE_UNKNOWN
        assert "analysis failed" in str(attrs[names.ATTR_MISSING_SUMMARY])
        assert attrs[names.EVIDENCE_PREFIX + "analysis_error"] in ("TimeoutError", "ConnectionError")
    finally:
        _wait_responsive(debug_server)
        app.close()


@pytest.mark.parametrize("how", ["sleep", "pause"])
def test_slow_redis_hit_path_waits_only_for_the_server(how, debug_server, production_boundary, spans):
    """During a stall the decorated hit waits for the server like the bare GET does, and no longer."""
    stall_s = 0.4
    app = debug_server.client(socket_timeout=5.0)
    try:
        raw_init(app, "slow-run", "hit", "v")
        assert get_state(app, "slow-run", "hit") == b"v"  # warm: ids fetched while healthy
        for fn in (raw_get, get_state):
            _wait_responsive(debug_server)
            _slow_down(debug_server, how, stall_s)
            kind, value, took = outcome(fn, app, "slow-run", "hit")
            assert (kind, value) == ("ok", b"v")
            assert took <= stall_s + 0.2, (fn.__name__, took)
        span = [s for s in spans() if s.name == names.SPAN_STATE_GET][-1]
        assert span.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_HIT
    finally:
        _wait_responsive(debug_server)
        app.close()


# -- the collector down, and restarted -------------------------------------------------------


def _run_app(env: dict[str, str], *args: str, timeout: float = 120) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(APP), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _app_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_METRIC_EXPORT_INTERVAL": "500", "OTEL_BSP_SCHEDULE_DELAY": "200"})
    env.update(extra)
    return env


def _latencies(calls: list[list[float]], start: float = 0.0, end: float = float("inf")) -> list[float]:
    return [latency for at, latency in calls if start <= at < end]


def _collector(redis_server: RedisServer) -> tuple[Any, Any]:
    """The built collector alone, with the bundled config, on free ports (absent binary: fail in CI)."""
    from otel_subflow.stack import LocalStack, StackError, StackPorts

    ports = StackPorts.free()
    try:
        stack = LocalStack(ports=ports, components=("collector",), sample_percent=100, decision_wait="1s",
                           redis_endpoint=f"{redis_server.host}:{redis_server.port}")
    except StackError as exc:
        service_missing(f"collector binary: {exc}")
        raise
    return stack, ports


def _export_env(stack: Any) -> dict[str, str]:
    return _app_env(**{k: v for k, v in stack.app_env().items() if k.startswith("OTEL_EXPORTER")},
                    OTEL_EXPORTER_OTLP_TIMEOUT="2")


def test_collector_down_for_the_whole_run(redis_server):
    """The same load exporting to a running collector, then to the same endpoint with the collector
    down for the whole run: the app's calls are not slowed, and shutdown gives up within its timeouts."""
    stack, _ = _collector(redis_server)
    stack.start()
    try:
        env = _export_env(stack)
        up = _run_app(env, "load", redis_server.url(), "3")
        stack.stop_component("collector")
        down = _run_app(env, "load", redis_server.url(), "3")
    finally:
        stack.stop()
    base, slow = _latencies(up["calls"]), _latencies(down["calls"])
    print(f"\ncollector down: {len(slow)} calls (vs {len(base)} with it up); p50 "
          f"{statistics.median(slow) * 1e3:.3f} ms vs {statistics.median(base) * 1e3:.3f} ms; max "
          f"{max(slow) * 1e3:.1f} ms; shutdown {down['shutdown_s']:.2f} s (up: {up['shutdown_s']:.2f} s)")
    assert statistics.median(slow) <= 2 * statistics.median(base) + 0.001
    assert max(slow) < 1.0  # no call ever waits for an export attempt (timeouts are 2 s)
    assert len(slow) >= 0.5 * len(base)
    assert down["shutdown_s"] < 30.0


def _accepted_spans(url: str) -> float:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for match in re.finditer(r"^otelcol_receiver_accepted_spans(?:_total)?\{[^}]*\} ([0-9.e+]+)$", text, re.M):
        total += float(match.group(1))
    return total


def test_collector_restart_mid_run(redis_server):
    """The collector stops and comes back while the app runs: calls are not slowed, export resumes."""
    stack, ports = _collector(redis_server)
    metrics_url = f"http://127.0.0.1:{ports.collector_telemetry}/metrics"
    stack.start()
    try:
        env = _export_env(stack)
        proc = subprocess.Popen([sys.executable, str(APP), "load", redis_server.url(), "9"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: _accepted_spans(metrics_url) > 0, 20.0, "collector receives the app's spans", 0.1)
            stopped_at = time.time()
            stack.stop_component("collector")
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=2.5)  # the app keeps running with the collector gone
            restarted_at = time.time()
            stack.start_component("collector")
            wait_for(lambda: _accepted_spans(metrics_url) > 0, 20.0, "export resumes after the restart", 0.1)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        stack.stop()
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    before = _latencies(result["calls"], end=stopped_at)
    during = _latencies(result["calls"], stopped_at, restarted_at)
    after = _latencies(result["calls"], restarted_at)
    assert before and during and after
    print(f"\ncollector restart: p50 before {statistics.median(before) * 1e3:.3f} ms, down "
          f"{statistics.median(during) * 1e3:.3f} ms, after {statistics.median(after) * 1e3:.3f} ms; "
          f"max {max(max(before), max(during), max(after)) * 1e3:.1f} ms")
    assert statistics.median(during) <= 2 * statistics.median(before) + 0.001
    assert max(during) < 1.0 and max(after) < 1.0
    assert result["shutdown_s"] < 30.0


# -- a failure storm ---------------------------------------------------------------------------


ANALYSIS_COMMANDS = ("pttl", "scan", "zrange")


def test_failure_storm_rate_limit_holds(r, redis_server, production_boundary, monkeypatch):
    """10,000 misses a second for two seconds: analyses stay within burst + rate x time, measured on
    the server with commandstats; the app's calls all return None as they would undecorated."""
    import logging

    monkeypatch.setattr(logging.getLogger(names.LOGGER_NAME), "level", logging.ERROR)
    rate, burst = 20.0, 40
    set_config(SubflowConfig(analysis_rate_per_s=rate, analysis_burst=burst))

    def cached_read(redis: redis.Redis, run_id: str, node_id: str) -> Any:
        return None  # the state is gone; the app's own read costs no Redis call here

    decorated = instrument_state_get()(cached_read)
    app = redis_server.client()
    observer = redis_server.client()
    app.ping()
    before = commandstats(observer)
    started = time.perf_counter()
    sent = 0
    target_per_s, seconds = 10_000, 2.0
    while (elapsed := time.perf_counter() - started) < seconds:
        due = int(elapsed * target_per_s) + 1
        while sent < due:
            assert decorated(app, f"storm-{sent % 50}", f"n{sent}") is None
            sent += 1
    elapsed = time.perf_counter() - started
    assert flush_journals(30.0)
    delta = commandstats_delta(before, commandstats(observer))
    ceiling = burst + rate * elapsed + 1
    analyses = delta.get("pttl", 0)
    print(f"\nstorm: {sent} misses in {elapsed:.2f} s ({sent / elapsed:,.0f}/s); analyses {analyses} "
          f"(ceiling {ceiling:.0f}); Redis commands {delta}")
    assert sent / elapsed >= 2_000, "the storm itself was too slow to mean anything"
    assert 0 < analyses <= ceiling
    scripts = delta.get("evalsha", 0) + delta.get("eval", 0)  # each script call runs one ZRANGE too
    for command in ANALYSIS_COMMANDS:
        assert delta.get(command, 0) <= analyses + (scripts if command == "zrange" else 0), (command, delta)
    # INFO: one per analysis, and at most one a second inside the journal's script.
    assert delta.get("info", 0) <= analyses + elapsed + 2, delta
    analysis_load = sum(delta.get(c, 0) for c in ANALYSIS_COMMANDS) - scripts
    assert analysis_load <= len(ANALYSIS_COMMANDS) * ceiling
    # The journal writes the analysed misses one by one (their run's stream, the global one, and
    # the race-marker script) and only counts the rate-limited ones, in one record per flush.
    journal = journal_for(app, get_config())
    assert journal is not None
    stats = journal.stats()
    assert stats.misses_suppressed == sent - analyses
    assert stats.dropped == 0
    assert delta.get("evalsha", 0) + delta.get("eval", 0) == stats.flushes  # one script call per flush
    assert stats.written == stats.queued == analyses + (stats.queued - analyses)
    assert stats.queued - analyses <= stats.flushes  # plus one counting record per flush at most
    app.close()
    observer.close()


#: Redis commands one analysed miss may cost: the analysis (PTTL, SCAN, ZRANGE, HMGET, HGET of the
#: run in each of at most 2 buckets, INFO) and, inside the journal's script, its record (HGET of the
#: run in 2 buckets for the race check, HGET + HSET of the marker and HINCRBY of its count, HGET +
#: HSET of the run's field).
PER_ANALYSED_MISS = 16
#: Commands the journal's script runs once per call, whatever the batch (TIME, HMGET, INFO, ZRANGE,
#: HGET of each bucket's size, HSETNX of writers, the global copy, counters, size updates).
PER_FLUSH = 16


def test_failure_storm_total_added_load_within_ceiling(r, redis_server, production_boundary, monkeypatch):
    """All Redis commands we add during a storm, journal included, stay within a configured ceiling."""
    import logging

    monkeypatch.setattr(logging.getLogger(names.LOGGER_NAME), "level", logging.ERROR)
    rate, burst = 20.0, 40
    set_config(SubflowConfig(analysis_rate_per_s=rate, analysis_burst=burst))
    decorated = instrument_state_get()(lambda redis, run_id, node_id: None)
    app = redis_server.client()
    observer = redis_server.client()
    before = commandstats(observer)
    started = time.perf_counter()
    for n in range(5_000):
        decorated(app, "storm-total", f"n{n}")
    elapsed = time.perf_counter() - started
    assert flush_journals(30.0)
    delta = commandstats_delta(before, commandstats(observer))
    journal = journal_for(app, get_config())
    assert journal is not None
    flushes = journal.stats().flushes
    # Connection set-up (HELLO, CLIENT ID, INFO) once, then a bounded cost per analysed miss, and
    # one script call per flush: nothing scales with the storm.
    ceiling = 5 + PER_ANALYSED_MISS * (burst + rate * elapsed + 1) + PER_FLUSH * flushes
    assert sum(delta.values()) <= ceiling, (sum(delta.values()), ceiling, delta)
    assert journal.stats().misses_suppressed >= 5_000 - (burst + rate * elapsed + 1)


# -- fork() after configure() --------------------------------------------------------------------


def test_fork_after_configure(redis_server, tmp_path):
    """A forked child journals and exports its own work; nothing queued before the fork is written twice."""
    spans_file = tmp_path / "spans.jsonl"
    result = _run_app(_app_env(), "fork", redis_server.url(), "fork-run", str(spans_file))
    assert result["child_exit"] == 0 and result["parent_flushed"]
    parent, child = result["parent_pid"], result["child_pid"]
    exported = [json.loads(line) for line in spans_file.read_text().splitlines()]
    span_ids = [s["context"]["span_id"] for s in exported]
    assert len(span_ids) == len(set(span_ids)), "a span was exported twice"
    by = collections.Counter((s["name"], s["attributes"][names.ATTR_NODE_ID].split("-")[0], s["exported_by_pid"])
                             for s in exported)
    assert by == {
        (names.SPAN_STATE_INIT, "parent", parent): 5,
        (names.SPAN_STATE_INIT, "child", child): 5,
        (names.SPAN_STATE_GET, "child", child): 1,
    }
    client = redis_server.client(decode_responses=True)
    entries = [e.fields for e in store.read_run(client, "fork-run")]
    client.close()
    inits = collections.Counter((f["node_id"].split("-")[0], int(f["pid"])) for f in entries if f["op"] == "init")
    assert inits == {("parent", parent): 5, ("child", child): 5}
    assert len({f["span_id"] for f in entries}) == len(entries), "a journal record was written twice"


def test_fork_child_spans_carry_the_child_pid(redis_server, tmp_path):
    """The resource attribute process.pid of a forked child's spans names the child."""
    spans_file = tmp_path / "spans.jsonl"
    result = _run_app(_app_env(), "fork", redis_server.url(), "fork-pid-run", str(spans_file))
    exported = [json.loads(line) for line in spans_file.read_text().splitlines()]
    pids = {(s["exported_by_pid"], s["resource"]["attributes"][names.RES_PROCESS_PID]) for s in exported}
    assert pids == {(result["parent_pid"], result["parent_pid"]), (result["child_pid"], result["child_pid"])}


# -- bad input ---------------------------------------------------------------------------------------

GLOB = "*?[]\\^-{}:"
text_ids = st.text(alphabet=st.characters(blacklist_categories=("Cs",))
                   | st.sampled_from([*GLOB, "\n", "\r", "\t", " ", "\ud800", "\udcff"]),  # + lone surrogates
                   max_size=40)
weird_ids = st.one_of(
    text_ids,
    st.text(alphabet=GLOB + "\n", min_size=1, max_size=20),
    st.integers(min_value=10_000, max_value=12_000).map(lambda n: "x" * n),  # ~10 kB strings
    st.binary(max_size=40),
    st.integers(),
    st.none(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run_id=weird_ids, node_id=weird_ids)
def test_bad_ids_never_break_the_call(r, production_boundary, run_id, node_id):
    """Ids with glob characters, newlines, 10 kB, bytes, ints or None: init, hit and analysed miss all
    return exactly what the undecorated service returns."""
    set_config(SubflowConfig(analysis_rate_per_s=1e6, analysis_burst=1_000_000))
    same_as_twin(raw_init, initialize_state, r, run_id, node_id, "v")
    assert same_as_twin(raw_get, get_state, r, run_id, node_id)[1] == b"v"
    absent = f"{node_id}-absent" if not isinstance(node_id, bytes) else node_id + b"-absent"
    assert same_as_twin(raw_get, get_state, r, run_id, absent)[1] is None
    assert flush_journals(5.0)


def test_ids_utf8_cannot_encode_do_not_poison_the_journal(r, production_boundary, spans):
    """A run id holding a lone surrogate (surrogateescape-decoded input) is escaped once, at the
    call: its own record is written and the other records of the same batch are not dropped."""
    set_config(SubflowConfig(journal_flush_interval_s=30.0, journal_batch_size=10_000))

    def stored(redis: redis.Redis, run_id: Any, node_id: Any, ttl_ms: int = 60_000) -> bool:
        return True  # the service keys its state some other way: our ids are only ours

    init = instrument_state_init()(stored)
    for n in range(3):
        assert init(r, f"good-{n}", "n") is True
    assert init(r, "bad-\udcff", "n\ud800") is True
    assert init(r, "good-3", "n") is True
    assert flush_journals(5.0)
    journal = journal_for(r, get_config())
    assert journal is not None
    stats = journal.stats()
    assert (stats.dropped, stats.failed_flushes, stats.written) == (0, 0, 5)
    entries = store.read_run(r, "bad-\\udcff")
    assert [(e.fields["run_id"], e.fields["node_id"]) for e in entries] == [("bad-\\udcff", "n\\ud800")]
    bad = [s for s in spans() if s.attributes.get(names.ATTR_RUN_ID, "").startswith("bad-")]
    assert bad[0].attributes[names.ATTR_RUN_ID] == "bad-\\udcff"


BAD_TEMPLATES = [
    "subflow:state:{run_id}:{missing}",  # a field that is no parameter
    "subflow:state:{0}:{1}",  # positional fields
    "subflow:state:{run_id",  # unbalanced
    "subflow:state:{}",  # empty field
    "subflow:{run_id.nope}:{node_id}",  # attribute that fails at call time
    "subflow:{run_id[3]}:{node_id!z}",  # index on short ids, bad conversion
]


@pytest.mark.parametrize("template", BAD_TEMPLATES)
def test_bad_key_templates_warn_and_the_call_still_works(template, r, production_boundary):
    """A template that cannot work warns at decoration (or leaves the key out at call time); the
    decorated call returns what the undecorated one does, hit and miss."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get = instrument_state_get(key=template)(raw_get)
        init = instrument_state_init(key=template)(raw_init)
    warned = [w for w in caught if issubclass(w.category, SubflowInstrumentationWarning)]
    for w in warned:
        assert "otel-subflow" in str(w.message) and "raw_" in str(w.message)
    same_as_twin(raw_init, init, r, "ab", "n1", "v")
    assert same_as_twin(raw_get, get, r, "ab", "n1")[1] == b"v"
    assert same_as_twin(raw_get, get, r, "ab", "absent")[1] is None
    assert key_pattern(template).pattern  # the watcher's parser takes it too


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=st.text(alphabet=st.sampled_from(list("{}[]!:.0123run_idnode_x\\ ")), max_size=30))
def test_any_key_template_warns_or_works(template, production_boundary):
    """Arbitrary templates: decoration warns or succeeds, the call returns its value, the watcher's
    key parser compiles. (atheris drives the same target in tests/faults/fuzz_key_template.py.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SubflowInstrumentationWarning)
        get = instrument_state_get(key=template)(lambda redis, run_id, node_id: "value")
    assert get(None, "r-1", "n-1") == "value"
    assert key_pattern(template).pattern is not None


def test_atheris_fuzzes_the_key_template_parser():
    """A short atheris run over decoration, call and the watcher's parser (atheris is in the test extras
    on Linux x86_64; hypothesis covers the same target above elsewhere)."""
    try:
        import atheris  # noqa: F401 - only checking that it is installed
    except ImportError:
        service_missing("atheris is not installed (pip install -e '.[test]' on Linux x86_64)")
    env = dict(os.environ, OTEL_SUBFLOW_RAISE_INTERNAL_ERRORS="1")
    proc = subprocess.run([sys.executable, str(FUZZ), "-runs=4000", "-seed=7"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Done 4000 runs" in proc.stderr


# -- secrets ------------------------------------------------------------------------------------------

PASSWORD = "pw-Zq8-s3cr3t-in-url"
VENDOR_KEY = "vendor-key-7f3e-DO-NOT-LEAK"


def _scan(texts: dict[str, str]) -> list[str]:
    return [where for where, text in texts.items() if PASSWORD in text or VENDOR_KEY in text]


def test_secrets_never_reach_spans_logs_files_or_cli_output(tmp_path):
    """A password in the Redis URL and a vendor API key in the environment: every exported span, log
    record, metric, journal entry, file written and CLI output is scanned, and neither is found."""
    with RedisServer(password=PASSWORD) as server:
        url = server.url()
        env = _app_env(OTEL_SUBFLOW_VENDOR_API_KEY=VENDOR_KEY,
                       OTEL_EXPORTER_OTLP_HEADERS=f"authorization=Bearer {VENDOR_KEY}",
                       OTEL_SUBFLOW_REDIS_URL=url)
        app_dir = tmp_path / "app"
        app_dir.mkdir()
        _run_app(env, "secrets", url, "secret-run", str(app_dir))
        cli_dir = tmp_path / "cli"
        cli_dir.mkdir()
        outputs: dict[str, str] = {}
        cli = [str(Path(sys.executable).parent / "otel-subflow")]
        commands = {
            "health": ["diagnose", "--redis-url", url, "--redis-health", "--memory-analysis",
                       "--sample-interval", "0", "--samples", "2"],
            "missing": ["diagnose", "--missing-state", "--run-id", "secret-run", "--node-id", "never-written"],
            "missing-json": ["diagnose", "--json", "--missing-state", "--run-id", "secret-run",
                             "--node-id", "never-written"],
            "race": ["diagnose", "--race-conditions", "--run-id", "secret-run"],
            "recent": ["diagnose", "--recent-operations"],
            "export": ["diagnose", "--export-traces", "--output-dir", str(cli_dir)],
            "monitor": ["monitor", "--interval", "0.2", "--duration", "1", "--export-alerts", "--output-dir",
                        str(cli_dir), "--latency-threshold-ms", "0", "--state-failures-per-min", "0"],
            "monitor-json": ["monitor", "--json", "--interval", "0.2", "--duration", "0.5", "--no-watcher"],
            "wrong-password": ["diagnose", "--redis-url", url.replace(PASSWORD, PASSWORD + "x"), "--redis-health",
                               "--timeout", "1"],
            "dead-port": ["diagnose", "--redis-url", f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0",
                          "--redis-health", "--timeout", "0.5"],
        }
        for name, args in commands.items():
            proc = subprocess.run(cli + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                                  check=False)
            outputs[f"cli {name} stdout"] = proc.stdout
            outputs[f"cli {name} stderr"] = proc.stderr
        for failing in ("wrong-password", "dead-port"):  # the URL is named in the error, masked
            assert ":***@127.0.0.1" in outputs[f"cli {failing} stderr"], outputs[f"cli {failing} stderr"]
            assert "Traceback" not in outputs[f"cli {failing} stderr"]
        assert "never_written" in outputs["cli missing stdout"]
        check = server.client(decode_responses=True)
        journal = store.read_recent(check, 1000) + store.read_run(check, "secret-run")
        check.close()
    files = {str(p.relative_to(tmp_path)): p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()}
    assert {"app/spans.jsonl", "app/otel-logs.jsonl", "app/app.log", "app/metrics.json"} <= set(files)
    assert any(name.startswith("cli/subflow_diagnostics_") for name in files), sorted(files)
    assert any(name.startswith("cli/subflow_monitoring_") for name in files), sorted(files)
    spans = [json.loads(line) for line in files["app/spans.jsonl"].splitlines()]
    assert {s["name"] for s in spans} >= {names.SPAN_STATE_GET, names.SPAN_STATE_INIT}
    assert "MISSING_STATE_ANALYSIS" in files["app/otel-logs.jsonl"]
    assert "CRITICAL_STATE_ISSUE" in files["app/app.log"]
    assert len(journal) > 0
    everything = {**files, **outputs, "journal": json.dumps([dataclasses.asdict(e) for e in journal])}
    assert _scan(everything) == []
