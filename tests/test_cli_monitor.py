"""``otel-subflow monitor``: sessions, every alert rule at its threshold, signals, Redis dying mid-session."""

from __future__ import annotations

import itertools
import json
import logging
import os
import pty
import re
import select
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from otel_subflow import flush_journals, names
from otel_subflow._journal import store
from otel_subflow.cli._session import SCHEMA
from otel_subflow.cli._trends import sparkline
from otel_subflow.cli.monitor import ALERTS_FILE
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import CLI, invoke, invoke_json, run_cli, spawn_cli, wait_for
from tests.service import get_state


def summary_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("subflow_monitoring_summary_*.json"))


def read_alerts(directory: Path) -> list[dict[str, Any]]:
    path = directory / ALERTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def alerts_of(directory: Path, rule: str) -> list[tuple[str, Any]]:
    return [(a["status"], a["value"]) for a in read_alerts(directory) if a["rule"] == rule]


class Session:
    """A monitor running as a real process; its stdout lines are collected by a reader thread."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.proc = spawn_cli("monitor", *args, cwd=cwd)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout_s: float = 15.0, after: int = 0) -> int:
        """Index of the first line (from ``after``) matching ``pattern``."""
        regex = re.compile(pattern)

        def found() -> int | None:
            for index in range(after, len(self.lines)):
                if regex.search(self.lines[index]):
                    return index + 1  # truthy even for line 0
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"monitor exited ({self.proc.returncode}): {self.lines} {self.stderr()}")
            return None

        return int(wait_for(found, timeout_s)) - 1

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        self._reader.join(5)
        return code

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def sessions() -> Iterator[Callable[..., Session]]:
    started: list[Session] = []

    def start(*args: str, cwd: Path) -> Session:
        session = Session(*args, cwd=cwd)
        started.append(session)
        return session

    yield start
    for session in started:
        session.kill()


# -- sessions ---------------------------------------------------------------------------


def test_short_session_writes_the_summary_and_exits_0(r: redis.Redis, redis_server: RedisServer,
                                                      tmp_path: Path) -> None:
    """--duration ends the session: one JSON document on stdout, the same summary in a 0600 file."""
    started = time.monotonic()
    summary = invoke_json("monitor", "--interval", "0.2", "--duration", "1", "--output-dir", str(tmp_path),
                          "--redis-url", redis_server.url())
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 4.0
    assert summary["schema"] == SCHEMA
    assert summary["stopped_by"] == "duration"
    assert 4 <= summary["ticks"] <= 6 and summary["ticks_ok"] == summary["ticks"] and summary["ticks_failed"] == 0
    assert summary["alerts_total"] == 0 and summary["active_alerts"] == []
    assert set(summary["alerts_by_rule"]) == {
        names.ALERT_RULE_CONNECTION, names.ALERT_RULE_LATENCY, names.ALERT_RULE_MEMORY,
        names.ALERT_RULE_STATE_FAILURES, names.ALERT_RULE_EVICTIONS}
    latency = summary["figures"]["latency_ms"]
    assert latency["samples"] == summary["ticks"]
    assert 0 < latency["min"] <= latency["avg"] <= latency["max"]
    assert summary["figures"]["memory_pct"]["samples"] == 0  # no maxmemory: no percentage
    assert summary["figures"]["state_failures_per_min"]["max"] == 0
    assert summary["watcher"]["enabled"] is True
    assert summary["watcher"]["state"] == names.WATCHER_RUNNING and summary["watcher"]["subscribed"] is True
    assert summary["watcher"]["errors"] == 0 and summary["watcher"]["reason"] is None
    assert [change["state"] for change in summary["watcher"]["changes"]] == [names.WATCHER_RUNNING]
    assert summary["thresholds"][names.ALERT_RULE_LATENCY]["threshold"] == 500.0
    (path,) = summary_files(tmp_path)
    assert re.fullmatch(r"subflow_monitoring_summary_\d{8}T\d{6}Z\.json", path.name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == summary
    assert summary["summary_file"] == str(path)
    assert not (tmp_path / ALERTS_FILE).exists()


def test_plain_lines_off_a_tty(r: redis.Redis, redis_server: RedisServer, tmp_path: Path) -> None:
    result = invoke("monitor", "--interval", "0.1", "--duration", "0.35", "--output-dir", str(tmp_path),
                    "--redis-url", redis_server.url())
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    ticks = [line for line in lines if " tick=" in line]
    assert len(ticks) >= 3
    assert re.match(r"\d{4}-\d\d-\d\dT\S+Z tick=1 status=ok latency_ms=[\d.]+ memory_pct=- "
                    r"state_failures_per_min=0 evictions_per_min=0 active_alerts=0$", ticks[0]), ticks[0]
    watcher_lines = [line for line in lines if " watcher=" in line]
    assert len(watcher_lines) == 1  # a line when the state changes, not one per check
    assert re.match(r"\d{4}-\d\d-\d\dT\S+Z watcher=running since=\S+Z$", watcher_lines[0]), watcher_lines
    assert lines[-1].startswith("summary: ") and "stopped by duration" in lines[-1]
    assert "; watcher running; " in lines[-1]


def test_live_view_on_a_tty(redis_server: RedisServer, tmp_path: Path) -> None:
    """On a terminal the monitor draws a rich live view with the figures and alerts."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm"}
    proc = subprocess.Popen([*CLI, "monitor", "--interval", "0.2", "--duration", "0.7", "--latency-threshold-ms",
                             "0", "--output-dir", str(tmp_path), "--redis-url", redis_server.url()],
                            stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.wait(10) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "otel-subflow monitor" in screen
    assert "Figures" in screen and "latency_ms" in screen
    assert "Trends (last " in screen and "ops/s" in screen and "GET p99 µs" in screen
    assert any(block in screen for block in "▁▂▃▄▅▆▇█")  # the sparklines
    assert f"Alerts (1 active: {names.ALERT_RULE_LATENCY})" in screen
    assert "keyspace watcher: running since" in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert "\x1b[" in screen  # drawn with terminal control sequences, not plain lines
    assert " tick=" not in screen
    assert "Session summary:" in screen
    assert len(summary_files(tmp_path)) == 1


def test_a_live_session_records_a_burst_mid_session(r: redis.Redis, redis_server: RedisServer, tmp_path: Path,
                                                    sessions: Callable[..., Session]) -> None:
    """A real monitor process: a burst of reads after its 2nd check shows in the summary file's series, with
    nothing before it and the whole burst counted once."""
    session = sessions("--interval", "0.1", "--redis-url", redis_server.url(), cwd=tmp_path)
    session.wait_line(r"tick=2 status=ok")
    for i in range(7):
        assert get_state(r, "run-live", f"n{i}") is None
    flush_journals()
    ops = [e.op for e in store.read_recent(r, 100)]
    assert ops.count("miss") == 7
    seen = session.wait_line(r"state_failures_per_min=7 ")
    session.wait_line(r"tick=\d+ status=ok", after=seen + 1)  # one check more
    assert session.stop() == 0
    (path,) = summary_files(tmp_path)
    trends: dict[str, Any] = json.loads(path.read_text())["trends"]
    series = trends["misses_by_cause"][names.CAUSE_NEVER_WRITTEN]
    assert series[:2] == [None, 0]
    assert sum(v for v in series if v) == 7
    burst = [i for i, v in enumerate(series) if v]
    assert burst == list(range(burst[0], burst[-1] + 1))  # one stretch of checks (a flush may span two)
    assert series[-1] == 0
    assert trends["misses"] == series
    line = sparkline(series)  # a blank for the baseline, the highest block where the most misses were
    top = max(v for v in series if v is not None)
    assert line[0] == " "
    assert [i for i, c in enumerate(line) if c == "█"] == [i for i, v in enumerate(series) if v == top]
    assert [c for c, v in zip(line, series, strict=True) if v == 0] == ["▁"] * series.count(0)


# -- alert rules at their thresholds ---------------------------------------------------------


def test_state_failures_fire_above_the_threshold_not_at_it(r: redis.Redis, redis_server: RedisServer,
                                                           tmp_path: Path) -> None:
    """12 misses journalled in the last minute: threshold 11 fires (value 12), threshold 12 stays quiet."""
    for i in range(12):
        assert get_state(r, "run-fail", f"n{i}") is None
    flush_journals()
    quiet, loud = tmp_path / "quiet", tmp_path / "loud"
    for directory, threshold in ((quiet, "12"), (loud, "11")):
        summary = invoke_json("monitor", "--interval", "0.2", "--duration", "0.3", "--export-alerts",
                              "--state-failures-per-min", threshold, "--output-dir", str(directory),
                              "--redis-url", redis_server.url())
        assert summary["figures"]["state_failures_per_min"]["max"] == 12
    assert read_alerts(quiet) == []
    (alert,) = read_alerts(loud)
    assert alert["rule"] == names.ALERT_RULE_STATE_FAILURES
    assert (alert["status"], alert["severity"], alert["value"], alert["threshold"]) == ("firing", "critical", 12, 11)


def test_state_failures_count_rate_limited_misses_too(r: redis.Redis, redis_server: RedisServer,
                                                      tmp_path: Path) -> None:
    """In a storm only a few misses are journalled one by one; the counted rest still reach the figure."""
    from otel_subflow import SubflowConfig
    from otel_subflow._config import set_config

    set_config(SubflowConfig(analysis_rate_per_s=0.001, analysis_burst=2))
    for i in range(12):
        assert get_state(r, "run-storm", f"n{i}") is None
    flush_journals()
    ops = [e.op for e in store.read_recent(r, 1000)]
    assert ops.count("miss") == 2 and "misses_suppressed" in ops
    summary = invoke_json("monitor", "--interval", "0.2", "--duration", "0.3", "--output-dir", str(tmp_path),
                          "--redis-url", redis_server.url())
    assert summary["figures"]["state_failures_per_min"]["max"] == 12


def test_memory_fires_above_its_threshold_only() -> None:
    """used_memory / maxmemory against --memory-threshold-pct, measured on a server with maxmemory."""
    with RedisServer(maxmemory="4mb", maxmemory_policy="noeviction") as server:
        client = server.client()
        client.set("ballast", b"x" * 1_000_000)
        info = client.info("memory")
        pct = info["used_memory"] / info["maxmemory"] * 100
        results = {}
        for threshold in (pct - 10, pct + 10):
            summary = invoke_json("monitor", "--interval", "0.2", "--duration", "0.3", "--memory-threshold-pct",
                                  f"{threshold:.2f}", "--redis-url", server.url(), "--no-watcher",
                                  "--output-dir", str(server.workdir))
            results[threshold] = summary
        client.close()
    above, below = results[pct - 10], results[pct + 10]
    assert above["alerts_by_rule"][names.ALERT_RULE_MEMORY]["firing"] == 1
    assert above["figures"]["memory_pct"]["max"] == pytest.approx(pct, abs=5)  # + client buffers
    assert below["alerts_by_rule"][names.ALERT_RULE_MEMORY]["firing"] == 0
    assert below["alerts_total"] == 0


def test_latency_fires_above_its_threshold_only(tmp_path: Path, sessions: Callable[..., Session]) -> None:
    """A DEBUG SLEEP blocks the server: PINGs take > 1 s; threshold 800 ms fires, 10 s does not."""
    with RedisServer(extra_args=["--enable-debug-command", "yes"]) as server:
        loud = sessions("--interval", "0.1", "--ping-samples", "1", "--export-alerts", "--latency-threshold-ms",
                        "800", "--output-dir", str(tmp_path / "loud"), "--redis-url", server.url(), cwd=tmp_path)
        quiet = sessions("--interval", "0.1", "--ping-samples", "1", "--export-alerts", "--latency-threshold-ms",
                         "10000", "--output-dir", str(tmp_path / "quiet"), "--redis-url", server.url(),
                         cwd=tmp_path)
        loud.wait_line(r"tick=1 status=ok")
        quiet.wait_line(r"tick=1 status=ok")
        blocker = server.client()
        blocker.execute_command("DEBUG", "SLEEP", "1.5")
        blocker.close()
        loud.wait_line(r"ALERT FIRING warning redis_latency")
        quiet.wait_line(r"tick=\d+ status=ok latency_ms=(1[0-9]{3}|[2-9][0-9]{3})(\.\d+)? ")
        assert loud.stop() == 0 and quiet.stop() == 0
    (status, value), *rest = alerts_of(tmp_path / "loud", names.ALERT_RULE_LATENCY)
    assert status == "firing" and value > 800
    assert "resolved" in [s for s, _ in rest]  # the next fast PING clears it
    assert read_alerts(tmp_path / "quiet") == []


def test_evictions_fire_with_the_exact_count(tmp_path: Path, sessions: Callable[..., Session]) -> None:
    """Keys evicted during the session: the figure counts exactly the evicted_keys delta, > 50 fires."""
    with RedisServer(maxmemory="2mb", maxmemory_policy="volatile-lru") as server:
        client = server.client()
        loud = sessions("--interval", "0.1", "--export-alerts", "--output-dir", str(tmp_path / "loud"),
                        "--redis-url", server.url(), "--no-watcher", cwd=tmp_path)
        quiet = sessions("--interval", "0.1", "--export-alerts", "--evictions-per-min", "100000",
                         "--output-dir", str(tmp_path / "quiet"), "--redis-url", server.url(), "--no-watcher",
                         cwd=tmp_path)
        loud.wait_line(r"tick=1 status=ok")
        quiet.wait_line(r"tick=1 status=ok")
        before = int(client.info("stats")["evicted_keys"])
        pipe = client.pipeline(transaction=False)
        for i in range(600):
            pipe.set(f"filler:{i}", b"x" * 8192, ex=600)
        pipe.execute()
        evicted = int(client.info("stats")["evicted_keys"]) - before
        assert evicted > 50
        loud.wait_line(r"ALERT FIRING critical key_evictions")
        loud.wait_line(rf"evictions_per_min={evicted} ")
        quiet.wait_line(rf"evictions_per_min={evicted} ")
        assert loud.stop() == 0 and quiet.stop() == 0
        client.close()
    ((status, value),) = alerts_of(tmp_path / "loud", names.ALERT_RULE_EVICTIONS)
    assert status == "firing" and 50 < value <= evicted  # fired at the first check above 50
    assert alerts_of(tmp_path / "quiet", names.ALERT_RULE_EVICTIONS) == []
    assert alerts_of(tmp_path / "quiet", names.ALERT_RULE_MEMORY)[0][0] == "firing"  # full, as expected


def test_no_duplicate_storm_and_alert_side_channels(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    metric_points: Callable[[str], list[Any]],
) -> None:
    """A condition that holds all session: one firing, repeats at --repeat-every, each as a log record + metric."""
    def count() -> int:
        return sum(p.value for p in metric_points(names.METRIC_MONITOR_ALERTS)
                   if p.attributes.get(names.ATTR_ALERT_RULE) == names.ALERT_RULE_LATENCY)

    before = count()
    caplog.set_level(logging.INFO, logger=names.LOGGER_NAME)
    summary = invoke_json("monitor", "--interval", "0.05", "--duration", "1.3", "--repeat-every", "0.5",
                          "--latency-threshold-ms", "0", "--export-alerts", "--output-dir", str(tmp_path),
                          "--redis-url", redis_server.url())
    assert summary["ticks"] >= 15
    statuses = [status for status, _ in alerts_of(tmp_path, names.ALERT_RULE_LATENCY)]
    assert statuses == ["firing", "repeat", "repeat"]
    assert summary["alerts_by_rule"][names.ALERT_RULE_LATENCY] == {"firing": 1, "repeat": 2, "resolved": 0}
    assert summary["active_alerts"] == [names.ALERT_RULE_LATENCY]
    records = [rec for rec in caplog.records if rec.getMessage() == names.LOG_CRITICAL_STATE_ISSUE]
    assert len(records) == 3
    assert all(rec.levelno == logging.ERROR for rec in records)
    assert getattr(records[0], names.ATTR_ALERT_RULE) == names.ALERT_RULE_LATENCY
    assert getattr(records[0], names.ATTR_ALERT_STATUS) == "firing"
    assert getattr(records[0], names.ATTR_ALERT_THRESHOLD) == 0.0
    assert count() - before == 3
    alert = read_alerts(tmp_path)[0]
    assert set(alert) == {"time", "rule", "severity", "status", "value", "threshold", "unit", "message", "redis_url"}


# -- the keyspace watcher during a session -----------------------------------------------


def test_watcher_journals_tombstones_during_the_session(r: redis.Redis, redis_server: RedisServer,
                                                        tmp_path: Path) -> None:
    """While the monitor runs, an expiring state key gets an 'expired' tombstone in its run's journal."""
    done: list[str] = []

    def expire_a_key() -> None:
        wait_for(lambda: int(r.execute_command("PUBSUB", "NUMPAT")) >= 3, 10)
        r.set("subflow:state:run-w:n1", "x", px=30)
        wait_for(lambda: r.exists("subflow:state:run-w:n1") == 0, 5)
        done.append("expired")

    thread = threading.Thread(target=expire_a_key)
    thread.start()
    summary = invoke_json("monitor", "--interval", "0.2", "--duration", "2.5", "--output-dir", str(tmp_path),
                          "--redis-url", redis_server.url())
    thread.join(10)
    assert done == ["expired"]
    entries = store.read_run(r, "run-w")
    assert [(e.op, e.fields["node_id"], e.fields["source"]) for e in entries] == [
        ("expired", "n1", "keyspace_watcher")]
    assert summary["watcher"]["enabled"] is True and summary["watcher"]["tombstones"] == 1


def test_watcher_off_when_keyspace_events_are_off(tmp_path: Path) -> None:
    """Flags missing: the monitor warns and goes on without the watcher; --enable-keyspace-events fixes it."""
    with RedisServer(notify_keyspace_events="") as server:
        result = invoke("monitor", "--interval", "0.1", "--duration", "0.1", "--output-dir", str(tmp_path),
                        "--redis-url", server.url())
        assert result.exit_code == 0
        assert "keyspace watcher not started" in result.stderr and "Exeg" in result.stderr
        assert re.search(r" watcher=off reason=\".*lacks 'Exeg'", result.stdout), result.stdout
        assert "; watcher off (" in result.stdout.splitlines()[-1]
        summary = invoke_json("monitor", "--interval", "0.1", "--duration", "0.1", "--enable-keyspace-events",
                              "--output-dir", str(tmp_path), "--redis-url", server.url())
        assert summary["watcher"]["enabled"] is True and summary["watcher"]["state"] == names.WATCHER_RUNNING
        flags = server.client().config_get("notify-keyspace-events")["notify-keyspace-events"]
    assert set("Exeg") <= set(flags.decode() if isinstance(flags, bytes) else flags)


def test_watcher_refused_its_channels_shows_retrying(tmp_path: Path) -> None:
    """An ACL user without channel permission (NOPERM): the monitor does not call the watcher enabled
    with 0 events; it shows it retrying since when, with the error, in the lines, the summary line
    and the JSON; granted the channels, the next session shows it running. No password anywhere."""
    password = "s3cretWatcherPW-91"
    with RedisServer() as server:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "watcher", "on", f">{password}", "~*", "&foo*", "+@all")
        url = f"redis://watcher:{password}@{server.host}:{server.port}/0"
        result = invoke("monitor", "--interval", "0.2", "--duration", "0.6", "--output-dir", str(tmp_path / "plain"),
                        "--redis-url", url)
        assert result.exit_code == 0, result.stderr
        lines = result.stdout.splitlines()
        (line,) = [line for line in lines if " watcher=" in line]
        assert re.search(r" watcher=retrying since=\S+Z errors=\d+ error=\"NoPermissionError: this user has no "
                         r"permissions to access one of the channels", line), line
        assert "; watcher retrying (" in lines[-1] and "NoPermissionError" in lines[-1]

        summary = invoke_json("monitor", "--interval", "0.2", "--duration", "0.6", "--output-dir",
                              str(tmp_path / "json"), "--redis-url", url)
        watcher = summary["watcher"]
        assert watcher["enabled"] is True
        assert (watcher["state"], watcher["subscribed"]) == (names.WATCHER_RETRYING, False)
        assert watcher["last_error_type"] == "NoPermissionError" and watcher["errors"] >= 1
        assert watcher["errors_by_type"] == {"NoPermissionError": watcher["errors"]}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", watcher["last_error_at"])
        assert watcher["since"] <= watcher["last_error_at"]
        assert watcher["reason"].startswith("retrying since ") and "NoPermissionError" in watcher["reason"]
        assert watcher["events"] == 0 and watcher["tombstones"] == 0
        assert [change["state"] for change in watcher["changes"]] == [names.WATCHER_RETRYING]
        assert watcher["changes"][0]["error"].startswith("NoPermissionError: ")

        admin.execute_command("ACL", "SETUSER", "watcher", "allchannels")
        summary = invoke_json("monitor", "--interval", "0.2", "--duration", "0.3", "--output-dir",
                              str(tmp_path / "granted"), "--redis-url", url)
        assert (summary["watcher"]["state"], summary["watcher"]["subscribed"]) == (names.WATCHER_RUNNING, True)
        assert summary["watcher"]["errors"] == 0
        admin.close()
    written = result.stdout + result.stderr + "".join(p.read_text() for p in tmp_path.rglob("*.json"))
    assert password not in written


