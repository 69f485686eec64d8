"""``instrument_state_get`` / ``instrument_state_init``: spans, metrics and logs around existing functions.

One factory picks the sync or async wrapper once, at decoration time. Both
wrappers share :class:`_Call`, which holds everything of one call; they differ
only where awaiting differs (the one-off id fetch and the miss analysis).
Our code runs inside :func:`internal_errors`, so it never raises into the user's
call, and the wrapped function's return value or exception passes through untouched.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TracerProvider

from otel_subflow import names
from otel_subflow._analysis.miss import analyze_miss_async, analyze_miss_sync, emit_verdict
from otel_subflow._boundary import _raise_internal, internal_errors, record_internal_error
from otel_subflow._config import SubflowConfig, get_config
from otel_subflow._instrument.args import (
    NONE_RESOLVER,
    ArgSource,
    Getter,
    KeySource,
    Resolver,
    Signature,
    compile_client,
    compile_key,
    compile_source,
    key_field_values,
    normalize_id,
    warn_decoration,
)
from otel_subflow._instrument.context import with_run_context
from otel_subflow._journal import journal_for
from otel_subflow._journal.races import recent_misses
from otel_subflow._redis.connection import (
    ConnectionInfo,
    connection_info,
    fetch_ids_async,
    fetch_ids_sync,
    forget_connection,
)
from otel_subflow._telemetry.instruments import Instruments, default_instruments, emit_log, logger
from otel_subflow._watch import lease as watching

F = TypeVar("F", bound=Callable[..., Any])

_CONNECTION_ERRORS: tuple[type[BaseException], ...]
try:
    from redis.exceptions import ConnectionError as _RedisConnectionError
    from redis.exceptions import TimeoutError as _RedisTimeoutError

    _CONNECTION_ERRORS = (_RedisConnectionError, _RedisTimeoutError, OSError)
except ImportError:  # pragma: no cover - redis is a dependency
    _CONNECTION_ERRORS = (OSError,)


def _default_is_missing(result: Any) -> bool:
    return result is None


def _swallowed(where: str, exc: Exception) -> bool:
    """:func:`internal_errors` for the per-call path, as a plain ``try``/``except``.

    A generator-based context manager costs about 0.7 us per entry, and a hit
    enters six of them: this keeps the same semantics (log once, count, re-raise
    under our tests) without that cost. ``False`` means: re-raise.
    """
    record_internal_error(where, exc)
    return not _raise_internal()


class _Spec:
    """What one decorator knows, computed once at decoration time."""

    def __init__(
        self,
        func: Callable[..., Any],
        operation: str,
        *,
        run_id: ArgSource | None,
        node_id: ArgSource | None,
        key: KeySource | None,
        client: ArgSource | None,
        ttl_ms: ArgSource | None,
        ttl_s: ArgSource | None,
        is_missing: Callable[[Any], bool] | None,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        config: SubflowConfig | None,
    ) -> None:
        self.func = func
        self.operation = operation
        self.span_name = names.SPAN_STATE_GET if operation == names.OPERATION_GET else names.SPAN_STATE_INIT
        self._config = config
        sig = Signature(func)
        self.sig = sig
        self.run_id = compile_source(sig, run_id, "run id")
        self.node_id = compile_source(sig, node_id, "node id")
        self.client = compile_client(sig, client)
        self.ttl_ms = self._optional_source(sig, ttl_ms, "ttl_ms")
        self.ttl_s = self._optional_source(sig, ttl_s, "ttl")
        self.is_missing = is_missing or _default_is_missing
        template_source = key if key is not None else self.config.key_template
        self.key_template, self.key_func, self.key_fields = compile_key(
            sig, template_source, self.config.key_template
        )
        self.needs_bound = (
            self.key_func is not None
            or any(r.needs_bound for r in (self.run_id, self.node_id, self.client, self.ttl_ms, self.ttl_s))
        )
        if tracer_provider is None and meter_provider is None:
            self.instruments = default_instruments()
        else:
            self.instruments = Instruments(tracer_provider, meter_provider)
        self.metric_attrs = {
            outcome: {names.ATTR_STATE_OPERATION: operation, names.ATTR_STATE_OUTCOME: outcome}
            for outcome in (names.OUTCOME_HIT, names.OUTCOME_MISS, names.OUTCOME_CREATED, names.OUTCOME_ERROR)
        }

    @property
    def config(self) -> SubflowConfig:
        return self._config if self._config is not None else get_config()

    @staticmethod
    def _optional_source(sig: Signature, source: ArgSource | None, default_name: str) -> Resolver:
        """TTL sources: a default name that is absent is fine (no warning), an explicit one must exist."""
        if source is None:
            if default_name in sig.params:
                return Resolver(getter=Getter(sig, default_name))
            return NONE_RESOLVER
        return compile_source(sig, source, "TTL")

    def begin(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call | None:
        """Resolve this call's values; ``None`` when instrumentation is suppressed."""
        if not is_instrumentation_enabled():
            return None
        try:
            config = self.config
            bound = self.sig.bind(args, kwargs) if self.needs_bound else None
            max_len = config.max_id_length
            raw_run = self.run_id(args, kwargs, bound)
            raw_node = self.node_id(args, kwargs, bound)
            run_id = normalize_id(raw_run, max_len)
            node_id = normalize_id(raw_node, max_len)
            key = self._key(args, kwargs, bound, raw_run, raw_node, max_len)
            client = self.client(args, kwargs, bound)
            ttl_ms = self._ttl_ms(args, kwargs, bound)
            return _Call(self, config, run_id, node_id, key, client, ttl_ms)
        except Exception as exc:
            if not _swallowed("decorator.begin", exc):
                raise
            return None

    def _key(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        bound: Mapping[str, Any] | None,
        raw_run: Any,
        raw_node: Any,
        max_len: int,
    ) -> str | None:
        if self.key_func is not None:
            value = None if bound is None else self.key_func(bound)
            return normalize_id(value, max_len * 4)
        if self.key_template is None:
            return None
        if not self.key_fields and type(raw_run) is str and type(raw_node) is str:
            # The common case: nothing for key_field_values to decode.
            try:
                key = self.key_template.format({"run_id": raw_run, "node_id": raw_node})
            except (KeyError, IndexError, AttributeError, ValueError, TypeError):
                return None
            return normalize_id(key, max_len * 4)
        values: dict[str, Any] = {"run_id": raw_run, "node_id": raw_node}
        for field, getter in self.key_fields.items():
            values[field] = getter(args, kwargs)
        try:
            key = self.key_template.format(key_field_values(values))
        except (KeyError, IndexError, AttributeError, ValueError, TypeError):
            return None
        return normalize_id(key, max_len * 4)

    def _ttl_ms(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], bound: Mapping[str, Any] | None
    ) -> int | None:
        if self.ttl_ms is NONE_RESOLVER and self.ttl_s is NONE_RESOLVER:
            return None  # a get, or an init without a TTL argument
        value = self.ttl_ms(args, kwargs, bound)
        scale = 1.0
        if value is None:
            value = self.ttl_s(args, kwargs, bound)
            scale = 1000.0
        if value is None:
            return None
        if hasattr(value, "total_seconds"):  # datetime.timedelta
            return int(value.total_seconds() * 1000)
        try:
            return int(float(value) * scale)
        except (TypeError, ValueError):
            return None


