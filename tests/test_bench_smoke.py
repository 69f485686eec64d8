"""``make bench`` cannot rot: its quick mode runs end to end and produces every figure.

Timing targets are the benchmark's business (docs/performance.md); this test
asserts only that each figure is measured, and the exact command counts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from otel_subflow import SubflowConfig

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {
    "hit_vs_bare_span",
    "hit_vs_contrib_redis",
    "init_vs_bare_span",
    "init_journal_hot_path",
    "init_cpu_vs_bare_span",
    "miss_p50_ms",
    "miss_p99_ms",
    "miss_big_journal_p50_ms",
    "miss_big_journal_p99_ms",
    "hit_restricted_acl_p50",
    "throughput_4_workers",
    "memory_traced_mb",
    "memory_rss_mb",
    "commands_hits",
    "commands_inits",
    "commands_misses_analysed",
    "commands_misses_default",
    "miss_paused_writes_added_ms",
    "journal_bytes_per_1000_inits",
    "journal_mb_per_100k_runs",
    "tombstone_readable_p99_ms",
}


@pytest.mark.slow
def test_quick_bench_produces_every_figure(tmp_path, redis_server):
    """bench/overhead.py --quick exits 0, prints the table and writes every figure as JSON."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "overhead.py"), "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    document = json.loads(out.read_text())
    figures = {f["id"]: f for f in document["figures"]}
    assert set(figures) == FIGURES
    for fid, figure in figures.items():
        assert figure["value"] is not None and math.isfinite(figure["value"]), fid
        assert figure["label"] in proc.stdout, fid
    assert document["table"] in proc.stdout
    # A restricted ACL user: the refused id fetch must not cost a reconnect per call.
    assert figures["hit_restricted_acl_p50"]["detail"]["connections_opened"] <= 2
    # Counted, not timed: these are exact on any machine.
    assert figures["commands_hits"]["detail"]["commands"] == {"get": 1000}
    inits = figures["commands_inits"]["detail"]
    assert inits["commands"]["set"] == 1000 and 1 <= inits["script_calls"] <= 20
    assert "xadd" not in inits["commands"] and "getdel" not in inits["commands"]
    misses = figures["commands_misses_analysed"]["detail"]
    for command in ("pttl", "scan"):
        assert misses["commands"][command] == 1000, (command, misses)
    assert misses["commands"]["get"] == 2000  # the app's, and the watchers' heartbeat read by the analysis
    # ZRANGE and HMGET: one per analysis, plus one per call of the journal's script
    for command in ("zrange", "hmget"):
        assert 1000 < misses["commands"][command] == 1000 + misses["script_calls"], (command, misses)
    burst = figures["commands_misses_default"]["detail"]
    assert burst["commands"]["get"] == 1000 + burst["analysed"]
    default = SubflowConfig()
    assert 0 < burst["analysed"] <= default.analysis_burst + default.analysis_rate_per_s * burst["seconds"] + 1
