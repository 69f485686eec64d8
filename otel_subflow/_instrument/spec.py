"""What a decorator knows, computed once at decoration time: :class:`DecoratorSpec`.

Where the run id, node id, key, client and TTL come from in the decorated function's
arguments (compiled by ``args.py``), and the instruments its calls record with. Each
call then resolves its values through the spec (:meth:`DecoratorSpec.begin`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from otel_subflow import names
from otel_subflow._boundary import swallow
from otel_subflow._config import SubflowConfig, get_config
from otel_subflow._instrument.args import (
    NONE_RESOLVER,
    ArgSource,
    ExceptionTypes,
    Getter,
    KeySource,
    Resolver,
    Signature,
    check_default_client,
    compile_client,
    compile_exception_types,
    compile_key,
    compile_source,
    key_field_values,
    normalize_id,
)
from otel_subflow._instrument.call import DecoratedCall
from otel_subflow._redis.cluster import is_cluster, node_client
from otel_subflow._runtime import runtime
from otel_subflow._telemetry.instruments import Instruments, default_instruments


def _default_is_missing(result: object) -> bool:
    return result is None


class DecoratorSpec:
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
        missing_on: ExceptionTypes,
        wrote: Callable[[Any], bool] | None,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        config: SubflowConfig | None,
        owner: Mapping[str, Any] | None = None,
    ) -> None:
        self.func = func
        self.operation = operation
        self.span_name = names.SPAN_STATE_GET if operation == names.OPERATION_GET else names.SPAN_STATE_INIT
        self._config = config
        sig = Signature(func)
        self.sig = sig
        self.run_id = compile_source(sig, run_id, "run id")
        self.node_id = compile_source(sig, node_id, "node id")
        self.client = compile_client(sig, client, owner)
        self.ttl_ms = self._optional_source(sig, ttl_ms, "ttl_ms")
        self.ttl_s = self._optional_source(sig, ttl_s, "ttl")
        self.is_missing = is_missing or _default_is_missing
        self.missing_on = compile_exception_types(sig, missing_on)
        self.wrote = wrote
        template_source = key if key is not None else self.config.key_template
        self.key_template, self.key_func, self.key_fields = compile_key(
            sig, template_source, self.config.key_template
        )
        if self.key_template is not None:  # (a callable key says nothing a watcher could parse)
            runtime.key_templates.add(self.key_template.template)
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
            for outcome in (names.OUTCOME_HIT, names.OUTCOME_MISS, names.OUTCOME_CREATED, names.OUTCOME_NOT_WRITTEN,
                            names.OUTCOME_ERROR)
        }

    @property
    def config(self) -> SubflowConfig:
        return self._config if self._config is not None else get_config()

    def check_owner(self, owner: type) -> None:
        """Warn now if the default client lookup would meet a class attribute of ``owner`` that is no
        Redis client (for methods decorated after their class was built: the instrumentors)."""
        if self.client.clients:
            attrs = {name: inspect.getattr_static(owner, name, None) for name in ("redis", "client")}
            check_default_client(self.sig, list(self.client.clients), attrs)

    @staticmethod
    def _optional_source(sig: Signature, source: ArgSource | None, default_name: str) -> Resolver:
        """TTL sources: a default name that is absent is fine (no warning), an explicit one must exist."""
        if source is None:
            if default_name in sig.params:
                return Resolver(getter=Getter(sig, default_name))
            return NONE_RESOLVER
        return compile_source(sig, source, "TTL")

    def begin(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DecoratedCall | None:
        """Resolve this call's values and start its span; ``None`` when instrumentation is suppressed."""
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
            cluster = None
            if key is not None and is_cluster(client):  # the call is on the master serving the key's slot
                cluster, client = client, node_client(client, key) or client
            ttl_ms = self._ttl_ms(args, kwargs, bound)
            call = DecoratedCall(self, config, run_id, node_id, key, client, ttl_ms, cluster=cluster)
        except Exception as exc:  # noqa: BLE001 - the boundary
            swallow("decorator.begin", exc)
            return None
        call.start()
        return call

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
        if any(values.get(field) is None for field in self.key_template.fields):
            # A field the call did not give would be formatted as "None": a key nobody wrote.
            return None
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

