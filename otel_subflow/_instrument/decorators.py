"""``instrument_state_get`` / ``instrument_state_init``: spans, metrics and logs around existing functions.

Decoration compiles a :class:`~otel_subflow._instrument.spec.DecoratorSpec` once and
picks the sync or async wrapper. Both wrappers drive a
:class:`~otel_subflow._instrument.call.DecoratedCall`; they differ only where awaiting
differs (the one-off id fetch and the miss analysis). The wrapped function's return
value or exception passes through untouched.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from otel_subflow import names
from otel_subflow._config import SubflowConfig
from otel_subflow._instrument.args import ArgSource, ExceptionTypes, KeySource, warn_decoration
from otel_subflow._instrument.spec import DecoratorSpec

F = TypeVar("F", bound=Callable[..., Any])


def _sync_wrapper(spec: DecoratorSpec) -> Callable[..., Any]:
    func = spec.func

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = spec.begin(args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            call.raised_sync(exc)
            raise  # the same exception, its traceback untouched (also when missing_on made it a miss)
        call.returned_sync(result)
        return result

    return wrapper


def _async_wrapper(spec: DecoratorSpec) -> Callable[..., Any]:
    func = spec.func

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = spec.begin(args, kwargs)
        if call is None:
            return await func(*args, **kwargs)
        try:
            result = await func(*args, **kwargs)
        except BaseException as exc:
            await call.raised_async(exc)
            raise
        await call.returned_async(result)
        return result

    return wrapper


def _class_body(func: Callable[..., Any]) -> Mapping[str, Any] | None:
    """The class attributes defined so far when ``func`` is decorated in its class's body.

    The class does not exist yet while its body runs, but the body's namespace does: enough to see,
    at decoration, that ``self.redis`` will be the redis-py module (Celery's ``RedisBackend``).
    """
    owner_name, dot, _ = getattr(func, "__qualname__", "").rpartition(".")
    if not dot or owner_name.endswith("<locals>"):
        return None
    try:
        frame = sys._getframe(2)  # _class_body <- decorator <- the class body
    except ValueError:  # pragma: no cover - a shallower stack than any class body
        return None
    try:
        namespace = frame.f_locals
        if namespace.get("__qualname__") == owner_name and "__module__" in namespace:
            return {name: namespace[name] for name in ("redis", "client") if name in namespace}
        return None
    finally:
        del frame


def _decorate(operation: str, **options: Any) -> Callable[[F], F]:
    def decorator(func: F) -> F:
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            # Calling it only creates the generator: the span would end before any Redis call,
            # and the generator object would be taken for the state (a hit).
            warn_decoration(func, "is a generator function: the span would measure creating the generator, "
                                  "not reading or writing the state; decorate the function that does the I/O")
        spec = DecoratorSpec(func, operation, owner=_class_body(func), **options)
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
    missing_on: ExceptionTypes = (),
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
    parameter. ``missing_on=(ResultNotFound,)``: these exceptions mean the state is missing (a miss,
    analysed like a ``None`` result), and are still raised to the caller unchanged. The function
    returns and raises exactly what it would undecorated.
    """
    return _decorate(names.OPERATION_GET, run_id=run_id, node_id=node_id, key=key, client=client, ttl_ms=None,
                     ttl_s=None, is_missing=is_missing, missing_on=missing_on, wrote=None,
                     tracer_provider=tracer_provider, meter_provider=meter_provider, config=config)


def instrument_state_init(
    *,
    run_id: ArgSource = "run_id",
    node_id: ArgSource = "node_id",
    key: KeySource | None = None,
    client: ArgSource | None = None,
    ttl_ms: ArgSource | None = None,
    ttl: ArgSource | None = None,
    wrote: Callable[[Any], bool] | None = None,
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

    ``wrote=lambda result: result is not None``: a predicate of the result saying whether the call
    wrote the state; a call that did not is not journalled (outcome ``not_written``).
    """
    return _decorate(names.OPERATION_INIT, run_id=run_id, node_id=node_id, key=key, client=client, ttl_ms=ttl_ms,
                     ttl_s=ttl, is_missing=None, missing_on=(), wrote=wrote, tracer_provider=tracer_provider,
                     meter_provider=meter_provider, config=config)
