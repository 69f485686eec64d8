"""Where the stack's executables are, and building the missing ones.

The collector and Jaeger come from :mod:`otel_subflow.stack.build` (Go, cached
outside any checkout, keyed by version); Prometheus from the system. Each can be
replaced with an ``OTEL_SUBFLOW_*_BIN`` variable.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from otel_subflow.stack import _build as build
from otel_subflow.stack._common import StackError

COMPONENTS = ("collector", "jaeger", "prometheus")
_OVERRIDES = {
    "collector": "OTEL_SUBFLOW_OTELCOL_BIN",
    "jaeger": "OTEL_SUBFLOW_JAEGER_BIN",
    "prometheus": "OTEL_SUBFLOW_PROMETHEUS_BIN",
}


@dataclasses.dataclass(frozen=True)
class Binaries:
    """Executables the stack runs."""

    otelcol: Path
    jaeger: Path
    prometheus: Path


def build_command(*components: str) -> str:
    """The command that builds the Go binaries with this interpreter, as messages quote it."""
    return " ".join([shlex.quote(sys.executable), "-m", "otel_subflow.stack.build", *components])


def find_binaries(require: Sequence[str] = COMPONENTS) -> Binaries:
    """Locate the binaries; each can be overridden with an ``OTEL_SUBFLOW_*_BIN`` variable.

    Raises StackError naming every binary in ``require`` (component names) that
    is missing, and what builds or installs it.
    """
    env = {c: os.environ.get(var) for c, var in _OVERRIDES.items()}
    paths = {
        "collector": Path(env["collector"] or build.otelcol_path()),
        "jaeger": Path(env["jaeger"] or build.jaeger_path()),
        "prometheus": Path(env["prometheus"] or shutil.which("prometheus") or "prometheus"),
    }
    absent = [c for c in COMPONENTS if c in require and not os.access(paths[c], os.X_OK)]
    if absent:
        raise StackError(_missing_message(absent, paths))
    return Binaries(otelcol=paths["collector"], jaeger=paths["jaeger"], prometheus=paths["prometheus"])


def _missing_message(absent: list[str], paths: dict[str, Path]) -> str:
    lines = ["missing binaries: " + ", ".join(f"{c} ({paths[c]})" for c in absent)]
    go_built = [c for c in absent if c in build.COMPONENTS and not os.environ.get(_OVERRIDES[c])]
    if go_built:
        just = go_built if len(go_built) == 1 else []  # no argument builds both
        lines.append(
            f"- {' and '.join(go_built)}: built once from Go modules (minutes; cached in {build.cache_dir()}) "
            f"by `otel-subflow stack` without --no-build, or by `{build_command(*just)}`"
        )
        problem = build.go_problem()
        if problem:
            lines.append(f"- {problem}")
    given = [c for c in absent if os.environ.get(_OVERRIDES[c])]
    for c in given:
        lines.append(f"- {c}: {_OVERRIDES[c]}={paths[c]} is not an executable file")
    if "prometheus" in absent and "prometheus" not in given:
        lines.append(
            "- prometheus: install Prometheus 2.x (Debian/Ubuntu: apt-get install prometheus; "
            "else https://prometheus.io/download/)"
        )
    others = [_OVERRIDES[c] for c in absent if c not in given]
    if others:
        lines.append(f"- or point {' / '.join(others)} at executables you have")
    return "\n".join(lines)


def build_binaries(require: Sequence[str] = COMPONENTS) -> Binaries:
    """Build the missing Go binaries (a no-op when the cache holds them) and locate all of them.

    Prometheus is looked for first: no use building for minutes what could not
    run. A binary given by its ``OTEL_SUBFLOW_*_BIN`` variable is never built.
    """
    if "prometheus" in require:
        find_binaries(["prometheus"])
    wanted = [c for c in build.COMPONENTS if c in require and not os.environ.get(_OVERRIDES[c])]
    try:
        if wanted:
            build.build(wanted)
    except build.BuildError as err:
        instead = " / ".join(_OVERRIDES[c] for c in wanted)
        raise StackError(f"{err}\n- or point {instead} at executables you have") from err
    return find_binaries(require)