# -- signals and connection loss -----------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_the_summary_and_exits_0(redis_server: RedisServer, tmp_path: Path,
                                               sessions: Callable[..., Session], sig: int) -> None:
    session = sessions("--interval", "0.1", "--redis-url", redis_server.url(), cwd=tmp_path)
    session.wait_line(r"tick=2 status=ok")
    assert session.stop(sig) == 0
    assert "Traceback" not in session.stderr()
    (path,) = summary_files(tmp_path)  # --output-dir defaults to the current directory
    summary = json.loads(path.read_text())
    assert summary["stopped_by"] == signal.Signals(sig).name
    assert summary["ticks"] >= 2
    assert any(line.startswith("summary: ") for line in session.lines)


def test_redis_killed_and_restarted_mid_session(tmp_path: Path, sessions: Callable[..., Session]) -> None:
    """Connection alert on loss, backoff while down, resolved on recovery; the watcher resubscribes."""
    with RedisServer() as server:
        session = sessions("--interval", "0.2", "--export-alerts", "--timeout", "0.5", "--redis-url", server.url(),
                           cwd=tmp_path)
        session.wait_line(r"tick=2 status=ok")
        server.kill()
        session.wait_line(r"status=down error=.*cannot reach Redis")
        session.wait_line(r" watcher=retrying since=\S+Z errors=\d+ error=\"ConnectionError: ")
        fired = session.wait_line(r"ALERT FIRING critical redis_connection")
        wait_for(lambda: sum("status=down" in line for line in session.lines) >= 4, 15)  # keeps trying
        server.start()
        resolved = session.wait_line(r"ALERT RESOLVED critical redis_connection", after=fired)
        session.wait_line(r"tick=\d+ status=ok", after=resolved)
        session.wait_line(r" watcher=running since=", after=fired)
        client = server.client()
        wait_for(lambda: int(client.execute_command("PUBSUB", "NUMPAT")) >= 3, 15)  # watcher back
        client.close()
        assert session.stop() == 0
    statuses = alerts_of(tmp_path, names.ALERT_RULE_CONNECTION)
    assert statuses[0][0] == "firing" and statuses[-1][0] == "resolved"
    assert statuses[-1][1] == 0
    (path,) = summary_files(tmp_path)
    summary = json.loads(path.read_text())
    assert summary["ticks_failed"] >= 2
    (outage,) = summary["outages"]
    assert outage["to"] is not None and outage["failed_checks"] == summary["ticks_failed"]
    assert summary["active_alerts"] == []
    assert summary["watcher"]["reconnects"] >= 1 and summary["watcher"]["gaps"] >= 1
    assert summary["watcher"]["state"] == names.WATCHER_RUNNING
    assert summary["watcher"]["errors_by_type"].get("ConnectionError", 0) >= 1
    changes = [change["state"] for change in summary["watcher"]["changes"]]
    assert changes[:3] == [names.WATCHER_RUNNING, names.WATCHER_RETRYING, names.WATCHER_RUNNING], changes
    # Backoff: the failed checks while down come further and further apart (0.2 s, 0.4 s, 0.8 s...).
    down_stamps = [datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
                   for line in session.lines if "status=down" in line]
    assert len(down_stamps) == summary["ticks_failed"] >= 4
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(down_stamps)]
    assert gaps[0] == pytest.approx(0.2, abs=0.1) and gaps[1] == pytest.approx(0.4, abs=0.1)
    assert gaps[2] == pytest.approx(0.8, abs=0.15)


