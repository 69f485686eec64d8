"""The stack's binaries and configs without the binaries: cache layout, messages, where the configs are."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from otel_subflow import stack as stack_mod
from otel_subflow.stack import StackError, collector_config_dir, find_binaries
from otel_subflow.stack import _build as build

REPO = Path(__file__).resolve().parents[1]
BUILD_PY = REPO / "otel_subflow" / "stack" / "_build.py"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty binary cache, no binary overrides, and no Go on PATH (a build would fail at once)."""
    monkeypatch.setenv("OTEL_SUBFLOW_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("OTEL_SUBFLOW_OTELCOL_BIN", "OTEL_SUBFLOW_JAEGER_BIN", "OTEL_SUBFLOW_PROMETHEUS_BIN"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return tmp_path / "cache"


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_the_checkout_collector_dir_is_the_package_data() -> None:
    """docker-compose mounts ./collector: the same files the installed package runs."""
    link = REPO / "collector"
    assert link.is_symlink() and not Path(os.readlink(link)).is_absolute()
    assert link.resolve() == collector_config_dir() == build.MANIFEST.parent
    for name in ("otelcol.yaml", "jaeger.yaml", "prometheus.yml", "alerts.yml", "vendor-overlay.yaml"):
        assert (collector_config_dir() / name).is_file(), name


def test_collector_dir_override_and_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SUBFLOW_COLLECTOR_DIR wins; a directory without otelcol.yaml is named in the error."""
    monkeypatch.setenv("OTEL_SUBFLOW_COLLECTOR_DIR", str(tmp_path))
    with pytest.raises(StackError, match=f"not found in {tmp_path}: check OTEL_SUBFLOW_COLLECTOR_DIR"):
        collector_config_dir()
    (tmp_path / "otelcol.yaml").write_text("{}")
    assert collector_config_dir() == tmp_path


def test_cache_layout_is_keyed_by_version(cache: Path) -> None:
    """The paths the shell script used: <cache>/otelcol-subflow-v<ver>/otelcol-subflow, <cache>/jaeger-v<ver>/jaeger."""
    assert build.otelcol_path() == cache / f"otelcol-subflow-v{stack_mod.OTELCOL_VERSION}" / "otelcol-subflow"
    assert build.jaeger_path() == cache / f"jaeger-v{stack_mod.JAEGER_MODULE_VERSION}" / "jaeger"


def test_build_reuses_a_cache_built_from_the_same_manifest(cache: Path) -> None:
    """Cached binaries (the collector's stamped with its manifest's sha256) are reused: no Go needed."""
    otelcol = _executable(build.otelcol_path())
    jaeger = _executable(build.jaeger_path())
    stamp = otelcol.with_name("otelcol-subflow.manifest.sha256")
    stamp.write_text(hashlib.sha256(build.MANIFEST.read_bytes()).hexdigest() + "\n")
    logged: list[str] = []
    assert build.build(log=logged.append) == {"collector": otelcol, "jaeger": jaeger}
    assert logged == [f"collector: cached {otelcol}", f"jaeger: cached {jaeger}"]
    # A collector built from another manifest is stale: it would be rebuilt, and that needs Go.
    stamp.write_text("0" * 64 + "\n")
    assert build.missing() == ["collector"]
    with pytest.raises(build.BuildError, match=r"needs Go, and there is no `go` on PATH: install Go 1\.24"):
        build.build(log=logged.append)


def test_without_go_the_command_says_what_to_install(cache: Path) -> None:
    """`python -m otel_subflow.stack.build`: exit 1 and one line naming Go and where to get it."""
    proc = subprocess.run([sys.executable, "-m", "otel_subflow.stack.build", "jaeger"], capture_output=True,
                          text=True, timeout=60, check=False, cwd=REPO, env=dict(os.environ))  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: building the collector and Jaeger needs Go, and there is no `go` on PATH: "
        "install Go 1.24 or newer from https://go.dev/dl/ and put `go` on PATH"
    )


def test_build_py_runs_as_a_script_without_the_package(cache: Path, tmp_path: Path) -> None:
    """scripts/build_binaries.sh runs build.py before any venv exists: no site-packages, no otel_subflow import."""
    env = {"OTEL_SUBFLOW_CACHE_DIR": str(cache), "PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-S", "-I", str(BUILD_PY), "--print-paths"], capture_output=True,
                          text=True, timeout=60, check=False, cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"otelcol={build.otelcol_path()}", f"jaeger={build.jaeger_path()}"]
    source = BUILD_PY.read_text()
    assert "import otel_subflow" not in source and "from otel_subflow" not in source


def test_the_shell_script_delegates_to_build_py(cache: Path) -> None:
    """scripts/build_binaries.sh keeps its interface (.ci/run and the Makefile call it)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin",
               PYTHON=sys.executable)  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / "scripts" / "build_binaries.sh"), "--print-paths"],
                          capture_output=True, text=True, timeout=60, check=False, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"otelcol={build.otelcol_path()}", f"jaeger={build.jaeger_path()}"]


