"""One decorated call, from span start to span end: :class:`DecoratedCall`.

It implements what the analysis, the report and the journal read of a call
(``_analysis/interface.py``: :class:`~otel_subflow._analysis.interface.TracedCall`).
Every step runs behind the internal-error boundary, so the user's call never sees
our failures, and the wrapped function's return value or exception is untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from otel_subflow import names
from otel_subflow._analysis.miss import analyze_miss_async, analyze_miss_sync
from otel_subflow._analysis.report import emit_verdict
from otel_subflow._boundary import internal_errors, swallow
from otel_subflow._config import SubflowConfig
from otel_subflow._instrument.context import with_run_context
from otel_subflow._journal.location import journal_for
from otel_subflow._journal.races import MissRecord
from otel_subflow._redis.cluster import node_client
from otel_subflow._redis.connection import (
    ConnectionInfo,
    connection_info,
    fetch_ids_async,
    fetch_ids_sync,
    forget_connection,
)
from otel_subflow._runtime import runtime
from otel_subflow._telemetry.instruments import Instruments, emit_log, logger
from otel_subflow._watch import lease

if TYPE_CHECKING:
    from otel_subflow._instrument.spec import DecoratorSpec

_CONNECTION_ERRORS: tuple[type[BaseException], ...]
try:
    from redis.exceptions import ConnectionError as _RedisConnectionError
    from redis.exceptions import TimeoutError as _RedisTimeoutError

    _CONNECTION_ERRORS = (_RedisConnectionError, _RedisTimeoutError, OSError)
except ImportError:  # pragma: no cover - redis is a dependency
    _CONNECTION_ERRORS = (OSError,)


@dataclasses.dataclass(slots=True, eq=False)
class DecoratedCall:
    """One decorated call: its values, its span and context token, its outcome."""

    spec: DecoratorSpec
    config: SubflowConfig
    run_id: str | None
    node_id: str | None
    key: str | None
    client: object
    ttl_ms: int | None
    info: ConnectionInfo | None = dataclasses.field(init=False)
    span: trace.Span = trace.INVALID_SPAN
    token: object | None = None
    started: float = 0.0
    duration_s: float = 0.0
    race_of: MissRecord | None = None
    #: A Redis Cluster client: ``client`` is its node for the key, looked up again at the end of the
    #: call (a failover or a reshard the cluster client followed during the call moves it).
    cluster: object | None = None

    def __post_init__(self) -> None:
        self.info = connection_info(self.client) if self.client is not None else None

    @property
    def instruments(self) -> Instruments:
        return self.spec.instruments

    def start(self) -> None:
        try:
            spec = self.spec
            attrs: dict[str, Any] = names.state_attributes(self.run_id, self.node_id, self.key)
            if self.info is not None:
                attrs.update(self.info.span_attributes())
            if self.ttl_ms is not None:
                attrs[names.ATTR_STATE_TTL_MS] = self.ttl_ms
            links = None
            if spec.operation == names.OPERATION_INIT and self.key is not None:
                self.race_of = runtime.recent_misses.take(self.key)
                if self.race_of is not None:
                    links = [Link(self.race_of.span_context, {names.ATTR_STATE_KEY: self.key})]
            ctx = with_run_context(self.run_id, self.node_id)
            self.span = spec.instruments.tracer.start_span(
                spec.span_name, context=ctx, kind=SpanKind.INTERNAL, attributes=attrs, links=links
            )
            self.token = otel_context.attach(trace.set_span_in_context(self.span, ctx))
        except Exception as exc:  # noqa: BLE001 - the boundary
            swallow("decorator.start", exc)
        self.started = time.perf_counter()

    def add_ids(self) -> None:
        """Client id, server run_id and address learned after the span started (first call of a pool, a reconnect).

        Even when the fetch failed: the address may have been learned during the
        call (a Sentinel pool's first connection).
        """
        with internal_errors("decorator.add_ids"):
            if self.info is not None:
                self.span.set_attributes(self.info.span_attributes())

    def stop_clock(self) -> None:
        self.duration_s = time.perf_counter() - self.started

    def returned_sync(self, result: object) -> None:
        """The wrapped function returned ``result``: the ids once per pool, a miss analysed, the span ended."""
        self.concluded_sync(self.classify(result))

    def raised_sync(self, exc: BaseException) -> None:
        """The wrapped function raised ``exc``: a miss when it is one of ``missing_on``, else an error.

        The caller re-raises ``exc`` itself, unchanged."""
        if self.is_missing_exception(exc):
            self.stop_clock()
            self.concluded_sync(names.OUTCOME_MISS)
        else:
            self.raised(exc)

    def follow_cluster(self) -> None:
        """The node now serving the key, if the cluster client moved during the call."""
        with internal_errors("decorator.cluster"):
            if self.cluster is not None and self.key is not None:
                node = node_client(self.cluster, self.key)
                if node is not None and node is not self.client:
                    self.client, self.info = node, connection_info(node)
                    self.add_ids()

    def concluded_sync(self, outcome: str) -> None:
        """The call's outcome is known: the ids once per pool, a miss analysed, the span ended."""
        try:
            self.follow_cluster()
            if self.info is not None and self.info.needs_fetch():
                # Once per pool, after a call that worked: the server is up and the
                # connection warm, so this one round trip cannot hang on a dead server.
                fetch_ids_sync(self.client, self.info, self.config.analysis_timeout_s)
                self.add_ids()
            if outcome == names.OUTCOME_MISS:
                with internal_errors("decorator.miss"):
                    emit_verdict(self, analyze_miss_sync(self))
        finally:
            self.finish(outcome)

    async def returned_async(self, result: object) -> None:
        """:meth:`returned_sync` for an ``async def`` function, on ``redis.asyncio``."""
        await self.concluded_async(self.classify(result))

    async def raised_async(self, exc: BaseException) -> None:
        """:meth:`raised_sync` for an ``async def`` function."""
        if self.is_missing_exception(exc):
            self.stop_clock()
            await self.concluded_async(names.OUTCOME_MISS)
        else:
            self.raised(exc)

    async def concluded_async(self, outcome: str) -> None:
        """:meth:`concluded_sync` for an ``async def`` function, on ``redis.asyncio``."""
        self.follow_cluster()
        info = self.info
        try:
            if info is not None and info.needs_fetch():
                await fetch_ids_async(self.client, info, self.config.analysis_timeout_s)
                self.add_ids()
            if outcome == names.OUTCOME_MISS:
                with internal_errors("decorator.miss"):
                    emit_verdict(self, await analyze_miss_async(self))
        finally:
            self.finish(outcome)

    def raised(self, exc: BaseException) -> None:
        """The wrapped function raised: outcome ``error``, never ``miss``; the span ends."""
        self.stop_clock()
        with internal_errors("decorator.raised"):
            span = self.span
            span.set_attribute(names.ATTR_STATE_OUTCOME, names.OUTCOME_ERROR)
            span.set_attribute(names.ATTR_ERROR_TYPE, type(exc).__qualname__)
            if isinstance(exc, Exception):
                span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            if isinstance(exc, _CONNECTION_ERRORS):
                if self.client is not None:
                    forget_connection(self.client)
                emit_log(
                    logging.ERROR,
                    names.LOG_CRITICAL_STATE_ISSUE,
                    span,
                    {
                        "issue": "redis_connection_error",
                        names.ATTR_STATE_OPERATION: self.spec.operation,
                        names.ATTR_ERROR_TYPE: type(exc).__qualname__,
                        names.ATTR_RUN_ID: self.run_id,
                        names.ATTR_NODE_ID: self.node_id,
                        names.ATTR_STATE_KEY: self.key,
                    },
                )
            self._record(names.OUTCOME_ERROR)
        self.end()

    def is_missing_exception(self, exc: BaseException) -> bool:
        """``exc`` is one of the decorator's ``missing_on`` types: it means "no such state"."""
        missing_on = self.spec.missing_on
        if not missing_on:
            return False
        try:
            return isinstance(exc, missing_on)
        except Exception as error:  # noqa: BLE001 - the boundary (a metaclass's __instancecheck__)
            swallow("decorator.missing_on", error)
        return False

    def classify(self, result: Any) -> str:
        """The outcome of a call that returned."""
        self.stop_clock()
        if self.spec.operation == names.OPERATION_INIT:
            wrote = self.spec.wrote
            if wrote is None:
                return names.OUTCOME_CREATED
            try:
                return names.OUTCOME_CREATED if wrote(result) else names.OUTCOME_NOT_WRITTEN
            except Exception as exc:  # noqa: BLE001 - the boundary: the user's predicate failed
                swallow("decorator.wrote", exc)
            return names.OUTCOME_CREATED  # unknown: journalled, as without a predicate
        try:
            return names.OUTCOME_MISS if self.spec.is_missing(result) else names.OUTCOME_HIT
        except Exception as exc:  # noqa: BLE001 - the boundary
            swallow("decorator.is_missing", exc)
        return names.OUTCOME_HIT

    def finish(self, outcome: str) -> None:
        """The wrapped function returned: record the outcome (journal an init) and end the span."""
        try:
            self.span.set_attribute(names.ATTR_STATE_OUTCOME, outcome)
            if outcome == names.OUTCOME_CREATED:
                if self.race_of is not None:
                    self.span.add_event(names.EVENT_STATE_RACE, self.race_of.event_attributes())
                journal = journal_for(self.client, self.config)
                if journal is not None:
                    journal.record_init(self)
                lease.notice(self.client)
            elif outcome == names.OUTCOME_MISS:
                lease.notice(self.client)
            elif outcome == names.OUTCOME_NOT_WRITTEN and self.race_of is not None:
                # It answered nothing: the miss waits for the init that does write.
                self.race_of.claimed = False
                runtime.recent_misses.add(self.race_of)
                self.race_of = None
            self._record(outcome)
        except Exception as exc:  # noqa: BLE001 - the boundary
            swallow("decorator.succeed", exc)
        self.end()

    def _record(self, outcome: str) -> None:
        spec = self.spec
        spec.instruments.duration.record(self.duration_s, spec.metric_attrs[outcome])
        if not logger.isEnabledFor(logging.DEBUG):
            return  # emit_log checks too; this skips building the fields on every call
        emit_log(
            logging.DEBUG,
            names.LOG_STATE_OPERATION_DETAILED,
            self.span,
            {
                names.ATTR_STATE_OPERATION: spec.operation,
                names.ATTR_STATE_OUTCOME: outcome,
                names.ATTR_RUN_ID: self.run_id,
                names.ATTR_NODE_ID: self.node_id,
                names.ATTR_STATE_KEY: self.key,
                "duration_ms": round(self.duration_s * 1000.0, 3),
            },
        )

    def end(self) -> None:
        """End the span and restore the caller's context; runs whatever happened before."""
        try:
            self.span.end()
        except Exception as exc:  # noqa: BLE001 - the boundary
            swallow("decorator.end", exc)
        if self.token is not None:
            try:
                otel_context.detach(cast(Any, self.token))
            except Exception as exc:  # noqa: BLE001 - the boundary
                swallow("decorator.detach", exc)

