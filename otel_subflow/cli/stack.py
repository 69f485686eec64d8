"""``otel-subflow stack``: the collector, Jaeger and Prometheus as local processes (no Docker).

A thin front for :func:`otel_subflow.stack.main` (what ``make stack`` and
``python -m otel_subflow.stack`` run): its options (``--check`` among them)
pass through unchanged and its exit code is the command's. Bad options get one
line on stderr and exit code 2, like every other subcommand.
"""

from __future__ import annotations

import contextlib
import io

import click

from otel_subflow.cli._common import CliError
from otel_subflow.stack import main as stack_main
from otel_subflow.stack import parse_args

PROG = "otel-subflow stack"


def _check_args(args: list[str]) -> None:
    """Parse once up front so that a usage error is one line (argparse prints usage + error)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parse_args(args, PROG)
    except SystemExit as exc:
        if not exc.code:  # --help: printed to stdout, done
            raise click.exceptions.Exit(0) from None
        lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
        message = lines[-1] if lines else "invalid arguments"
        message = message.removeprefix(f"{PROG}: error: ")
        raise CliError(f"stack: {message} (see '{PROG} --help')") from None


@click.command(
    "stack",
    add_help_option=False,  # --help goes to the stack's own parser, which knows its options
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def stack(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run the collector, Jaeger and Prometheus locally with the bundled configs (see --help)."""
    argv = list(args)
    _check_args(argv)
    ctx.exit(stack_main(argv, prog=PROG))


__all__ = ["stack"]
