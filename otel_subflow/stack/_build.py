"""Build the Go binaries the local stack runs, into a cache outside any checkout.

- ``otelcol-subflow``: a minimal OpenTelemetry Collector built by the collector
  builder (ocb) from the bundled ``collector/manifest.yaml``;
- ``jaeger``: Jaeger v2, built through a throwaway wrapper module.

Both land in ``${OTEL_SUBFLOW_CACHE_DIR:-~/.cache/otel-subflow}``, keyed by version::

    otelcol-subflow-v0.161.0/otelcol-subflow   (+ .manifest.sha256: the manifest it was built from)
    jaeger-v1.76.0/jaeger

A binary already there (for the collector: built from the same manifest) is
reused, so a second run takes well under a second. One build at a time per
cache: a second caller waits on ``.build.lock`` instead of racing the first.

Usage: ``python -m otel_subflow.stack.build [all|collector|jaeger] [--print-paths]``
(in a checkout also ``scripts/build_binaries.sh``, which runs this file).

This file imports only the standard library and nothing of otel_subflow, so a
checkout can run it as a script with any Python 3.10+ before a venv exists.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

OTELCOL_VERSION = "0.161.0"
#: Go module version of github.com/jaegertracing/jaeger that is built ...
JAEGER_MODULE_VERSION = "1.76.0"
#: ... and the Jaeger v2 release (docker image tag) it corresponds to.
JAEGER_VERSION = "2.13.0"
#: `go get -tool` (the Jaeger wrapper module) arrived in Go 1.24; newer toolchains
#: that the modules ask for are fetched by Go itself.
GO_MIN = (1, 24)

MANIFEST = Path(__file__).resolve().parent / "collector" / "manifest.yaml"
COMPONENTS = ("collector", "jaeger")
#: What a person runs to build; the error messages quote it.
BUILD_COMMAND = "python -m otel_subflow.stack.build"

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """A binary could not be built; the message says what to install or run."""


def cache_dir() -> Path:
    """Where the binaries are kept: ``OTEL_SUBFLOW_CACHE_DIR`` or ``~/.cache/otel-subflow``."""
    override = os.environ.get("OTEL_SUBFLOW_CACHE_DIR")
    return Path(override) if override else Path.home() / ".cache" / "otel-subflow"


def otelcol_path(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / f"otelcol-subflow-v{OTELCOL_VERSION}" / "otelcol-subflow"


def jaeger_path(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / f"jaeger-v{JAEGER_MODULE_VERSION}" / "jaeger"


def go_problem() -> str | None:
    """Why Go cannot build here (with what to do about it), or None when it can."""
    go = shutil.which("go")
    need = ".".join(map(str, GO_MIN))
    install = f"install Go {need} or newer from https://go.dev/dl/ and put `go` on PATH"
    if go is None:
        return f"building the collector and Jaeger needs Go, and there is no `go` on PATH: {install}"
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"`{go} env GOVERSION` failed ({err}): {install}"
    match = re.match(r"go(\d+)\.(\d+)", out.strip())
    if match and (int(match[1]), int(match[2])) < GO_MIN:
        return f"{go} is {out.strip()}, too old to build Jaeger: {install}"
    return None


def _manifest_sum() -> str:
    return hashlib.sha256(MANIFEST.read_bytes()).hexdigest()


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # -trimpath keeps local paths out of the binaries; -s -w (below) strips symbols.
    env["GOFLAGS"] = " ".join(filter(None, [env.get("GOFLAGS", ""), "-trimpath -buildvcs=false"]))
    env["CGO_ENABLED"] = "0"
    return env


def _run(argv: Sequence[str], cwd: Path, quiet: bool = False) -> None:
    out = subprocess.DEVNULL if quiet else None
    result = subprocess.run(list(argv), cwd=cwd, env=_go_env(), stdout=out, stderr=out, check=False)
    if result.returncode != 0:
        raise BuildError(f"`{' '.join(argv)}` failed with exit code {result.returncode} (in {cwd})")


def _install(built: Path, target: Path) -> None:
    """Move into place through a temporary name, so a reader never sees half a binary."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.move(str(built), tmp)
    os.replace(tmp, target)


def collector_is_current(cache: Path | None = None) -> bool:
    """The cached collector exists and was built from the bundled manifest."""
    binary = otelcol_path(cache)
    stamp = binary.with_name(binary.name + ".manifest.sha256")
    try:
        return os.access(binary, os.X_OK) and stamp.read_text().strip() == _manifest_sum()
    except OSError:
        return False


