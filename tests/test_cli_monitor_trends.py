"""``otel-subflow monitor`` trends: the series per check, their sparklines in the live view, the summary's trends."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from rich.console import Console

from otel_subflow import flush_journals, names
from otel_subflow._journal import schema, store
from otel_subflow.cli._alerts import AlertTracker, default_rules
from otel_subflow.cli._common import open_redis
from otel_subflow.cli._sampler import NOT_READ, RATE_LIMITED, MissCauses, Sample, Sampler
from otel_subflow.cli._session import MonitorSession
from otel_subflow.cli._trends import BLOCKS, WINDOW, TrendHistory, sparkline
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import invoke_json, wait_for
from tests.service import get_state, initialize_state


@contextmanager
def monitor_session(server: RedisServer, timeout_s: float = 2.0) -> Iterator[MonitorSession]:
    """A monitor session in this process, checked by hand (``session.check()``): one check per interval."""
    with open_redis(server.url(), timeout_s) as (_config, target, journal):
        console = Console(file=io.StringIO(), width=120, color_system=None, force_terminal=False)
        yield MonitorSession(target, Sampler(target, journal, 1, window_s=60.0), AlertTracker(default_rules(), 300.0),
                             console, "quiet", 0.2, alerts_path=None)


def render(session: MonitorSession) -> str:
    """The live view as text, drawn by rich into a recording console."""
    console = Console(record=True, width=120, color_system=None, file=io.StringIO())
    console.print(session.output.view())
    return console.export_text()


def row(screen: str, label: str) -> list[str]:
    """The cells of the trends table's row ``label`` (the sparkline cell keeps its leading blanks)."""
    for line in screen[screen.index("Trends ("):].splitlines():
        cells = [cell[1:-1].rstrip() for cell in line.strip().strip("│").split("│")]
        if cells and cells[0].strip() == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{screen}")


def expire(r: redis.Redis, run_id: str, nodes: list[str]) -> None:
    """Inits with a 50 ms TTL, polled until Redis has expired them."""
    for node in nodes:
        initialize_state(r, run_id, node, "x", ttl_ms=50)
    flush_journals()
    wait_for(lambda: r.exists(*(f"subflow:state:{run_id}:{node}" for node in nodes)) == 0, 5)


# -- the series, check by check --------------------------------------------------------------------


def test_a_burst_of_one_cause_lands_in_its_interval(r: redis.Redis, redis_server: RedisServer) -> None:
    """5 never-written reads in the 2nd interval, 2 expired in the 3rd: each cause's series has them there only;
    the misses from before the session are the baseline, not a point."""
    for i in range(3):
        assert get_state(r, "run-before", f"n{i}") is None
    expire(r, "run-exp", ["e1", "e2"])
    flush_journals()
    with monitor_session(redis_server) as session:
        session.check()  # the baseline
        session.check()  # interval 1: quiet
        for i in range(5):
            assert get_state(r, "run-burst", f"n{i}") is None
        flush_journals()
        session.check()  # interval 2: the burst
        for node in ("e1", "e2"):
            assert get_state(r, "run-exp", node) is None
        flush_journals()
        session.check()  # interval 3: the expired ones
        session.check()  # interval 4: quiet
        trends = session.history.as_dict()
        screen = render(session)
    assert trends["misses_by_cause"] == {
        names.CAUSE_NEVER_WRITTEN: [None, 0, 5, 0, 0],
        names.CAUSE_EXPIRED: [None, 0, 0, 2, 0],
    }
    assert trends["misses"] == [None, 0, 5, 2, 0]
    assert trends["checks"] == 5 and trends["window"] == WINDOW and len(trends["times"]) == 5
    # The sparkline: a gap for the baseline, the highest block where the burst is, the lowest elsewhere.
    assert sparkline(trends["misses_by_cause"][names.CAUSE_NEVER_WRITTEN]) == " ▁█▁▁"
    assert sparkline(trends["misses"]) == " ▁█▄▁"  # 2 of 5: halfway up (level round(2 / 5 * 7) = 3)
    assert "Trends (last 5 of 60 checks)" in screen
    assert row(screen, f"misses {names.CAUSE_NEVER_WRITTEN}")[1:] == [" ▁█▁▁", "0", "5", "0"]
    assert row(screen, f"misses {names.CAUSE_EXPIRED}")[1:] == [" ▁▁█▁", "0", "2", "0"]
    assert row(screen, "misses")[1:] == [" ▁█▄▁", "0", "5", "0"]
    # The per-minute figure the alert watches rises with the burst and stays up (a sliding minute).
    assert trends["series"]["state_failures_per_min"] == [3, 3, 8, 10, 10]
    assert row(screen, "state_failures_per_min")[1] == "▁▁▆██"


