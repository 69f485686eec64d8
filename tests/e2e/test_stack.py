"""otel_subflow.stack: starts the real binaries, reports failures with their logs, stops cleanly."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from otel_subflow.stack import Binaries, LocalStack, StackError, StackPorts, check_stack

REPO = Path(__file__).resolve().parents[2]
Poll = Callable[..., Any]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_local_stack_starts_healthy_and_stops_every_process(binaries: Binaries, tmp_path: Path) -> None:
    """All three parts answer on loopback; stop() leaves no process behind."""
    stack = LocalStack(ports=StackPorts.free(), binaries=binaries, workdir=tmp_path, redis_endpoint="127.0.0.1:1")
    with stack:
        pids = [stack._components[n].process.pid for n in ("jaeger", "collector", "prometheus")]  # type: ignore[union-attr]
        assert all(alive(p) for p in pids)
        for url in (
            stack.urls["collector_health"],
            stack.urls["collector_metrics"],
            f"{stack.urls['jaeger']}/api/services",
            f"{stack.urls['prometheus']}/-/ready",
        ):
            assert url.startswith("http://127.0.0.1:")
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200, url
    assert not any(alive(p) for p in pids)


def test_a_broken_config_fails_start_with_the_log(
    binaries: Binaries, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collector that cannot start raises StackError quoting its log, and nothing is left running."""
    broken = tmp_path / "collector"
    shutil.copytree(REPO / "collector", broken)
    (broken / "otelcol.yaml").write_text(
        (broken / "otelcol.yaml").read_text().replace("tail_sampling:\n", "tail_sampling:\n    no_such_option: 1\n", 1)
    )
    monkeypatch.setenv("OTEL_SUBFLOW_COLLECTOR_DIR", str(broken))
    stack = LocalStack(ports=StackPorts.free(), binaries=binaries, workdir=tmp_path / "w", startup_timeout=30)
    with pytest.raises(StackError, match="collector exited") as err:
        stack.start()
    assert "no_such_option" in str(err.value)
    assert not stack.is_running("jaeger")


@pytest.mark.parametrize(
    "command",
    [["-m", "otel_subflow.stack"], ["-m", "otel_subflow.cli", "stack"]],
    ids=["python-m-stack", "otel-subflow-stack"],
)
def test_stack_command_prints_urls_and_stops_on_ctrl_c(
    binaries: Binaries, poll_until: Poll, tmp_path: Path, command: list[str]
) -> None:
    """`python -m otel_subflow.stack` (what `make stack` runs) and `otel-subflow stack` print working URLs
    and exit 0 on SIGINT, leaving no child behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(REPO)
    out_path = tmp_path / "out.txt"
    with out_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, *command, "--no-build", "--free-ports", "--redis", "127.0.0.1:1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        text = poll_until(
            lambda: t if "export OTEL_EXPORTER_OTLP_PROTOCOL" in (t := out_path.read_text()) else None,
            timeout=60,
            what="the stack's URLs",
        )
        urls = dict(re.findall(r"^\s+(\w+)\s+(http://\S+)$", text, re.M))
        assert set(urls) >= {"jaeger", "prometheus", "otlp_grpc", "collector_health"}
        with urllib.request.urlopen(urls["jaeger"] + "/api/services", timeout=5) as resp:
            assert resp.status == 200
        children = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(proc.pid)], text=True).split()]
        assert len(children) == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in children)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_otel_subflow_stack_bad_option_is_one_line_exit_2(binaries: Binaries, tmp_path: Path) -> None:
    """`otel-subflow stack` usage errors: one line on stderr, exit 2, nothing started; --help is the stack's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(REPO)
    cli = [sys.executable, "-m", "otel_subflow.cli", "stack"]
    bad = subprocess.run([*cli, "--no-build", "--bogus"], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("\n") == 1 and "unrecognized arguments: --bogus" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and bad.stdout == ""
    usage = subprocess.run([*cli, "--help"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                           check=False)  # fmt: skip
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith("usage: otel-subflow stack") and "--free-ports" in usage.stdout


def test_check_passes_on_a_working_stack_and_names_a_stopped_part(binaries: Binaries, tmp_path: Path) -> None:
    """check_stack (what --check runs): all ok on a fresh stack; with Jaeger stopped, Jaeger fails and only it."""
    stack = LocalStack(ports=StackPorts.free(), binaries=binaries, workdir=tmp_path, redis_endpoint="127.0.0.1:1",
                       decision_wait="1s", scrape_interval="1s")  # fmt: skip
    with stack:
        results = check_stack(stack, timeout=30)
        assert [(r.component, r.ok) for r in results] == [("collector", True), ("jaeger", True), ("prometheus", True)]
        assert "7 rules loaded" in results[2].detail, results[2]
        stack.stop_component("jaeger")
        results = check_stack(stack, timeout=3)
        assert [(r.component, r.ok) for r in results] == [("collector", True), ("jaeger", False), ("prometheus", True)]
        assert "not in Jaeger after 3 s" in results[1].detail
