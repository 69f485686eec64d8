"""Bad input: one clear line on stderr, exit code 2, no traceback; passwords never shown."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from otel_subflow.cli._common import mask_url, url_secrets
from otel_subflow.lab.process import free_port
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import assert_one_line_error, invoke, run_cli

PASSWORD = "s3cret-Pa55word"


@pytest.fixture(scope="module")
def secured() -> Iterator[RedisServer]:
    """A redis-server that requires a password."""
    with RedisServer(password=PASSWORD) as server:
        yield server


@pytest.mark.parametrize(("url", "masked"), [
    ("redis://:hunter2@db.example:6379/0", "redis://:***@db.example:6379/0"),
    ("rediss://app:hunter2@db.example:6380/3", "rediss://app:***@db.example:6380/3"),
    ("redis://db.example:6379/0", "redis://db.example:6379/0"),
    ("redis://app@db.example/0", "redis://app@db.example/0"),
    ("unix:///run/redis.sock?db=1&password=hunter2", "unix:///run/redis.sock?db=1&password=***"),
])
def test_mask_url(url: str, masked: str) -> None:
    """Passwords in the userinfo or the query are replaced by ***, nothing else changes."""
    assert mask_url(url) == masked
    assert "hunter2" not in mask_url(url)
    assert ("hunter2" in url_secrets(url)) == ("hunter2" in url)


def test_unknown_flag_is_one_line_exit_2() -> None:
    """A real process: click's usage error becomes one line, exit 2."""
    proc = run_cli("diagnose", "--no-such-flag")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "--no-such-flag", "otel-subflow diagnose --help")
    assert proc.stdout == ""


def test_unknown_subcommand_is_one_line_exit_2() -> None:
    proc = run_cli("diagnoze")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "diagnoze")


@pytest.mark.parametrize(("args", "fragment"), [
    (["diagnose", "--missing-state", "--node-id", "n"], "--missing-state needs --run-id and --node-id"),
    (["diagnose", "--missing-state", "--run-id", "r"], "--missing-state needs --run-id and --node-id"),
    (["diagnose", "--race-conditions"], "--race-conditions needs --run-id"),
    (["diagnose", "--recent-operations", "--limit", "0"], "--limit"),
    (["monitor", "--interval", "-1"], "--interval"),
    (["diagnose", "--output", "x.json"], "--output is only used with --export-traces"),
])
def test_missing_or_bad_options(args: list[str], fragment: str) -> None:
    """Checked before any connection: no Redis needed to refuse them."""
    result = invoke(*args, "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, fragment)


def test_unreachable_redis(tmp_path: Path) -> None:
    """Nothing listens on the port: one line naming the (masked) URL, for both commands."""
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    for command in (["diagnose", "--redis-health"], ["monitor", "--duration", "1", "--output-dir", str(tmp_path)]):
        proc = run_cli(*command, "--redis-url", url, "--timeout", "1")
        assert proc.returncode == 2, proc.stderr
        assert_one_line_error(proc.stderr, "cannot reach Redis at redis://:***@127.0.0.1")
        assert PASSWORD not in proc.stderr + proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_wrong_password(secured: RedisServer) -> None:
    url = f"redis://:wrong-{PASSWORD}@127.0.0.1:{secured.port}/0"
    proc = run_cli("diagnose", "--redis-url", url)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "authentication failed for redis://:***@127.0.0.1")
    assert PASSWORD not in proc.stderr + proc.stdout


def test_no_password_given_to_a_secured_server(secured: RedisServer) -> None:
    proc = run_cli("diagnose", "--redis-url", f"redis://127.0.0.1:{secured.port}/0")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "authentication failed")


def test_invalid_url() -> None:
    proc = run_cli("diagnose", "--redis-url", f"http://:{PASSWORD}@example/0")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "invalid --redis-url http://:***@example/0")
    assert PASSWORD not in proc.stderr


def test_unwritable_output_paths(r: redis.Redis, redis_server: RedisServer, tmp_path: Path) -> None:
    """--output into a missing or read-only directory, --output-dir under a file: refused before any work."""
    if os.geteuid() == 0:
        locked = tmp_path / "file-not-dir"
        locked.write_text("x")
        bad_dir = locked / "sub"  # root can write anywhere, but not under a regular file
    else:
        bad_dir = tmp_path / "ro"
        bad_dir.mkdir()
        bad_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    url = redis_server.url()
    cases = [
        ["diagnose", "--export-traces", "--output", str(tmp_path / "missing" / "x.json")],
        ["diagnose", "--export-traces", "--output-dir", str(bad_dir)],
        ["monitor", "--duration", "0", "--output-dir", str(bad_dir)],
        ["diagnose", "--export-traces", "--output", str(tmp_path)],
    ]
    for args in cases:
        proc = run_cli(*args, "--redis-url", url)
        assert proc.returncode == 2, (args, proc.stderr)
        assert_one_line_error(proc.stderr)
        assert "output" in proc.stderr or "directory" in proc.stderr


def test_password_never_in_output_or_files(secured: RedisServer, tmp_path: Path) -> None:
    """Every command, human and JSON, and every file written: the password appears nowhere."""
    url = secured.url()
    assert PASSWORD in url
    outputs = []
    for args in (
        ["diagnose", "--redis-health", "--memory-analysis", "--sample-interval", "0", "--recent-operations"],
        ["diagnose", "--export-traces", "--sample-interval", "0", "--output-dir", str(tmp_path), "--json"],
        ["monitor", "--interval", "0.1", "--duration", "0.3", "--export-alerts", "--latency-threshold-ms", "0",
         "--output-dir", str(tmp_path)],
        ["monitor", "--interval", "0.1", "--duration", "0.2", "--output-dir", str(tmp_path), "--json"],
    ):
        proc = run_cli(*args, "--redis-url", url)
        assert proc.returncode in (0, 1), (args, proc.stderr)
        outputs.append(proc.stdout + proc.stderr)
    files = sorted(tmp_path.iterdir())
    assert {f.name.split("_2")[0] for f in files} >= {
        "subflow_diagnostics", "subflow_monitoring_summary", "subflow_monitoring_alerts.jsonl"}
    for path in files:
        outputs.append(path.read_text())
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for text in outputs:
        assert PASSWORD not in text
    summary = json.loads(next(p for p in files if p.name.startswith("subflow_monitoring_summary")).read_text())
    assert summary["redis_url"] == f"redis://:***@127.0.0.1:{secured.port}/0"


def test_unreachable_journal_url_is_named(r: redis.Redis, redis_server: RedisServer) -> None:
    """The journal lives elsewhere and is down: the error says which setting points there, masked."""
    journal = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    proc = run_cli("diagnose", "--recent-operations", "--redis-url", redis_server.url(), "--timeout", "1",
                   env={"OTEL_SUBFLOW_JOURNAL_URL": journal})
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "cannot reach Redis at redis://:***@127.0.0.1", "(OTEL_SUBFLOW_JOURNAL_URL)")
    assert PASSWORD not in proc.stderr
