"""Decoration-time resolution of where run id, node id, key, client and TTL come from.

Everything that can be decided from the signature is decided once, when the
decorator is applied; a call only picks values out of ``args`` / ``kwargs``.
A source that cannot work warns once, at decoration time, and then yields
``None`` at call time: never an exception inside the user's call.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import string
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from otel_subflow._redis.endpoint import is_redis_client
from otel_subflow._runtime import runtime

#: Where a value comes from: the name of a parameter, or a callable that gets
#: the call's bound arguments (a mapping of parameter name to value, defaults
#: applied) and returns the value.
ArgSource = str | Callable[[Mapping[str, Any]], Any]
#: A key template (``str.format`` fields name parameters, plus ``run_id`` and
#: ``node_id``), or a callable of the bound arguments returning the key.
KeySource = str | Callable[[Mapping[str, Any]], Any]

#: The exceptions that mean "no such state" (``missing_on=``): one type or a tuple of them.
ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]

_MISSING = object()


class SubflowInstrumentationWarning(UserWarning):
    """A decorator was applied in a way that cannot fully work (e.g. no such parameter)."""


def warn_decoration(func: Callable[..., Any], message: str) -> None:
    """Warn once, at decoration time, naming the decorated function."""
    qualname = getattr(func, "__qualname__", repr(func))
    warnings.warn(
        f"otel-subflow: {qualname}: {message}",
        SubflowInstrumentationWarning,
        stacklevel=4,
    )


class Signature:
    """The decorated function's signature, inspected once."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        try:
            self.sig: inspect.Signature | None = inspect.signature(func)
        except (TypeError, ValueError):
            self.sig = None
        params = list(self.sig.parameters.values()) if self.sig else []
        self.params = {p.name: p for p in params}
        self.positional = [
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        self.has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
        self.first = params[0].name if params else None

    def has(self, name: str) -> bool:
        return name in self.params or self.has_var_kw

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Mapping[str, Any] | None:
        """Bound arguments with defaults, or ``None`` when the call itself is wrong."""
        if self.sig is None:
            return None
        try:
            bound = self.sig.bind(*args, **kwargs)
        except TypeError:
            return None  # the wrapped function will raise its own TypeError
        bound.apply_defaults()
        return bound.arguments


class Getter:
    """Reads one argument out of a call without ``Signature.bind``: index, keyword or default."""

    __slots__ = ("default", "index", "kw_only", "name")

    def __init__(self, sig: Signature, name: str) -> None:
        self.name = name
        param = sig.params.get(name)
        self.index = sig.positional.index(name) if name in sig.positional else -1
        self.default = (
            param.default if param is not None and param.default is not param.empty else _MISSING
        )
        self.kw_only = param is None

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.name in kwargs:
            return kwargs[self.name]
        if 0 <= self.index < len(args):
            return args[self.index]
        return None if self.default is _MISSING else self.default


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class ClientCandidate:
    """One place the default lookup looks for the client: an argument, or an attribute of one (``self.redis``)."""

    getter: Getter
    attr: str | None = None

    @property
    def where(self) -> str:
        return self.getter.name if self.attr is None else f"{self.getter.name}.{self.attr}"

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value = self.getter(args, kwargs)
        return value if self.attr is None else getattr(value, self.attr, None)


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Resolver:
    """A value source compiled against a signature: call it with ``(args, kwargs, bound)``."""

    getter: Getter | None = None
    func: Callable[[Mapping[str, Any]], Any] | None = None
    #: The default client lookup: the first candidate that is a Redis client (others are skipped).
    clients: tuple[ClientCandidate, ...] = ()
    decorated: Callable[..., Any] | None = None

    @property
    def needs_bound(self) -> bool:
        return self.func is not None

    def __call__(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], bound: Mapping[str, Any] | None
    ) -> Any:
        if self.getter is not None:
            return self.getter(args, kwargs)
        if self.func is not None:
            return None if bound is None else self.func(bound)
        for candidate in self.clients:
            value = candidate(args, kwargs)
            if value is None:
                continue
            if is_redis_client(value):
                return value
            _skipped_client(self.decorated, candidate.where, value)
        return None


NONE_RESOLVER = Resolver()


def compile_source(sig: Signature, source: ArgSource | None, what: str) -> Resolver:
    """A resolver for a parameter name or a callable; warns when the parameter does not exist."""
    if source is None:
        return NONE_RESOLVER
    if callable(source):
        return Resolver(func=source)
    if sig.sig is not None and not sig.has(source):
        warn_decoration(sig.func, f"no parameter named {source!r} for the {what}")
        return NONE_RESOLVER
    return Resolver(getter=Getter(sig, source))


def _describe(value: object) -> str:
    if inspect.ismodule(value):
        return f"the module {value.__name__!r}"
    return f"a {type(value).__qualname__}"


