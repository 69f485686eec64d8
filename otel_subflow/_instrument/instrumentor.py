"""``SubflowInstrumentor``: the decorators applied by name, for zero-code setups.

Under ``opentelemetry-instrument`` (entry point ``opentelemetry_instrumentor``)
it reads ``OTEL_SUBFLOW_INSTRUMENT_GET`` / ``OTEL_SUBFLOW_INSTRUMENT_INIT``, each
a comma-separated list of ``module:Qualname.method`` targets, and wraps them
with :func:`instrument_state_get` / :func:`instrument_state_init`. A target may
carry the decorator's options in brackets, separated by ``;``::

    engine.state:Store.get[key=wf:{run}:{step};run_id=run;node_id=step;client=self.db;missing=empty]

``run_id``, ``node_id``, ``client``, ``ttl_ms`` and ``ttl`` name a parameter or an
attribute path from one (``self.db``, ``job.run_id``); ``key`` is a template of
parameter names; ``missing`` is ``none`` (the default: ``None`` is missing),
``empty`` (``None`` or an empty value) or ``falsy``. A target module not yet
imported is wrapped as soon as it is imported. It also adds the run-context span
processor to the SDK's tracer provider, so that spans inside a decorated call (the
Redis command spans) carry the run and node ids.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import operator
import os
import sys
import threading
import types
from collections.abc import Callable, Collection, Sequence
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from otel_subflow import names
from otel_subflow._instrument.context import add_run_context
from otel_subflow._instrument.decorators import instrument_state_get, instrument_state_init
from otel_subflow._watch.lease import start_watching, stop_watching

_log = logging.getLogger(names.LOGGER_NAME)

ENV_GET = "OTEL_SUBFLOW_INSTRUMENT_GET"
ENV_INIT = "OTEL_SUBFLOW_INSTRUMENT_INIT"


#: Options a target may carry, and the missing markers by name.
OPTIONS = ("run_id", "node_id", "key", "client", "ttl_ms", "ttl", "missing")
_MISSING_MARKERS: dict[str, Callable[[Any], bool] | None] = {
    "none": None,
    "empty": lambda value: value is None or (hasattr(value, "__len__") and len(value) == 0),
    "falsy": lambda value: not value,
}


def _split_top(raw: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets (an option's key template may hold commas)."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in raw:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_targets(raw: str | None) -> list[tuple[str, list[str], dict[str, str]]]:
    """``"pkg.mod:Class.method[key=k:{run_id};missing=empty], other:func"`` ->
    ``[("pkg.mod", ["Class", "method"], {"key": "k:{run_id}", "missing": "empty"}), ...]``."""
    targets = []
    for item in _split_top(raw or "", ","):
        item = item.strip()
        if not item:
            continue
        spec, _, rest = item.partition("[")
        module, sep, qualname = spec.partition(":")
        if not sep or not module.strip() or not qualname.strip() or (rest and not rest.endswith("]")):
            _log.warning("otel-subflow: ignoring instrumentation target %r (expected module:Qualname[options])",
                         item)
            continue
        options: dict[str, str] = {}
        bad = False
        for option in (rest[:-1].split(";") if rest else []):
            if not option.strip():
                continue
            name, eq, value = option.partition("=")
            name = name.strip()
            if not eq or name not in OPTIONS or (name == "missing" and value.strip() not in _MISSING_MARKERS):
                _log.warning("otel-subflow: ignoring instrumentation target %r: bad option %r (options: %s; "
                             "missing: %s)", item, option, ", ".join(OPTIONS), ", ".join(_MISSING_MARKERS))
                bad = True
                break
            options[name] = value.strip()
        if not bad:
            targets.append((module.strip(), [part for part in qualname.strip().split(".") if part], options))
    return targets


def _source(path: str) -> str | Callable[[Any], Any]:
    """A parameter name as is; ``self.db.client`` as a getter of the bound arguments."""
    first, _, rest = path.partition(".")
    if not rest:
        return first
    getter = operator.attrgetter(rest)

    def source(arguments: Any) -> Any:
        # An attribute the object lacks is a value the call does not give (None), as for a
        # parameter: never a failure that would leave the whole call untraced.
        try:
            return getter(arguments[first])
        except (KeyError, AttributeError):
            return None

    return source


def decorator_options(options: dict[str, str], operation: str) -> dict[str, Any]:
    """The keyword arguments of the decorator a target's options stand for."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name == "key":
            out["key"] = value
        elif name == "missing":
            if operation == names.OPERATION_GET:
                out["is_missing"] = _MISSING_MARKERS[value]
        elif name in ("ttl_ms", "ttl"):
            if operation == names.OPERATION_INIT:
                out[name] = _source(value)
        else:
            out[name] = _source(value)
    return out