class _Call:
    """One decorated call: its span, its context token, its outcome."""

    __slots__ = (
        "client",
        "config",
        "duration_s",
        "info",
        "key",
        "node_id",
        "race_of",
        "run_id",
        "span",
        "spec",
        "started",
        "token",
        "ttl_ms",
    )

    def __init__(
        self,
        spec: _Spec,
        config: SubflowConfig,
        run_id: str | None,
        node_id: str | None,
        key: str | None,
        client: Any,
        ttl_ms: int | None,
    ) -> None:
        self.spec = spec
        self.config = config
        self.run_id = run_id
        self.node_id = node_id
        self.key = key
        self.client = client
        self.ttl_ms = ttl_ms
        self.info: ConnectionInfo | None = connection_info(client) if client is not None else None
        self.span: trace.Span = trace.INVALID_SPAN
        self.token: object | None = None
        self.started = 0.0
        self.duration_s = 0.0
        self.race_of: Any = None

    @property
    def needs_ids(self) -> bool:
        return self.info is not None and self.info.needs_fetch()

    def start(self) -> None:
        try:
            spec = self.spec
            attrs: dict[str, Any] = {}
            if self.run_id is not None:
                attrs[names.ATTR_RUN_ID] = self.run_id
            if self.node_id is not None:
                attrs[names.ATTR_NODE_ID] = self.node_id
            if self.key is not None:
                attrs[names.ATTR_STATE_KEY] = self.key
            if self.info is not None:
                attrs.update(self.info.span_attributes())
            if self.ttl_ms is not None:
                attrs[names.ATTR_STATE_TTL_MS] = self.ttl_ms
            links = None
            if spec.operation == names.OPERATION_INIT and self.key is not None:
                self.race_of = recent_misses.take(self.key)
                if self.race_of is not None:
                    links = [Link(self.race_of.span_context, {names.ATTR_STATE_KEY: self.key})]
            ctx = with_run_context(self.run_id, self.node_id)
            self.span = spec.instruments.tracer.start_span(
                spec.span_name, context=ctx, kind=SpanKind.INTERNAL, attributes=attrs, links=links
            )
            if self.race_of is not None:
                self.span.add_event(names.EVENT_STATE_RACE, self.race_of.event_attributes())
            self.token = otel_context.attach(trace.set_span_in_context(self.span, ctx))
        except Exception as exc:
            if not _swallowed("decorator.start", exc):
                raise
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

    def fail(self, exc: BaseException) -> None:
        """The wrapped function raised: outcome ``error``, never ``miss``."""
        self.stop_clock()
        with internal_errors("decorator.fail"):
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
            self._finish(names.OUTCOME_ERROR)

    def classify(self, result: Any) -> str:
        """The outcome of a call that returned."""
        self.stop_clock()
        if self.spec.operation == names.OPERATION_INIT:
            return names.OUTCOME_CREATED
        try:
            return names.OUTCOME_MISS if self.spec.is_missing(result) else names.OUTCOME_HIT
        except Exception as exc:
            if not _swallowed("decorator.is_missing", exc):
                raise
        return names.OUTCOME_HIT

    def succeed(self, outcome: str) -> None:
        try:
            self.span.set_attribute(names.ATTR_STATE_OUTCOME, outcome)
            if outcome == names.OUTCOME_CREATED:
                journal = journal_for(self.client, self.config)
                if journal is not None:
                    journal.record_init(self)
                watching.notice(self.client)
            elif outcome == names.OUTCOME_MISS:
                watching.notice(self.client)
            self._finish(outcome)
        except Exception as exc:
            if not _swallowed("decorator.succeed", exc):
                raise

    def _finish(self, outcome: str) -> None:
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
        except Exception as exc:
            if not _swallowed("decorator.end", exc):
                raise
        if self.token is not None:
            try:
                otel_context.detach(cast(Any, self.token))
            except Exception as exc:
                if not _swallowed("decorator.detach", exc):
                    raise


