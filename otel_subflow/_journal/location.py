"""Where the journal lives, answered once for the writer and the readers alike.

``OTEL_SUBFLOW_JOURNAL_URL`` names a Redis of its own; otherwise the journal is kept
in db 0 of the server the application's client talks to (whatever db the app uses,
so a reader on the wrong db still finds the run's journal). One :class:`Journal`
(queue and flusher) per journal endpoint and process.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from otel_subflow import names
from otel_subflow._config import SubflowConfig
from otel_subflow._journal.records import DROP_REASONS
from otel_subflow._journal.writer import Journal
from otel_subflow._redis.clients import Target, endpoint_of
from otel_subflow._redis.cluster import cluster_at, journal_node
from otel_subflow._redis.endpoint import sync_client_from_url
from otel_subflow._runtime import runtime
from otel_subflow._version import __version__

#: Without OTEL_SUBFLOW_JOURNAL_URL the journal is kept in this db of the state server.
JOURNAL_DB = 0
#: Socket timeout of the journal writer's own connection.
WRITE_TIMEOUT_S = 1.0

def _url_label(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or parts.path or "?"
    return f"{host}:{parts.port}" if parts.port else host


def journal_target(client: object, config: SubflowConfig) -> Target | None:
    """Where a reader finds the journal of records written for ``client`` (``None``: no journal)."""
    if not config.journal_enabled:
        return None
    if config.journal_url:
        return Target(url=config.journal_url)
    return Target.of_client(_cluster_journal(client) or client, db=JOURNAL_DB)


def _cluster_journal(client: object) -> object | None:
    """For a client of a Redis Cluster's node: the client of the node holding the cluster's journal."""
    endpoint = endpoint_of(client)
    cluster = None if endpoint is None else cluster_at(endpoint.address)
    return None if cluster is None else journal_node(cluster)


def journal_for(client: object, config: SubflowConfig) -> Journal | None:
    """The journal that records for ``client`` (or the one at ``OTEL_SUBFLOW_JOURNAL_URL``).

    One per journal endpoint and journal settings: decorators given different
    ``config=`` journal with their own settings (budget, queue, retention).
    """
    if not config.journal_enabled:
        return None
    if config.journal_url:
        ident: tuple[object, ...] = ("url", config.journal_url, config.journal_settings())
        journal = runtime.journals.get(ident)
        if journal is None:
            with runtime.lock:
                journal = runtime.journals.get(ident)
                if journal is None:
                    client_ = sync_client_from_url(config.journal_url, WRITE_TIMEOUT_S)
                    journal = Journal(client_, config, dedicated=True, label=_url_label(config.journal_url))
                    runtime.journals[ident] = journal
            _ensure_metrics()
        return journal
    # The server the app's connections actually reach (a Sentinel pool: the current
    # master); not known yet: no journal, never a default host. A cluster's node: the node
    # that holds the cluster's journal, which samples no counters (they would be its own).
    endpoint = endpoint_of(client)
    if endpoint is None:
        return None
    on_cluster = _cluster_journal(client)
    if on_cluster is not None:
        endpoint = endpoint_of(on_cluster)
        if endpoint is None:
            return None
    journal = runtime.journals_by_endpoint.get(endpoint)
    # (every call of a decorator passes the same config object: no settings tuple per call)
    if journal is not None and (journal.config is config or journal.settings == config.journal_settings()):
        return journal
    with runtime.lock:
        ident = (*endpoint.ident(db=JOURNAL_DB), config.journal_settings())
        journal = runtime.journals.get(ident)
        if journal is None:
            journal = Journal(endpoint.sync_client(WRITE_TIMEOUT_S, db=JOURNAL_DB), config, label=endpoint.label(),
                              counters=on_cluster is None)
            runtime.journals[ident] = journal
        runtime.journals_by_endpoint[endpoint] = journal
    _ensure_metrics()
    return journal


def all_journals() -> list[Journal]:
    return list(runtime.journals.values())


def flush_journals(timeout_s: float = 5.0) -> bool:
    """Flush every journal of this process (at exit, in tests).

    ``False`` when a queue did not drain in time or any record was lost since the
    previous flush (see :class:`JournalStats` ``dropped_by_reason`` for why).
    """
    ok = True
    for journal in all_journals():
        ok = journal.flush(timeout_s) and ok
    return ok


# -- metrics: what the journals wrote and lost, and what they take on their servers ---------

def _observe(what: str) -> Iterable[Observation]:
    for journal in all_journals():
        stats = journal.stats()
        attrs = {names.ATTR_JOURNAL_ENDPOINT: journal.label}
        if what == "written":
            yield Observation(stats.written, attrs)
        elif what == "dropped":
            for reason in DROP_REASONS:
                by_reason = {**attrs, names.ATTR_JOURNAL_DROP_REASON: reason}
                yield Observation(stats.dropped_by_reason.get(reason, 0), by_reason)
        elif what == "usage" and stats.flushes:
            yield Observation(stats.bytes_used, attrs)
        elif what == "budget" and stats.flushes:
            yield Observation(stats.budget_bytes, attrs)


METRIC_KEY = "journal"


def _ensure_metrics() -> None:
    if METRIC_KEY in runtime.registered_instruments:
        return
    runtime.registered_instruments.add(METRIC_KEY)
    meter = metrics.get_meter(names.INSTRUMENTATION_NAME, __version__)

    def callback(what: str) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return list(_observe(what))

        return observe

    meter.create_observable_counter(names.METRIC_JOURNAL_WRITTEN, [callback("written")], unit="{record}",
                                    description="Journal records written to Redis.")
    meter.create_observable_counter(names.METRIC_JOURNAL_DROPPED, [callback("dropped")], unit="{record}",
                                    description="Journal records lost, by reason.")
    meter.create_observable_gauge(names.METRIC_JOURNAL_USAGE, [callback("usage")], unit="By",
                                  description="The journal's estimated size on its Redis server.")
    meter.create_observable_gauge(names.METRIC_JOURNAL_BUDGET, [callback("budget")], unit="By",
                                  description="The journal's memory budget on its Redis server.")


def _after_fork_in_child() -> None:
    for journal in all_journals():
        journal._after_fork_in_child()


atexit.register(flush_journals, 2.0)
os.register_at_fork(after_in_child=_after_fork_in_child)
