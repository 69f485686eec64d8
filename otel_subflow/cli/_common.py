"""What every subcommand shares: the Redis connection, secrets masking, output and files.

Errors a user can fix (bad URL, unreachable Redis, wrong password, unwritable
path) become :class:`CliError`: one line on stderr and exit code 2, never a
traceback. Redis URLs appear only masked (:mod:`otel_subflow.cli._secrets`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import redis
from rich.console import Console

from otel_subflow._config import SubflowConfig
from otel_subflow._journal.location import journal_target
from otel_subflow._redis.endpoint import Endpoint

# Re-exported: the masking helpers live in _secrets (standard library only, shared with the lab and the stack).
from otel_subflow.cli._secrets import MASK as MASK
from otel_subflow.cli._secrets import mask_url as mask_url
from otel_subflow.cli._secrets import scrub as scrub
from otel_subflow.cli._secrets import url_secrets as url_secrets

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
REDIS_URL_ENV = "OTEL_SUBFLOW_REDIS_URL"
#: Exit code for bad input and unusable environments (click's own usage-error code).
EXIT_USAGE = 2


class CliError(click.ClickException):
    """A problem the user can fix: one line on stderr, exit code 2."""

    exit_code = EXIT_USAGE


# -- Redis --------------------------------------------------------------------


class RedisTarget:
    """The Redis a command talks to, with a masked URL for every message and file."""

    def __init__(self, url: str, timeout_s: float = 5.0, option: str = "--redis-url") -> None:
        self.url = url
        self.option = option
        self.masked = mask_url(url)
        self.secrets = url_secrets(url)
        self.timeout_s = timeout_s
        try:
            self.client: redis.Redis = redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
            )
        except ValueError as exc:
            raise CliError(f"invalid {option} {self.masked}: {scrub(str(exc), self.secrets)}") from None
        endpoint = Endpoint(self.client.connection_pool)
        self.db = endpoint.db
        self.endpoint = endpoint.label()

    def describe_error(self, exc: BaseException) -> str:
        """One line saying what went wrong talking to this Redis, without secrets."""
        detail = scrub(str(exc), self.secrets) or type(exc).__name__
        where = "" if self.option == "--redis-url" else f" ({self.option})"
        if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc) or (
            "AUTH" in str(exc) and "password" in str(exc)
        ):
            return f"authentication failed for {self.masked}{where}: {detail}"
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
            return f"cannot reach Redis at {self.masked}{where}: {detail}"
        return f"Redis at {self.masked} refused the request: {detail}"

    def connect(self) -> None:
        """PING once so an unreachable server or a wrong password fails fast and clearly."""
        try:
            self.client.ping()
        except (redis.RedisError, OSError) as exc:
            raise CliError(self.describe_error(exc)) from None

    def journal_client(self, config: SubflowConfig) -> redis.Redis:
        """A client of the journal, wherever the instrumentation keeps it (``journal_target``; its own
        URL is checked now, with the variable's name in the message)."""
        where = journal_target(self.client, dataclasses.replace(config, journal_enabled=True))
        if where is not None and where.url is not None:
            journal = RedisTarget(where.url, self.timeout_s, option="OTEL_SUBFLOW_JOURNAL_URL")
            journal.connect()
            return journal.client
        if where is None:  # (a pool without an address: never from a URL)
            raise CliError(f"the journal's server is not known for {self.masked}")
        return where.sync_client(self.timeout_s)

    def close(self) -> None:
        self.client.close()


@contextmanager
def open_redis(url: str, timeout_s: float) -> Iterator[tuple[SubflowConfig, RedisTarget, redis.Redis]]:
    """The configuration, the state Redis (PINGed once: :class:`CliError` when it cannot be used) and the
    journal's client (:meth:`RedisTarget.journal_client`); both clients are closed on exit."""
    config = SubflowConfig.from_env()
    target = RedisTarget(url, timeout_s)
    try:
        target.connect()
        journal = target.journal_client(config)
    except BaseException:
        target.close()
        raise
    try:
        yield config, target, journal
    finally:
        target.close()
        journal.close()


@contextmanager
def redis_errors(target: RedisTarget) -> Iterator[None]:
    """Turn redis errors raised inside into one-line :class:`CliError`\\ s."""
    try:
        yield
    except (redis.RedisError, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)):
            raise
        raise CliError(target.describe_error(exc)) from None