# -- OpenTelemetry export when configured ---------------------------------------------------


class _OtlpSink(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_alerts_exported_over_otlp_when_configured(redis_server: RedisServer, tmp_path: Path) -> None:
    """With OTEL_EXPORTER_OTLP_* set, the counter and the CRITICAL_STATE_ISSUE records leave over OTLP."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    _OtlpSink.received = []
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _OtlpSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_SERVICE_NAME": "monitor-under-test",
    }
    try:
        proc = run_cli("monitor", "--interval", "0.1", "--duration", "0.3", "--latency-threshold-ms", "0",
                       "--output-dir", str(tmp_path), "--redis-url", redis_server.url(), env=env)
    finally:
        sink.shutdown()
        sink.server_close()
    assert proc.returncode == 0, proc.stderr
    metric_points = []
    for path, body in _OtlpSink.received:
        if path != "/v1/metrics":
            continue
        request = ExportMetricsServiceRequest.FromString(body)
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == names.METRIC_MONITOR_ALERTS:
                        metric_points.extend(metric.sum.data_points)
    assert metric_points, _OtlpSink.received
    attrs = {kv.key: kv.value.string_value for kv in metric_points[-1].attributes}
    assert attrs == {names.ATTR_ALERT_RULE: names.ALERT_RULE_LATENCY, names.ATTR_ALERT_SEVERITY: "warning"}
    assert metric_points[-1].as_int == 1
    bodies = []
    for path, body in _OtlpSink.received:
        if path == "/v1/logs":
            request = ExportLogsServiceRequest.FromString(body)
            for rl in request.resource_logs:
                for sl in rl.scope_logs:
                    for record in sl.log_records:
                        attrs = {kv.key: kv.value for kv in record.attributes}
                        if names.ATTR_ALERT_RULE in attrs:  # the watcher's own records go there too
                            bodies.append((record.body.string_value, attrs[names.ATTR_ALERT_RULE].string_value))
    assert (names.LOG_CRITICAL_STATE_ISSUE, names.ALERT_RULE_LATENCY) in bodies


def test_connection_alert_waits_for_its_count_of_failures(tmp_path: Path, sessions: Callable[..., Session]) -> None:
    """--connection-failures 3: the first two failed checks are quiet, the third fires."""
    with RedisServer() as server:
        session = sessions("--interval", "0.1", "--connection-failures", "3", "--timeout", "0.5", "--no-watcher",
                           "--redis-url", server.url(), cwd=tmp_path)
        session.wait_line(r"tick=1 status=ok")
        server.kill()
        fired = session.wait_line(r"ALERT FIRING critical redis_connection value=3 threshold=3")
        assert session.stop() == 0
    before = session.lines[:fired]
    assert sum("status=down" in line for line in before) == 2
    assert not any("ALERT" in line for line in before)
