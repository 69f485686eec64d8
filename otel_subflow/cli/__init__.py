"""The ``otel-subflow`` command line: ``diagnose``, ``monitor``, ``demo`` and ``stack``.

Bad input (unknown flags, missing ids, unreachable Redis, wrong password,
unwritable paths) gets one line on stderr and exit code 2, never a traceback.

Other subcommands register with ``main.add_command(command)`` below.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click
import redis

from otel_subflow._version import __version__
from otel_subflow.cli._common import EXIT_USAGE, CliError
from otel_subflow.cli.demo import demo
from otel_subflow.cli.diagnose import diagnose
from otel_subflow.cli.monitor import monitor
from otel_subflow.cli.stack import stack

PROG = "otel-subflow"


class _Group(click.Group):
    """A click group whose errors are one line on stderr (click's default prints usage + error)."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(args, prog_name or PROG, complete_var, standalone_mode=False, **extra)
        except click.Abort:
            click.echo(f"{PROG}: aborted", err=True)
            result = 130
        except click.ClickException as exc:
            message = " ".join(exc.format_message().split())
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            click.echo(f"{PROG}: error: {message}{hint}", err=True)
            result = EXIT_USAGE if isinstance(exc, (click.UsageError, CliError)) else exc.exit_code
        except redis.RedisError as exc:  # a Redis failure we did not anticipate: still one line
            click.echo(f"{PROG}: error: Redis: {type(exc).__name__}", err=True)
            result = EXIT_USAGE
        code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name=PROG)
def main() -> None:
    """Explain why sub-flow state goes missing in Redis: diagnose now, monitor over time."""


main.add_command(demo)
main.add_command(diagnose)
main.add_command(monitor)
main.add_command(stack)

__all__ = ["main"]
