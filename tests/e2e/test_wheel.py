"""The package as users get it: sdist and wheel built, the wheel installed in a clean venv outside the
repository, and its commands run from a directory outside it too (the demo, and the stack's --check)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from otel_subflow._version import __version__
from otel_subflow.stack import Binaries

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ("otelcol.yaml", "jaeger.yaml", "prometheus.yml", "alerts.yml", "vendor-overlay.yaml", "manifest.yaml",
           "agent.yaml", "prometheus.two-tier.yml")
# Where the binaries are (or how they are replaced) passes through; every other OTEL_* variable (an
# OTLP endpoint, the tests' own settings) stays out of the clean venv's commands.
KEEP = ("OTEL_SUBFLOW_CACHE_DIR", "OTEL_SUBFLOW_OTELCOL_BIN", "OTEL_SUBFLOW_JAEGER_BIN", "OTEL_SUBFLOW_PROMETHEUS_BIN")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class Installed:
    wheel: Path
    sdist: Path
    venv: Path
    outside: Path  # a directory outside the repository to run commands from

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and (not k.startswith("OTEL_") or k in KEEP)}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, *argv: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        cwd.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([str(self.venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=self.env(),
                              capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
        print(f"$ {' '.join(argv)}\n{proc.stdout}\n{proc.stderr}")
        return proc


def _checked(proc: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """`python -m build` (sdist, then the wheel from the sdist) and the wheel with its demo extra in a new venv."""
    root = tmp_path_factory.mktemp("wheel")
    assert REPO not in root.parents
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dist = root / "dist"
    _checked(subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600, check=False), "python -m build")  # fmt: skip
    wheel = dist / f"otel_subflow-{__version__}-py3-none-any.whl"
    sdist = dist / f"otel_subflow-{__version__}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())
    venv = root / "venv"
    _checked(subprocess.run([sys.executable, "-m", "venv", str(venv)], env=env, capture_output=True, text=True,
                            timeout=300, check=False), "python -m venv")  # fmt: skip
    # pip's cache (and PIP_FIND_LINKS, when set) keeps this to seconds after the first run.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--prefer-binary", f"{wheel}[demo]"]
    _checked(subprocess.run(pip, cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False),
             "pip install wheel[demo]")  # fmt: skip
    return Installed(wheel=wheel, sdist=sdist, venv=venv, outside=root)


def _site_packages(installed: Installed) -> Path:
    proc = _checked(installed.run("python", "-c", "import otel_subflow; print(otel_subflow.__file__)",
                                  cwd=installed.outside / "where", timeout=120), "import otel_subflow")  # fmt: skip
    module = Path(proc.stdout.strip())
    assert installed.venv in module.parents, module  # the wheel's copy, not the checkout's
    return module.parent.parent


def test_wheel_holds_the_package_and_the_configs_and_no_dev_tooling(installed: Installed) -> None:
    """Only otel_subflow (lab included, the stack's configs and build beside it) and its dist-info; the
    configs byte-identical to the checkout's collector/ (the cached collector is keyed by the manifest)."""
    with zipfile.ZipFile(installed.wheel) as whl:
        names = whl.namelist()
        top = {n.split("/", 1)[0] for n in names}
        assert top == {"otel_subflow", f"otel_subflow-{__version__}.dist-info"}, top
        for config in CONFIGS:
            assert whl.read(f"otel_subflow/stack/collector/{config}") == (REPO / "collector" / config).read_bytes()
    needed = ["otel_subflow/py.typed", "otel_subflow/lab/__init__.py", "otel_subflow/stack/__main__.py",
              "otel_subflow/stack/build.py", "otel_subflow/stack/_build.py",
              "otel_subflow/stack/collector/grafana/dashboards/subflow-state.json",
              "otel_subflow/cli/assets/page.css", "otel_subflow/cli/assets/page.js"]
    for needed_file in needed:
        assert needed_file in names, needed_file
    assert not [n for n in names if n.split("/", 1)[0] in ("tests", "bench", "scripts", "collector", "docs")]
    with tarfile.open(installed.sdist) as sdist:
        members = sdist.getnames()
    for config in CONFIGS:
        assert f"otel_subflow-{__version__}/otel_subflow/stack/collector/{config}" in members, config


def test_installed_demo_runs_outside_the_repository(installed: Installed, e2e_redis: Any) -> None:
    """`otel-subflow demo --runs 5` from the clean venv: the incident report, telemetry files in the cwd.

    (The demo starts redis-servers of its own; e2e_redis fails the test, or skips it, without one.)"""
    _site_packages(installed)
    cwd = installed.outside / "demo"
    proc = _checked(installed.run("otel-subflow", "demo", "--runs", "5", "--seed", "7", cwd=cwd, timeout=300),
                    "otel-subflow demo")  # fmt: skip
    assert "SUBFLOW STATE GET FAILED" in proc.stdout
    telemetry = cwd / "subflow-demo-telemetry"
    assert telemetry.is_dir() and any(p.stat().st_size for p in telemetry.rglob("*") if p.is_file())
    # The run views, built from the wheel's own stylesheet and script (package data).
    pages = sorted((cwd / "subflow-demo-runs").glob("run-view_*.html"))
    assert pages and all(str(p) in proc.stdout for p in pages)
    assert "popover" in pages[0].read_text() and ".lane-label" in pages[0].read_text()


def test_installed_stack_check_outside_the_repository(installed: Installed, binaries: Binaries, e2e_redis: Any) -> None:
    """`otel-subflow stack --check` from the clean venv: the wheel's configs and build find the binaries,
    the stack comes up, a trace reaches Jaeger, Prometheus scrapes, everything stops: exit 0."""
    site = _site_packages(installed)
    cwd = installed.outside / "stack"
    paths = _checked(installed.run("python", "-m", "otel_subflow.stack.build", "--print-paths", cwd=cwd,
                                   timeout=120), "otel_subflow.stack.build --print-paths")  # fmt: skip
    overridden: Mapping[str, str] = {k: v for k, v in os.environ.items() if k in KEEP[1:]}
    if not overridden:
        assert paths.stdout.splitlines() == [f"otelcol={binaries.otelcol}", f"jaeger={binaries.jaeger}"]
    proc = _checked(installed.run("otel-subflow", "stack", "--check", "--free-ports", "--redis", e2e_redis.endpoint,
                                  cwd=cwd, timeout=300), "otel-subflow stack --check")  # fmt: skip
    assert f"configs {site / 'otel_subflow' / 'stack' / 'collector'}," in proc.stdout
    for component in ("collector", "jaeger", "prometheus"):
        assert any(line.split()[:2] == ["ok", component] for line in proc.stdout.splitlines()), component
    assert proc.stdout.rstrip().endswith("stack check passed")