def test_rate_limited_misses_have_their_own_row(r: redis.Redis, redis_server: RedisServer) -> None:
    """A storm past the analysis rate limit: the analysed misses by cause, the rest as rate_limited, in one interval."""
    from otel_subflow import SubflowConfig
    from otel_subflow._config import set_config

    set_config(SubflowConfig(analysis_rate_per_s=0.001, analysis_burst=2))
    with monitor_session(redis_server) as session:
        session.check()
        for i in range(6):
            assert get_state(r, "run-storm", f"n{i}") is None
        flush_journals()
        session.check()
        session.check()
        trends = session.history.as_dict()
        screen = render(session)
    assert trends["misses_by_cause"] == {names.CAUSE_NEVER_WRITTEN: [None, 2, 0], RATE_LIMITED: [None, 4, 0]}
    assert NOT_READ not in trends["misses_by_cause"]
    assert row(screen, f"misses {RATE_LIMITED}")[1:] == [" █▁", "0", "4", "0"]


def test_misses_read_ahead_of_the_counters_or_dropped_are_counted_once(r: redis.Redis) -> None:
    """Records written between the counters' read and the records' read count in that check, not again in the next;
    misses counted whose records the capped recent copy lost are not_read, not dropped from the total."""
    causes = MissCauses(r)
    stale = store.read_counts(r)
    assert causes.count(stale) is None  # the baseline
    for i in range(3):
        assert get_state(r, "run-ahead", f"n{i}") is None
    flush_journals()
    assert causes.count(stale) == {names.CAUSE_NEVER_WRITTEN: 3}  # as if written just after the counters' read
    assert causes.count(store.read_counts(r)) == {}  # the counters catch up: nothing new, nothing unread
    for i in range(2):
        assert get_state(r, "run-dropped", f"n{i}") is None
    flush_journals()
    for bucket in r.zrange(schema.INDEX_KEY, 0, -1):
        r.hdel(schema.bucket_key(schema.text(bucket)), schema.GLOBAL_FIELD)  # what the cap does to old records
    assert causes.count(store.read_counts(r)) == {NOT_READ: 2}


def test_ops_latency_and_time_per_call_come_from_the_server(r: redis.Redis, redis_server: RedisServer) -> None:
    """ops/s counts the commands run between checks; GET/SET µs/call is exactly commandstats' delta; the p99s are
    latencystats' own; a check with no GET/SET has no time per call (a gap, not a zero)."""
    with monitor_session(redis_server) as session:
        session.check()
        started = time.monotonic()
        session.check()
        before = redis_server.client().info("commandstats")
        pipe = r.pipeline(transaction=False)
        for i in range(200):
            pipe.set(f"k{i}", "v")
            pipe.get(f"k{i}")
        pipe.execute()
        after = redis_server.client().info("commandstats")
        session.check()
        elapsed = time.monotonic() - started
        latency = r.info("latencystats")
        trends = session.history.as_dict()["series"]
        screen = render(session)
    calls = sum(after[f"cmdstat_{c}"]["calls"] - before.get(f"cmdstat_{c}", {"calls": 0})["calls"]
                for c in ("get", "set"))
    usec = sum(after[f"cmdstat_{c}"]["usec"] - before.get(f"cmdstat_{c}", {"usec": 0})["usec"] for c in ("get", "set"))
    assert calls == 400
    assert trends["state_usec_per_call"] == [None, None, round(usec / calls, 2)]
    ops = trends["ops_per_s"]
    assert ops[0] is None and ops[1] is not None and ops[1] > 0
    # At least the workload's commands, over at most the time from before the 2nd check to after the 3rd
    # (+ 1 ms: the server's TIME is read to the millisecond).
    assert ops[2] >= 400 / (elapsed + 0.001)
    assert trends["latency_p99_us_get"][-1] == latency["latency_percentiles_usec_get"]["p99"]
    assert trends["latency_p99_us_set"][-1] == latency["latency_percentiles_usec_set"]["p99"]
    assert row(screen, "GET/SET µs/call")[1] == "  ▁"
    assert row(screen, "ops/s")[1][0] == " "
    for label in ("GET p99 µs", "SET p99 µs", "latency_ms", "memory_pct", "evictions_per_min"):
        row(screen, label)
    assert "p99: INFO latencystats, since the server's stats were reset" in " ".join(screen.split())