def _skipped_client(func: Callable[..., Any] | None, where: str, value: object) -> None:
    """A default candidate that is not a Redis client, met at call time: said at most once a minute."""
    qualname = getattr(func, "__qualname__", repr(func))
    runtime.log.log(
        ("client-not-redis", qualname, where), logging.WARNING,
        "otel-subflow: %s: %s is %s, not a Redis client (no connection_pool or execute_command); it is "
        "not used: pass client=... to the decorator", qualname, where, _describe(value),
    )


def compile_client(
    sig: Signature, source: ArgSource | None, owner: Mapping[str, Any] | None = None
) -> Resolver:
    """The Redis client: given, or the first Redis client among an argument ``redis``/``client`` and
    ``self.redis``/``self.client``.

    ``owner`` is what is known at decoration of the class the function is a method of (its
    attributes so far): a ``redis``/``client`` class attribute that is no Redis client (Celery's
    ``RedisBackend.redis`` is the redis-py module) warns now, and is skipped at each call.
    """
    if source is not None:
        return compile_source(sig, source, "Redis client")
    candidates = [ClientCandidate(Getter(sig, name)) for name in ("redis", "client") if name in sig.params]
    if sig.first in ("self", "cls"):
        candidates += [ClientCandidate(Getter(sig, sig.first), attr) for attr in ("redis", "client")]
    if not candidates:
        if sig.sig is not None:
            warn_decoration(
                sig.func,
                "cannot find the Redis client (no 'redis'/'client' argument, not a method); "
                "pass client=... to get connection attributes and miss analysis",
            )
        return NONE_RESOLVER
    check_default_client(sig, candidates, owner)
    return Resolver(clients=tuple(candidates), decorated=sig.func)


def check_default_client(
    sig: Signature, candidates: list[ClientCandidate], owner: Mapping[str, Any] | None
) -> None:
    """Warn (at decoration) about default candidates already known not to be Redis clients: an
    argument's default value, or a class attribute of ``owner``."""
    for candidate in candidates:
        if candidate.attr is None:
            param = sig.params.get(candidate.getter.name)
            value = None if param is None or param.default is param.empty else param.default
        else:
            value = owner.get(candidate.attr) if owner is not None else None
            if hasattr(type(value), "__get__"):
                continue  # a property or a method: what it gives is known only on an instance
        if value is not None and not is_redis_client(value):
            warn_decoration(
                sig.func,
                f"the default client lookup finds {candidate.where} = {_describe(value)}, which is not a "
                "Redis client (no connection_pool or execute_command); it is skipped at each call "
                "(the next of redis, client, self.redis, self.client is tried): pass client=...",
            )


def compile_exception_types(sig: Signature, types: ExceptionTypes) -> tuple[type[BaseException], ...]:
    """``missing_on=`` as a tuple of exception classes; anything else warns and is left out."""
    given = types if isinstance(types, tuple) else (types,)
    kept = tuple(t for t in given if isinstance(t, type) and issubclass(t, BaseException))
    if len(kept) != len(given):
        bad = [t for t in given if t not in kept]
        warn_decoration(sig.func, f"missing_on={bad!r}: not exception classes, left out")
    return kept


class KeyTemplate:
    """A ``str.format`` key template whose fields are checked at decoration time."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.fields: list[str] = []
        for _, field, _, _ in string.Formatter().parse(template):
            if field is None:
                continue
            base = field.split(".", 1)[0].split("[", 1)[0]
            if not base or base.isdigit():
                raise ValueError(f"key template {template!r}: positional fields are not supported")
            self.fields.append(base)

    def format(self, values: Mapping[str, Any]) -> str:
        return self.template.format_map(values)


def compile_key(sig: Signature, source: KeySource | None, default_template: str) -> tuple[
    KeyTemplate | None, Callable[[Mapping[str, Any]], Any] | None, dict[str, Getter]
]:
    """Compile the key source. Returns (template, callable, getters for extra template fields)."""
    if source is not None and callable(source):
        return None, source, {}
    raw = default_template if source is None else source
    try:
        template = KeyTemplate(raw)
    except ValueError as exc:
        warn_decoration(sig.func, f"{exc}; the key attribute is left out")
        return None, None, {}
    extra: dict[str, Getter] = {}
    for field in template.fields:
        if field in ("run_id", "node_id"):
            continue
        if sig.sig is not None and not sig.has(field):
            warn_decoration(
                sig.func,
                f"key template {raw!r} names {field!r}, which is not a parameter; "
                "the key attribute is left out",
            )
            return None, None, {}
        extra[field] = Getter(sig, field)
    return template, None, extra


def normalize_id(value: Any, max_length: int) -> str | None:
    """A run or node id as a bounded string: bytes decoded, other types ``str()``-ed."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", "backslashreplace")
    else:
        text = str(value)
    if not text.isascii():
        text = utf8_safe(text)
    return text if len(text) <= max_length else text[:max_length]


def utf8_safe(text: str) -> str:
    """``text``, with anything UTF-8 cannot encode (lone surrogates) backslash-escaped.

    Such a ``str`` (from ``surrogateescape`` decoding, say) would fail the whole
    journal batch or span export it lands in, not only its own record.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def key_field_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Template values as the service would see them when building its own key."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "backslashreplace")
        out[name] = value
    return out