class _Patch:
    def __init__(self, owner: Any, attr: str, original: Any) -> None:
        self.owner, self.attr, self.original = owner, attr, original

    def undo(self) -> None:
        setattr(self.owner, self.attr, self.original)


def _wrap(module: types.ModuleType, path: Sequence[str], decorator: Callable[[Any], Any]) -> _Patch | None:
    owner: Any = module
    for part in path[:-1]:
        owner = getattr(owner, part, None)
        if owner is None:
            _log.warning("otel-subflow: %s has no %s", module.__name__, ".".join(path))
            return None
    attr = path[-1]
    raw = owner.__dict__.get(attr) if hasattr(owner, "__dict__") else None
    if raw is None:
        raw = getattr(owner, attr, None)
    if raw is None:
        _log.warning("otel-subflow: %s has no %s", module.__name__, ".".join(path))
        return None
    if getattr(raw, "__subflow_spec__", None) is not None:
        return None  # already decorated by hand
    if isinstance(raw, (staticmethod, classmethod)):
        wrapped: Any = type(raw)(decorator(raw.__func__))
    else:
        wrapped = decorator(raw)
    spec = getattr(getattr(wrapped, "__func__", wrapped), "__subflow_spec__", None)
    if spec is not None and isinstance(owner, type):
        spec.check_owner(owner)  # the class is built: its self.redis / self.client can be checked now
    setattr(owner, attr, wrapped)
    return _Patch(owner, attr, raw)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a named module finishes importing."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Callable[[types.ModuleType], None]]] = {}
        self._local = threading.local()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.pending or getattr(self._local, "busy", False):
            return None
        self._local.busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._local.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        loader = spec.loader
        callbacks = self.pending.pop(fullname)
        original_exec = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            original_exec(module)
            for callback in callbacks:
                callback(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        found: importlib.machinery.ModuleSpec = spec
        return found


class SubflowInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instrument the functions named in ``OTEL_SUBFLOW_INSTRUMENT_GET`` / ``_INIT``.

    Example::

        OTEL_SUBFLOW_INSTRUMENT_GET=engine.state:StateStore.get_state \\
        OTEL_SUBFLOW_INSTRUMENT_INIT=engine.state:StateStore.initialize_state \\
        opentelemetry-instrument python -m engine
    """

    _hook: _PostImportHook | None = None
    #: On the class: BaseInstrumentor is a singleton whose ``__init__`` runs on every
    #: ``SubflowInstrumentor()``, so ``SubflowInstrumentor().uninstrument()`` undoes what another did.
    _patches: list[_Patch] = []

    def instrumentation_dependencies(self) -> Collection[str]:
        return []

    def _instrument(self, **kwargs: Any) -> None:
        options = {k: kwargs[k] for k in ("tracer_provider", "meter_provider") if k in kwargs}
        get_targets = kwargs.get("get_targets") or os.environ.get(ENV_GET)
        init_targets = kwargs.get("init_targets") or os.environ.get(ENV_INIT)
        factories = ((get_targets, instrument_state_get, names.OPERATION_GET),
                     (init_targets, instrument_state_init, names.OPERATION_INIT))
        for raw, factory, operation in factories:
            for module_name, path, target_options in parse_targets(raw):
                decorator = factory(**options, **decorator_options(target_options, operation))  # type: ignore[operator]
                self._apply(module_name, path, decorator)
        if get_targets or init_targets:
            add_run_context(kwargs.get("tracer_provider"))
            start_watching()  # one keyspace watcher per master, elected (OTEL_SUBFLOW_WATCH=false: off)

    def _apply(self, module_name: str, path: list[str], decorator: Callable[[Any], Any]) -> None:
        def patch(module: types.ModuleType) -> None:
            done = _wrap(module, path, decorator)
            if done is not None:
                SubflowInstrumentor._patches.append(done)

        module = sys.modules.get(module_name)
        if module is not None:
            patch(module)
            return
        hook = SubflowInstrumentor._hook
        if hook is None:
            hook = SubflowInstrumentor._hook = _PostImportHook()
            sys.meta_path.insert(0, hook)
        hook.pending.setdefault(module_name, []).append(patch)

    def _uninstrument(self, **kwargs: Any) -> None:  # (the run-context processor stays: it is harmless)
        stop_watching(2.0)
        while SubflowInstrumentor._patches:
            SubflowInstrumentor._patches.pop().undo()
        if SubflowInstrumentor._hook is not None:
            SubflowInstrumentor._hook.pending.clear()


__all__ = ["SubflowInstrumentor"]
