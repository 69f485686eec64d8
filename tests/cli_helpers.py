"""Helpers the tests share (no tests here): run the CLI in-process or as a real subprocess, poll a
condition against a deadline, fill a server until a key is evicted, read the declared extras."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import redis
from click.testing import CliRunner, Result

from otel_subflow.cli import main

CLI = [sys.executable, "-m", "otel_subflow.cli"]
SCRIPT = Path(sys.executable).parent / "otel-subflow"


def invoke(*args: str, env: Mapping[str, str] | None = None) -> Result:
    """Run the CLI in this process (click's CliRunner): stdout and stderr kept apart."""
    return CliRunner().invoke(main, list(args), env=dict(env or {}), catch_exceptions=False)


def invoke_json(*args: str, env: Mapping[str, str] | None = None, code: int | None = 0) -> dict[str, Any]:
    result = invoke(*args, "--json", env=env)
    assert code is None or result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def run_cli(*args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the installed ``otel-subflow`` console script as a real process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=timeout, check=False)


def spawn_cli(*args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[str]:
    """Start ``python -m otel_subflow.cli`` in the background (monitor sessions, signals)."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
    """Poll until ``predicate`` returns something truthy (returned) or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


def fill_until_evicted(client: Any, key: str, *, value_bytes: int = 1000, tag: str = "") -> int:
    """Write ballast (``ballast:<tag><n>``, 100 per pipeline) until ``key`` is gone or the server refuses
    writes (OOM: nothing evictable left); returns how many were written. On a cluster node, give a ``tag``
    of ``{key}`` so the ballast lands in the key's slot."""
    chunk, n = "b" * value_bytes, 0
    while client.exists(key):
        pipe = client.pipeline(transaction=False)
        for _ in range(100):
            pipe.set(f"ballast:{tag}{n}", chunk)
            n += 1
        try:
            pipe.execute()
        except redis.exceptions.OutOfMemoryError:
            break
    return n


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    """Bad input: exactly one line on stderr, no traceback, naming what is wrong."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("otel-subflow: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def declared_requirements(extra: str) -> list[str]:
    """The requirements the installed otel-subflow declares for ``extra`` (its metadata, as pip sees it)."""
    from importlib.metadata import metadata

    marker = f'; extra == "{extra}"'
    return sorted(r.removesuffix(marker) for r in metadata("otel-subflow").get_all("Requires-Dist") or ()
                  if r.endswith(marker))


def declared_instrumentor(name: str) -> list[str]:
    """The installed ``opentelemetry_instrumentor`` entry points called ``name``."""
    from importlib.metadata import entry_points

    return [e.value for e in entry_points(group="opentelemetry_instrumentor", name=name)]