def _sync_wrapper(spec: _Spec) -> Callable[..., Any]:
    func = spec.func

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = spec.begin(args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        call.start()
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            call.fail(exc)
            call.end()
            raise
        try:
            outcome = call.classify(result)
            if call.needs_ids and call.info is not None:
                # Once per pool, after a call that worked: the server is up and the
                # connection warm, so this one round trip cannot hang on a dead server.
                fetch_ids_sync(call.client, call.info, call.config.analysis_timeout_s)
                call.add_ids()
            if outcome == names.OUTCOME_MISS:
                with internal_errors("decorator.miss"):
                    emit_verdict(call, analyze_miss_sync(call))
            call.succeed(outcome)
        finally:
            call.end()
        return result

    return wrapper


def _async_wrapper(spec: _Spec) -> Callable[..., Any]:
    func = spec.func

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = spec.begin(args, kwargs)
        if call is None:
            return await func(*args, **kwargs)
        call.start()
        try:
            result = await func(*args, **kwargs)
        except BaseException as exc:
            call.fail(exc)
            call.end()
            raise
        try:
            outcome = call.classify(result)
            if call.needs_ids and call.info is not None:
                await fetch_ids_async(call.client, call.info, call.config.analysis_timeout_s)
                call.add_ids()
            if outcome == names.OUTCOME_MISS:
                with internal_errors("decorator.miss"):
                    emit_verdict(call, await analyze_miss_async(call))
            call.succeed(outcome)
        finally:
            call.end()
        return result

    return wrapper


def _decorate(operation: str, **options: Any) -> Callable[[F], F]:
    def decorator(func: F) -> F:
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            # Calling it only creates the generator: the span would end before any Redis call,
            # and the generator object would be taken for the state (a hit).
            warn_decoration(func, "is a generator function: the span would measure creating the generator, "
                                  "not reading or writing the state; decorate the function that does the I/O")
        spec = _Spec(func, operation, **options)
        wrapper = _async_wrapper(spec) if inspect.iscoroutinefunction(func) else _sync_wrapper(spec)
        wrapper.__subflow_spec__ = spec  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return decorator


def instrument_state_get(
    *,
    run_id: ArgSource = "run_id",
    node_id: ArgSource = "node_id",
    key: KeySource | None = None,
    client: ArgSource | None = None,
    is_missing: Callable[[Any], bool] | None = None,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    config: SubflowConfig | None = None,
) -> Callable[[F], F]:
    """Trace a function that reads a sub-flow state; explain every miss.

    Works on plain functions and methods, sync and ``async def``. By default the
    run and node come from arguments named ``run_id`` / ``node_id``, the key is
    ``subflow:state:{run_id}:{node_id}``, the client is an argument ``redis`` or
    ``client`` (or ``self.redis`` / ``self.client``), and ``None`` means missing::

        @instrument_state_get()
        def get_state(redis, run_id, node_id):
            return redis.get(f"subflow:state:{run_id}:{node_id}")

    Each source may be a parameter name or a callable of the bound arguments
    (``run_id=lambda a: a["job"].run``); ``key`` may be a template naming any
    parameter. The function returns and raises exactly what it would undecorated.
    """
    return _decorate(
        names.OPERATION_GET,
        run_id=run_id,
        node_id=node_id,
        key=key,
        client=client,
        ttl_ms=None,
        ttl_s=None,
        is_missing=is_missing,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        config=config,
    )


def instrument_state_init(
    *,
    run_id: ArgSource = "run_id",
    node_id: ArgSource = "node_id",
    key: KeySource | None = None,
    client: ArgSource | None = None,
    ttl_ms: ArgSource | None = None,
    ttl: ArgSource | None = None,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    config: SubflowConfig | None = None,
) -> Callable[[F], F]:
    """Trace a function that writes a sub-flow state, and journal the write.

    Same sources as :func:`instrument_state_get`, plus the TTL: an argument
    ``ttl_ms`` (milliseconds) or ``ttl`` (seconds or a ``timedelta``) by default::

        @instrument_state_init()
        def initialize_state(redis, run_id, node_id, data, ttl_ms=60_000):
            redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms)
    """
    return _decorate(
        names.OPERATION_INIT,
        run_id=run_id,
        node_id=node_id,
        key=key,
        client=client,
        ttl_ms=ttl_ms,
        ttl_s=ttl,
        is_missing=None,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        config=config,
    )