def test_missing_binaries_message_says_what_to_run(cache: Path) -> None:
    """--no-build with an empty cache: each missing binary, the build command, Go's absence, the overrides."""
    with pytest.raises(StackError) as err:
        find_binaries()
    lines = str(err.value).splitlines()
    assert lines[0] == (
        f"missing binaries: collector ({build.otelcol_path()}), jaeger ({build.jaeger_path()}), "
        "prometheus (prometheus)"
    )
    assert f"by `{sys.executable} -m otel_subflow.stack.build`" in lines[1]
    assert "`otel-subflow stack` without --no-build" in lines[1]
    assert lines[2].startswith("- building the collector and Jaeger needs Go")
    assert "apt-get install prometheus" in lines[3]
    assert lines[4] == (
        "- or point OTEL_SUBFLOW_OTELCOL_BIN / OTEL_SUBFLOW_JAEGER_BIN / OTEL_SUBFLOW_PROMETHEUS_BIN "
        "at executables you have"
    )


def test_binary_overrides_are_used_and_checked(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SUBFLOW_*_BIN replace the cache; one that is not executable is named as such."""
    fake = _executable(cache / "elsewhere" / "bin")
    for var in ("OTEL_SUBFLOW_OTELCOL_BIN", "OTEL_SUBFLOW_JAEGER_BIN", "OTEL_SUBFLOW_PROMETHEUS_BIN"):
        monkeypatch.setenv(var, str(fake))
    assert stack_mod.build_binaries() == stack_mod.Binaries(otelcol=fake, jaeger=fake, prometheus=fake)
    monkeypatch.setenv("OTEL_SUBFLOW_JAEGER_BIN", str(cache / "nothing"))
    with pytest.raises(StackError, match=r"- jaeger: OTEL_SUBFLOW_JAEGER_BIN=\S+/nothing is not an executable file"):
        find_binaries()


def test_stack_command_without_binaries_fails_with_the_message(cache: Path) -> None:
    """`otel-subflow stack --no-build` on a machine without the binaries: exit 1, the message, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "otel_subflow.cli", "stack", "--no-build"],
                          capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
                          env=dict(os.environ))  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: missing binaries: collector (")
    assert "Traceback" not in proc.stderr


def test_stack_command_without_go_says_what_to_install(cache: Path, tmp_path: Path) -> None:
    """`otel-subflow stack` that would build, on a machine without Go: exit 1, Go named, the overrides offered."""
    prometheus = _executable(tmp_path / "prometheus")
    proc = subprocess.run([sys.executable, "-m", "otel_subflow.cli", "stack"], capture_output=True, text=True,
                          timeout=60, check=False, cwd=REPO,
                          env=dict(os.environ, OTEL_SUBFLOW_PROMETHEUS_BIN=str(prometheus)))  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: building the collector and Jaeger needs Go, and there is no `go` on PATH: "
        "install Go 1.24 or newer from https://go.dev/dl/ and put `go` on PATH",
        "- or point OTEL_SUBFLOW_OTELCOL_BIN / OTEL_SUBFLOW_JAEGER_BIN at executables you have",
    ]