# -- options shared by the subcommands ----------------------------------------


def redis_url_option(func: Any) -> Any:
    return click.option(
        "--redis-url",
        envvar=REDIS_URL_ENV,
        default=DEFAULT_REDIS_URL,
        show_default=True,
        help=f"Redis holding the state (env {REDIS_URL_ENV}). Passwords are masked in all output.",
    )(func)


def json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document (shape: docs/cli.md).")(func)


def output_dir_option(func: Any) -> Any:
    return click.option(
        "--output-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Directory for the files written (default: the current directory).",
    )(func)


def timeout_option(func: Any) -> Any:
    return click.option("--timeout", type=click.FloatRange(0.05, 300.0), default=5.0, show_default=True,
                        help="Redis socket timeout, seconds.")(func)


def redis_command_options(func: Any) -> Any:
    """The options of every command that reads the state Redis (docs/cli.md, "Common options and behaviour"):
    ``--redis-url``, ``--json``, ``--output-dir`` and ``--timeout``, in that order in ``--help``."""
    for option in (timeout_option, output_dir_option, json_option, redis_url_option):
        func = option(func)
    return func


# -- output -------------------------------------------------------------------


def make_console(stderr: bool = False) -> Console:
    """A rich console; off a terminal: no colour, a fixed width wide enough for the tables."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, no_color=True, width=int(os.environ.get("COLUMNS", "120")),
                   force_terminal=False)


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def iso(moment: _dt.datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_ms(ms: int) -> str:
    return iso(_dt.datetime.fromtimestamp(ms / 1000.0, _dt.timezone.utc))


def file_stamp(moment: _dt.datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%SZ")


def dump_json(document: Any) -> str:
    return json.dumps(document, indent=2, sort_keys=False, default=str)


def resolve_dir(output_dir: Path | None) -> Path:
    """The output directory, created if needed, checked writable (else :class:`CliError`)."""
    directory = output_dir if output_dir is not None else Path.cwd()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create output directory {directory}: {exc.strerror or exc}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CliError(f"output directory {directory} is not writable")
    return directory


def unique_path(directory: Path, stem: str, suffix: str) -> Path:
    """``directory/stem+suffix``, or ``stem-1``, ``stem-2``... when it exists already."""
    path = directory / f"{stem}{suffix}"
    counter = 1
    while path.exists():
        path = directory / f"{stem}-{counter}{suffix}"
        counter += 1
    return path


def stamped_path(directory: Path, prefix: str, moment: _dt.datetime) -> Path:
    """Where a command's JSON file goes: ``directory/<prefix>_<UTC timestamp>.json``, never over an existing one."""
    return unique_path(directory, f"{prefix}_{file_stamp(moment)}", ".json")


def check_writable_file(path: Path) -> None:
    """Fail early (before any work) when ``path`` cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CliError(f"output path {path} is a directory")
    if not parent.is_dir():
        raise CliError(f"output path {path}: directory {parent} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise CliError(f"output path {path} is not writable")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"output path {path}: directory {parent} is not writable")


def write_private(path: Path, text: str, append: bool = False) -> None:
    """Write ``text`` to ``path`` created with mode 0600 (diagnostics can name keys and hosts)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        with os.fdopen(fd, "a" if append else "w", encoding="utf-8") as handle:
            fd = -1
            handle.write(text)
    finally:
        if fd != -1:
            os.close(fd)


def write_json(path: Path, document: Any) -> None:
    """``document`` as indented JSON in a private file (:func:`write_private`)."""
    write_private(path, dump_json(document) + "\n")


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (``None`` for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]