def test_a_failed_check_is_a_gap_in_every_series() -> None:
    """Redis killed between two checks: that check's point is a gap; the next one counts again."""
    with RedisServer() as server, monitor_session(server, timeout_s=0.5) as session:
        session.check()
        session.check()
        server.kill()
        assert session.check() is False
        server.start()
        wait_for(lambda: session.check(), 10)
        trends = session.history.as_dict()
    assert trends["misses"][2] is None and trends["series"]["latency_ms"][2] is None
    assert all(v is not None for v in trends["series"]["latency_ms"][:2] + trends["series"]["latency_ms"][3:])
    assert trends["series"]["ops_per_s"][-1] is None  # a restarted server: no rate across the restart


# -- bounded, and the sparkline itself ---------------------------------------------------------------


def _sample(misses: dict[str, int] | None) -> Sample:
    return Sample(1.0, 1.0, None, 0, 0, 0.0, 0.0, "run", ops_per_s=10.0, misses_by_cause=misses)


def test_the_history_keeps_only_its_window() -> None:
    """A long session: the last WINDOW checks and no more; a cause that left the window leaves the rows."""
    history = TrendHistory(window=3)
    history.add("t0", {"latency_ms": 9.0}, _sample({names.CAUSE_EVICTED: 4}))
    for i in range(1, 1000):
        history.add(f"t{i}", {"latency_ms": float(i)}, _sample({names.CAUSE_EXPIRED: i % 2}))
    trends = history.as_dict()
    assert len(history.checks) == 3 and trends["times"] == ["t997", "t998", "t999"]
    assert trends["series"]["latency_ms"] == [997.0, 998.0, 999.0]
    assert trends["misses_by_cause"] == {names.CAUSE_EXPIRED: [1, 0, 1]}


def test_sparkline_scales_to_the_window() -> None:
    """Min..max of the values map to the lowest..highest block; equal values sit low; None is a blank."""
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == BLOCKS
    assert sparkline([10, 80, 45]) == "▁█▅"
    assert sparkline([3, 3, 3]) == "▁▁▁"
    assert sparkline([None, 5, None, 0]) == " █ ▁"
    assert sparkline([None, None]) == "  "
    assert sparkline([]) == ""
    assert sparkline([0, 7, None], ascii_only=True) == "_# "


# -- the CLI: --json summary, the real process -----------------------------------------------------------


def test_summary_has_the_trends(r: redis.Redis, redis_server: RedisServer, tmp_path: Path) -> None:
    """--json: one point per check in every series; misses from before the session are not a point."""
    for i in range(4):
        assert get_state(r, "run-old", f"n{i}") is None
    flush_journals()
    summary = invoke_json("monitor", "--interval", "0.1", "--duration", "0.45", "--output-dir", str(tmp_path),
                          "--redis-url", redis_server.url())
    trends = summary["trends"]
    ticks = summary["ticks"]
    assert trends["window"] == WINDOW and trends["checks"] == ticks >= 3
    assert trends["times"] == sorted(trends["times"]) and len(trends["times"]) == ticks
    assert set(trends["series"]) == {
        "latency_ms", "memory_pct", "state_failures_per_min", "evictions_per_min", "ops_per_s",
        "latency_p99_us_get", "latency_p99_us_set", "state_usec_per_call"}
    assert all(len(values) == ticks for values in trends["series"].values())
    assert trends["series"]["state_failures_per_min"] == [4.0] * ticks
    assert trends["misses"] == [None] + [0] * (ticks - 1)
    assert trends["misses_by_cause"] == {}
    assert all(isinstance(v, float) and v > 0 for v in trends["series"]["latency_ms"])
    assert trends["series"]["ops_per_s"][0] is None and all(v > 0 for v in trends["series"]["ops_per_s"][1:])
