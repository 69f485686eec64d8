"""``python -m otel_subflow.stack`` / ``otel-subflow stack`` / ``make stack``: the command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from otel_subflow.stack._binaries import build_binaries, find_binaries
from otel_subflow.stack._check import check_stack
from otel_subflow.stack._common import LOOPBACK, StackError, StackPorts
from otel_subflow.stack._configs import collector_config_dir
from otel_subflow.stack._local import LocalStack

PROG = "python -m otel_subflow.stack"
_VENDOR_ENV = ("OTEL_SUBFLOW_VENDOR_ENDPOINT", "OTEL_SUBFLOW_VENDOR_API_KEY")


def parse_args(argv: Sequence[str] | None, prog: str = PROG) -> argparse.Namespace:
    """The stack's options (``otel-subflow stack`` parses them up front too, for one-line usage errors)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the otel-subflow collector, Jaeger and Prometheus locally (no Docker).",
    )
    parser.add_argument("--no-build", action="store_true", help="do not build missing binaries")
    parser.add_argument("--redis", default=f"{LOOPBACK}:6379", help="host:port for the redis receiver")
    parser.add_argument("--sample-percent", type=float, default=10.0)
    parser.add_argument(
        "--free-ports",
        action="store_true",
        help="use free ports instead of the compose ports",
    )
    parser.add_argument(
        "--vendor",
        action="store_true",
        help="add collector/vendor-overlay.yaml (needs OTEL_SUBFLOW_VENDOR_ENDPOINT and _API_KEY)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="bring the stack up, check that a trace reaches Jaeger and Prometheus scrapes the collector, "
        "stop it; exit 0 if all is well, else 1",
    )
    parser.add_argument(
        "--check-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --check: how long each check waits (default 30)",
    )
    return parser.parse_args(argv)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _run_check(stack: LocalStack, timeout: float) -> int:
    print(f"otel-subflow stack --check: configs {stack.config_dir}, logs {stack.workdir}", flush=True)
    results = check_stack(stack, timeout)
    for r in results:
        print(f"  {'ok' if r.ok else 'FAIL':<5} {r.component:<11} {r.detail}", flush=True)
    failed = [r.component for r in results if not r.ok]
    for name in dict.fromkeys(failed):
        print(f"{name} log:\n{stack.log_tail(name)}", file=sys.stderr)
    print("stack check " + ("failed: " + ", ".join(failed) if failed else "passed"), flush=True)
    return 1 if failed else 0


def _serve(stack: LocalStack) -> int:
    """Print where everything is, then wait for Ctrl-C / SIGTERM (or a part dying)."""
    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _on_signal)
    print("otel-subflow stack is up (Ctrl-C stops it):")
    for name, url in stack.urls.items():
        print(f"  {name:<18} {url}")
    print(f"  {'logs':<18} {stack.workdir}")
    print("App environment:")
    for key, value in stack.app_env().items():
        print(f"  export {key}={value}")
    sys.stdout.flush()
    while not stopping:
        dead = [n for n in stack.components if not stack.is_running(n)]
        if dead:
            for name in dead:
                print(f"error: {name} exited; log:\n{stack.log_tail(name)}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Build or find the binaries, start the stack, print URLs, stop on Ctrl-C / SIGTERM.

    With ``--check``: start, check, stop, and exit 0 (all well) or 1.
    ``prog`` names the command in ``--help`` and usage errors (``otel-subflow stack``).
    """
    args = parse_args(argv, prog)
    try:
        binaries = find_binaries() if args.no_build else build_binaries()
        config_dir = collector_config_dir()
    except StackError as err:
        return _error(str(err))
    overlays: list[Path] = []
    collector_env: dict[str, str] = {}
    if args.vendor:
        missing = [v for v in _VENDOR_ENV if not os.environ.get(v)]
        if missing:
            return _error(f"--vendor needs {', '.join(missing)}")
        overlays.append(config_dir / "vendor-overlay.yaml")
        collector_env = {k: os.environ[k] for k in _VENDOR_ENV}
    stack = LocalStack(
        ports=StackPorts.free() if args.free_ports else StackPorts(),
        binaries=binaries,
        redis_endpoint=args.redis,
        sample_percent=args.sample_percent,
        # The check wants its trace through tail sampling, and Prometheus's scrapes, in seconds.
        decision_wait="1s" if args.check else "10s",
        scrape_interval="1s" if args.check else "15s",
        collector_overlays=overlays,
        collector_env=collector_env,
    )
    try:
        stack.start()  # stops what it started if it fails or is interrupted
    except StackError as err:
        return _error(str(err))
    except KeyboardInterrupt:
        return 130
    try:
        return _run_check(stack, args.check_timeout) if args.check else _serve(stack)
    except KeyboardInterrupt:
        return 130 if args.check else 0
    finally:
        print("stopping...", file=sys.stderr)
        stack.stop()
