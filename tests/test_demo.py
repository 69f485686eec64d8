"""`otel-subflow demo` end to end: embedded servers, worker processes, a scored report, telemetry files."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otel_subflow import names
from otel_subflow.lab.harness import wait_for
from otel_subflow.lab.scenarios import SCENARIOS
from otel_subflow.lab.workload import DEFAULT_MIX

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "otel_subflow.cli"]
TRUTH = {
    "ttl_too_short": names.CAUSE_EXPIRED, "memory_pressure": names.CAUSE_EVICTED,
    "wrong_db": names.CAUSE_WRONG_ENDPOINT, "cross_worker_race": names.CAUSE_GET_BEFORE_INIT,
    "early_cleanup": names.CAUSE_DELETED, "redis_restart": names.CAUSE_SERVER_RESTART,
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return env


def _demo(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "demo", *args], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_demo_reports_every_injected_cause_with_perfect_definitive_accuracy(redis_server, tmp_path):
    """The default mix: every injected cause is found, definitive verdicts are all right, telemetry is written."""
    done = _demo(tmp_path, "--runs", "16", "--seed", "11", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["injected"]) == set(DEFAULT_MIX)
    for scenario in DEFAULT_MIX:
        assert TRUTH[scenario] in report["failures_by_cause"], (scenario, report["confusion_matrix"])
        assert report["confusion_matrix"][TRUTH[scenario]].get(TRUTH[scenario], 0) >= 1
    assert report["wrong_definitive"] == []
    assert report["definitive_accuracy"] == 1.0
    assert report["definitive"] >= len(DEFAULT_MIX)
    assert report["time_to_verdict_ms"]["analysis_p50"] is not None
    assert len(report["dig_further"]) == len(report["failures_by_cause"])
    for entry in report["failures_by_cause"].values():
        assert entry["example"]["summary"] and entry["example"]["evidence"]
        assert entry["example"]["writer"] != entry["example"]["reader"]
    _check_remediation(report)

    # One run view per failed run (each injection is a run of its own), with that run's miss on it.
    pages = report["run_pages"]
    assert len(pages) == report["failures"]
    for run_id, page in pages.items():
        path = Path(page)
        assert path.parent == tmp_path / "subflow-demo-runs" and path.is_file()
        html = path.read_text()
        assert f"<title>Run {run_id}</title>" in html and 'data-op="miss"' in html

    folder = tmp_path / "subflow-demo-telemetry"
    traces = list(folder.glob("*.traces.jsonl"))
    assert len(traces) >= 2  # one file per worker host
    hosts, causes = set(), set()
    for path in traces:
        for line in path.read_text().splitlines():
            for rs in json.loads(line)["resourceSpans"]:
                attrs = {a["key"]: a["value"] for a in rs["resource"]["attributes"]}
                hosts.add(attrs["host.name"]["stringValue"])
                for ss in rs["scopeSpans"]:
                    for span in ss["spans"]:
                        for event in span.get("events", []):
                            if event["name"] == names.EVENT_STATE_MISSING:
                                ev = {a["key"]: a["value"] for a in event["attributes"]}
                                causes.add(ev[names.ATTR_MISSING_CAUSE]["stringValue"])
    assert len(hosts) >= 2 and all(h.startswith("worker-") for h in hosts)
    assert causes >= {TRUTH[s] for s in DEFAULT_MIX} - {names.CAUSE_GET_BEFORE_INIT}
    assert list(folder.glob("*.metrics.jsonl")) and list(folder.glob("*.logs.jsonl"))


def _check_remediation(report):
    """Each cause's example carries fixes whose numbers fit that example."""
    fixes = {cause: {f["action"]: f for f in entry["example"]["remediation"]}
             for cause, entry in report["failures_by_cause"].items()}
    ttl = fixes[names.CAUSE_EXPIRED]["raise_ttl"]["numbers"]
    assert ttl["current_ttl_ms"] == 30 and ttl["recommended_ttl_ms"] >= ttl["init_to_read_ms"]["max_ms"] > 30
    memory = fixes[names.CAUSE_EVICTED]["raise_maxmemory"]["numbers"]
    assert memory["maxmemory_policy"] == "volatile-lru" and memory["maxmemory_bytes"] == 4 * 2**20
    assert memory["recommended_maxmemory_bytes"] >= memory["used_memory_bytes"] > 0
    example = report["failures_by_cause"][names.CAUSE_WRONG_ENDPOINT]["example"]
    where = fixes[names.CAUSE_WRONG_ENDPOINT]["align_endpoint"]["numbers"]
    assert [w["host"] for w in where["writers"]] == [example["writer"]] and where["writers"][0]["db"] == 1
    assert [r["host"] for r in where["readers"]] == [example["reader"]] and where["readers"][0]["db"] == 0
    race = fixes[names.CAUSE_GET_BEFORE_INIT]["await_init_before_dispatch"]["numbers"]
    assert race["read_to_init_ms"] is not None and race["read_to_init_ms"] >= 0
    assert fixes[names.CAUSE_SERVER_RESTART]["enable_aof"]["numbers"]["appendonly"] == "no"
    assert "find_deleter" in fixes[names.CAUSE_DELETED]


def test_the_human_report_prints_the_remediation(tmp_path):
    """Under the causes table: each cause, its fixes and why, with the numbers in words."""
    done = _demo(tmp_path, "--scenario", "wrong_db", "--runs", "2", "--seed", "3")
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())  # rich wraps long lines
    assert "Remediation (numbers from each example's evidence, the journal and its server):" in out
    assert re.search(r"align_endpoint \(prevents this miss\): The init went worker-\w -> 127\.0\.0\.1:\d+ db 1; "
                     r"the read went worker-\w -> 127\.0\.0\.1:\d+ db 0", out), out


def test_one_scenario_and_the_list(tmp_path):
    """--scenario picks one mode; --list-scenarios names them all."""
    listed = _demo(tmp_path, "--list-scenarios", timeout=60)
    assert listed.returncode == 0
    for name in SCENARIOS:
        assert name in listed.stdout
    done = _demo(tmp_path, "--scenario", "key_mismatch", "--runs", "3", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["injected"]) == {"key_mismatch"}
    assert set(report["failures_by_cause"]) == {names.CAUSE_KEY_MISMATCH}


def test_unknown_scenario_is_one_line_exit_2(tmp_path):
    """A bad scenario name: one clear line, exit code 2, no traceback."""
    done = _demo(tmp_path, "--scenario", "nope", timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "unknown scenario 'nope'" in done.stderr
    assert "Traceback" not in done.stderr


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_ctrl_c_stops_every_server_and_worker(tmp_path):
    """With --keep-servers the demo waits; SIGINT then removes its servers and workers."""
    proc = subprocess.Popen([*CLI, "demo", "--runs", "2", "--scenario", "never_written", "--json",
                             "--keep-servers"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("}"):
                break
        report = json.loads("".join(lines))
        ports = {int(p) for cmd in report["dig_further"] for p in re.findall(r"127\.0\.0\.1:(\d+)", cmd)}
        assert ports and all(_port_open(p) for p in ports)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert wait_for(lambda: not any(_port_open(p) for p in ports), 10)
        assert "stopping" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