def build_collector(cache: Path, log: Log) -> Path:
    binary = otelcol_path(cache)
    if collector_is_current(cache):
        log(f"collector: cached {binary}")
        return binary
    work = binary.parent / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # ocb takes the output path from the manifest only: point a copy of it at the cache.
    manifest = re.sub(r"(?m)^(  output_path:).*$", lambda m: f"{m[1]} {work / 'dist'}", MANIFEST.read_text())
    (work / "manifest.yaml").write_text(manifest)
    log(f"collector: building otelcol-subflow v{OTELCOL_VERSION} with ocb (cold: minutes on 2 cores)")
    start = time.monotonic()
    builder = f"go.opentelemetry.io/collector/cmd/builder@v{OTELCOL_VERSION}"
    _run(["go", "run", builder, "--config", str(work / "manifest.yaml"), "--ldflags", "-s -w"], cwd=work)
    _install(work / "dist" / "otelcol-subflow", binary)
    binary.with_name(binary.name + ".manifest.sha256").write_text(_manifest_sum() + "\n")
    shutil.rmtree(work, ignore_errors=True)
    log(f"collector: built {binary} in {time.monotonic() - start:.0f} s")
    return binary


def build_jaeger(cache: Path, log: Log) -> Path:
    binary = jaeger_path(cache)
    if os.access(binary, os.X_OK):
        log(f"jaeger: cached {binary}")
        return binary
    work = binary.parent / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log(f"jaeger: building jaeger v{JAEGER_MODULE_VERSION} (v2) through a wrapper module")
    start = time.monotonic()
    # `go install .../cmd/jaeger@v1.76.0` fails (the module has replace directives); a
    # wrapper module that depends on it as a tool builds it with its go.mod honoured for
    # everything but replaces. It stays apart from the collector's module, which pins a
    # newer collector than Jaeger does.
    package = "github.com/jaegertracing/jaeger/cmd/jaeger"
    ldflags = f"-s -w -X github.com/jaegertracing/jaeger/internal/version.latestVersion=v{JAEGER_VERSION}"
    _run(["go", "mod", "init", "otel-subflow.local/jaeger-build"], cwd=work, quiet=True)
    _run(["go", "get", "-tool", f"{package}@v{JAEGER_MODULE_VERSION}"], cwd=work)
    _run(["go", "build", "-ldflags", ldflags, "-o", str(work / "jaeger"), package], cwd=work)
    _install(work / "jaeger", binary)
    shutil.rmtree(work, ignore_errors=True)
    log(f"jaeger: built {binary} in {time.monotonic() - start:.0f} s")
    return binary


def missing(components: Sequence[str] = COMPONENTS, cache: Path | None = None) -> list[str]:
    """The components whose cached binary is absent (or, for the collector, stale)."""
    current = {"collector": collector_is_current(cache), "jaeger": os.access(jaeger_path(cache), os.X_OK)}
    return [c for c in components if not current[c]]


@contextmanager
def _build_lock(cache: Path, log: Log) -> Iterator[None]:
    # flock(2), like the shell script this replaces: both wait on the same lock.
    with (cache / ".build.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another build holds {cache / '.build.lock'}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _stderr_log(message: str) -> None:
    print(f"[otel-subflow build] {message}", file=sys.stderr, flush=True)


def build(components: Sequence[str] = COMPONENTS, *, log: Log = _stderr_log) -> dict[str, Path]:
    """Build what is missing (one after the other) and return {component: binary}.

    Building both at once on 2 cores was slower (8.5 min vs 5.5 min cold) and
    doubles peak memory. Raises BuildError, saying what to install or run.
    """
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components: {sorted(unknown)}")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache, log):
        if missing(components, cache):
            problem = go_problem()
            if problem:
                raise BuildError(problem)
        builders = {"collector": build_collector, "jaeger": build_jaeger}
        return {c: builders[c](cache, log) for c in components}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=BUILD_COMMAND,
        description="Build (or find in the cache) the collector and Jaeger binaries of the otel-subflow stack.",
    )
    parser.add_argument("what", nargs="?", choices=["all", *COMPONENTS], default="all")
    parser.add_argument("--print-paths", action="store_true", help="print where the binaries go and exit")
    args = parser.parse_args(argv)
    if args.print_paths:
        print(f"otelcol={otelcol_path()}")
        print(f"jaeger={jaeger_path()}")
        return 0
    try:
        build(COMPONENTS if args.what == "all" else [args.what])
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
