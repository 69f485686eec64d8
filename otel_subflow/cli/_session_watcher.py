"""The keyspace watcher during a monitor session: started if its flags allow, its state followed, stopped.

The monitor runs the watcher so that tombstones are journalled while it checks.
Its real state (running, retrying since when and why, off and why) is shown
with each check, a change is kept for the summary, and the summary says how it
ended.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click
import redis

from otel_subflow import names
from otel_subflow._config import SubflowConfig
from otel_subflow._watch.status import WatcherStatus
from otel_subflow._watch.watcher import KeyspaceWatcher
from otel_subflow.cli._common import RedisTarget, scrub
from otel_subflow.cli._view import MonitorOutput

#: Most watcher state changes kept for the summary.
MAX_WATCHER_CHANGES = 100


class SessionWatcher:
    """The watcher of one monitor session, or why there is none (``watcher is None``)."""

    def __init__(self, target: RedisTarget, watcher: KeyspaceWatcher | None, info: dict[str, Any]) -> None:
        self.target = target
        self.watcher = watcher
        #: What the summary says about the watcher (``finish`` completes it).
        self.info = info
        self.changes: list[dict[str, Any]] = []
        self._shown: tuple[str, str | None] | None = None

    @classmethod
    def off(cls, target: RedisTarget, reason: str) -> SessionWatcher:
        return cls(target, None, {"enabled": False, "reason": reason, "state": names.WATCHER_STOPPED})

    @classmethod
    def start(cls, target: RedisTarget, config: SubflowConfig, enable_events: bool, *, warn: bool) -> SessionWatcher:
        """Start the keyspace watcher on its own connection, after checking the flags it needs.

        Flags off (and not to be enabled): warn and go on without it. Flags that cannot be
        read (CONFIG refused): go on without it, saying why. Otherwise start it; from then
        on it never raises: a refused subscription or a lost connection shows as its state
        (``retrying``) in the output and the summary while it keeps trying.
        """
        watcher = KeyspaceWatcher(
            redis.Redis.from_url(target.url, socket_connect_timeout=target.timeout_s), config=config,
            enable_events=True if enable_events else None,  # None: OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS decides
            socket_timeout_s=target.timeout_s,
        )
        try:
            check = watcher.check_events()
        except (redis.RedisError, OSError) as exc:
            watcher.client.close()
            return cls.off(target, f"cannot check notify-keyspace-events: {target.describe_error(exc)}")
        if not check.ok and not watcher.enable_events:
            watcher.client.close()
            if warn:
                click.echo(f"warning: keyspace watcher not started: {check.describe()} "
                           f"(or use --enable-keyspace-events)", err=True)
            return cls.off(target, check.describe())
        watcher.start(wait_s=target.timeout_s)
        return cls(target, watcher, {"enabled": True, "reason": None})

    def show(self, stamp: str, output: MonitorOutput) -> None:
        """The watcher's state with a check; a change is a line of its own and is kept for the summary."""
        if self.watcher is None:
            if self._shown is None:
                self._shown = ("off", None)
                reason = self.info["reason"]
                output.watcher(stamp, "off", text=f"off: {reason}", reason=reason, changed=True)
            return
        status = self.watcher.status
        retrying = status.state == names.WATCHER_RETRYING
        error = scrub(status.last_error, self.target.secrets) if retrying and status.last_error else None
        since = status.as_dict()["since"]
        shown = (status.state, status.last_error_type if retrying else None)
        changed = shown != self._shown
        self._shown = shown
        if changed and len(self.changes) < MAX_WATCHER_CHANGES:
            self.changes.append({"time": stamp, "state": status.state, "since": since, "error": error})
        output.watcher(stamp, status.state, text=scrub(status.describe(), self.target.secrets), since=since,
                       error=error, errors=status.consecutive_errors, changed=changed)

    def finish(self) -> dict[str, Any]:
        """Stop the watcher; :attr:`info` with the state it ended in, its counters and its changes."""
        if self.watcher is not None:
            # The state the session ended in, before the monitor stops the watcher itself.
            self.info.update(_status_fields(self.watcher.status, self.target))
            self.watcher.stop()
            self.watcher.client.close()
            self.info.update(dataclasses.asdict(self.watcher.stats))
        self.info["changes"] = self.changes
        return self.info


def summary_line(info: dict[str, Any]) -> str:
    """The watcher in the summary line: ``watcher running``, ``watcher retrying (...)`` or ``watcher off (...)``."""
    if not info.get("enabled"):
        return f"watcher off ({info.get('reason')})"
    text = f"watcher {info.get('state')}"
    if info.get("errors"):
        text += f" ({info['errors']} errors, last {info.get('last_error_type')} at {info.get('last_error_at')})"
    return text


def _status_fields(status: WatcherStatus, target: RedisTarget) -> dict[str, Any]:
    """The watcher's status for the summary, secrets scrubbed; ``reason`` says why it is not running."""
    fields = status.as_dict()
    for name in ("last_error", "events_note"):
        if fields[name] is not None:
            fields[name] = scrub(fields[name], target.secrets)
    fields["reason"] = None if status.state == names.WATCHER_RUNNING else scrub(status.describe(), target.secrets)
    return fields
