"""``make bench-scaling`` cannot rot: each subcommand's quick mode runs end to end on real processes.

The figures of docs/scaling.md are the benchmark's business; this test asserts that
each subcommand still measures them, and the parts that are exact on any machine:
command counts, round trips, the rate limit's ceiling, nothing lost at a low rate.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from otel_subflow import SubflowConfig
from otel_subflow.stack import StackError, find_binaries
from tests.conftest import service_missing

ROOT = Path(__file__).resolve().parent.parent


def run_quick(name: str, tmp_path: Path) -> dict[str, Any]:
    """``bench/scaling.py <name> --quick --json``: exit 0, the table printed; its figures."""
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scaling.py"), name, "--quick", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    document = json.loads(out.read_text())
    bench = document["benches"][name]
    assert document["machine"]["nproc"] >= 1 and document["machine"]["ram_gib"] > 0
    assert bench["command"] == f"PYTHONPATH=. python bench/scaling.py {name} --quick"
    for row in bench["rows"]:
        assert row["label"] in proc.stdout, row
    return bench


def finite(figures: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = figures[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)


@pytest.mark.slow
def test_journal_quick(tmp_path, redis_server):
    """Commands, batches and bytes per init are measured; the app's SETs are exactly the inits."""
    bench = run_quick("journal", tmp_path)
    figures, detail = bench["figures"], bench["detail"]
    finite(figures, "inits_per_s", "redis_commands_per_s", "evalsha_per_s", "commands_per_init",
           "journal_bytes_per_init", "journal_redis_cpu_ms_per_s", "steady_measured_to_budget", "history_s_at_1000")
    assert detail["commands"]["set"] == detail["inits"] > 0
    assert "xadd" not in detail["commands"]  # one script call per batch, no stream per run
    assert 0 < figures["commands_per_init"] < 2
    # one batch per flush interval (0.2 s) at 1,000 inits/s: a few a second, never one per init
    assert 1 <= figures["evalsha_per_s"] <= 20
    assert 20 < figures["journal_bytes_per_init"] < 1000
    # the budget is enforced: at steady state the measured bytes are within a bucket or two of it
    assert 0.5 < figures["steady_measured_to_budget"] < 1.5
    assert detail["steady_state"]["trimmed"] >= 2 and detail["steady_state"]["dropped"] == 0
    assert figures["retention_s"] == 1200


@pytest.mark.slow
def test_watcher_quick(tmp_path, redis_server):
    """At low rates every deleted state key becomes a tombstone, within milliseconds."""
    bench = run_quick("watcher", tmp_path)
    figures = bench["figures"]
    finite(figures, "sustained_events_per_s", "max_handled_per_s", "lag_p50_ms_low", "lag_p99_ms_low")
    assert figures["lost_normal"] == 0
    low = bench["detail"]["steps"][0]
    assert low["tombstones"] >= low["generated_per_s"] * bench["detail"]["seconds_per_step"] * 0.9
    assert low["journal_dropped"] == 0 and low["reconnects"] == 0
    assert 0 < figures["lag_p50_ms_low"] <= figures["lag_p99_ms_low"] < 500


@pytest.mark.slow
def test_analysis_quick(tmp_path, redis_server):
    """One round trip of seven commands per analysed miss; a storm analyses at most burst + rate x time."""
    bench = run_quick("analysis", tmp_path)
    figures = bench["figures"]
    assert figures["round_trips_per_miss"] == 1.0
    assert figures["analysis_commands_per_miss"] == 7.0
    assert bench["detail"]["typical"]["commands_per_miss"] == {
        "get": 1.0, "hget": 1.0, "hmget": 1.0, "info": 1.0, "pttl": 1.0, "scan": 1.0, "zrange": 1.0}
    assert 2.0 <= figures["fresh_round_trips_per_miss"] < 3.0  # the tombstone wait: one read more
    limited = bench["detail"]["rate_limit"]
    default = SubflowConfig()
    assert 0 < limited["storm_analysed"] <= limited["storm_ceiling"]
    # every miss is either analysed or suppressed, and each suppressed one is counted in the journal
    assert limited["storm_suppressed"] == limited["storm_misses"] - limited["storm_analysed"]
    assert limited["storm_suppressed_journal"] == limited["storm_suppressed_stats"] == limited["storm_suppressed"]
    assert 0 < limited["paced_analysed_per_s"] <= default.analysis_rate_per_s * 1.5 + 1
    finite(figures, "miss_p50_ms", "miss_p99_ms", "redis_commands_per_miss")


@pytest.mark.slow
@pytest.mark.e2e
def test_collector_quick(tmp_path, redis_server):
    """The built collectors run the bundled configs as processes (agent -> gateway -> Jaeger); CPU and RSS are read."""
    try:
        find_binaries(["collector", "jaeger"])
    except StackError as err:
        service_missing(str(err))
    bench = run_quick("collector", tmp_path)
    figures = bench["figures"]
    finite(figures, "collector_idle_rss_mb", "collector_cpu_cores_per_1000", "collector_rss_mb_top",
           "otlp_bytes_per_span")
    assert figures["collector_idle_rss_mb"] > 10 and figures["agent_rss_mb_idle"] > 10
    assert figures["collector_cpu_cores_per_1000"] > 0 and figures["agent_cpu_cores_per_1000"] > 0
    loaded = bench["detail"]["steps"][1]
    assert loaded["accepted_per_s"] > 0 and loaded["refused"] == 0
    assert 0 < figures["sampled_share"] < 1
    assert 100 < figures["otlp_bytes_per_span"] < 2000
