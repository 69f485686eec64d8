"""``CeleryResultInstrumentor``: Celery's Redis result backend, read and written, traced and explained.

``CeleryResultInstrumentor().instrument()`` (or ``opentelemetry-instrument`` with Celery installed:
entry point ``opentelemetry_instrumentor`` ``celery_results``) wraps, with the package's own
decorators, Celery's ``RedisBackend`` (and so ``SentinelBackend``):

- **result reads**: the backend's ``_get_task_meta_for(task_id)``, which every public read goes
  through (``AsyncResult(id).state``, ``.result``, ``.ready()``, the checks of ``.get()``). A key
  that is not there comes back as Celery's bare PENDING meta (no ``task_id`` in it): that is the
  miss, and it is analysed. The backend's own read inside a store (its check that a success is
  never overwritten) is not a read of the user's and is not traced, nor are the polls of
  ``AsyncResult.get()``: a caller waiting for a result knows it may not be there yet.
- **result writes**: ``_store_result`` (STARTED, SUCCESS, FAILURE, RETRY, ...), with the TTL
  Celery gives the key (``result_expires``; a failure's ``result_failure_expires``). A store
  Celery skips because the task already succeeded is ``not_written``.
- **a chord's join state**: the chord's size (``<group key>.s``, written where the chord is
  applied) and its results (``<group key>.j``, appended by each header task's
  ``on_chord_part_return``). Both are inits of the group's run. Before a header task appends, one
  pipelined read of ours (``EXISTS .j``, ``EXISTS .s``, ``GET .c``) checks the join state: the
  ``subflow.state.get`` span of the join state. It misses when the results or the size are gone
  although the run's journal shows them written (an earlier header task's append, the size, or
  their tombstones): Celery then never runs the chord's callback, and the span's verdict says why.
  A header task that finds the results not there yet, and no sign they ever were (the first one),
  has no read span; when either key is absent the check costs one more round trip, to the journal.

The map: the **run** is the task id of a result (a result's key, and so its reader, knows only
that id; for a task started on its own it is also Celery's ``root_id``), and the group id of a
chord's join state. The **node** is the task's name where Celery knows it: the worker's writes,
and a read's hit when ``result_extended`` stores the name. A worker's spans also carry the
workflow's root as ``celery.root_id``. Keys are Celery's own, with any ``global_keyprefix``; their
templates are registered for every keyspace watcher of the process as soon as a backend is seen.
Importing this module imports Celery; the core never does.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Callable, Collection, Mapping
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.result import AsyncResult
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from otel_subflow import names
from otel_subflow._boundary import swallow
from otel_subflow._config import get_config
from otel_subflow._instrument.context import add_run_context
from otel_subflow._instrument.decorators import instrument_state_get, instrument_state_init
from otel_subflow._journal.location import journal_target
from otel_subflow._journal.schema import OP_INIT, TOMBSTONE_OPS
from otel_subflow._journal.store import read_run
from otel_subflow._redis.clients import Target
from otel_subflow._runtime import runtime
from otel_subflow._watch.lease import start_watching, stop_watching
from otel_subflow.integrations._patches import Patches

#: The join-state keys of a chord (suffixes of its group key) whose loss Celery cannot recover from:
#: the results so far, the chord's size, and the adjustment of the size (``add_to_chord``).
RESULTS, SIZE, SIZE_DIFF = ".j", ".s", ".t"
#: Celery 5.7's claim key of a chord; ``done`` once the callback was sent.
CLAIM, CLAIM_DONE = ".c", b"done"
#: The span attribute naming the workflow a worker's call belongs to.
ATTR_ROOT_ID = "celery.root_id"

Arguments = Mapping[str, Any]


@dataclasses.dataclass
class _Store:
    """One ``_store_result`` call: whether Celery's own check found the task already succeeded."""

    skipped: bool = False


#: Set while ``AsyncResult.get()`` waits: its polls of a result not stored yet are no misses.
_WAITING: contextvars.ContextVar[bool] = contextvars.ContextVar("otel_subflow_celery_waiting", default=False)
#: Set while the backend stores a result: its own read of the current meta belongs to the store.
_IN_STORE: contextvars.ContextVar[_Store | None] = contextvars.ContextVar("otel_subflow_celery_store", default=None)


@dataclasses.dataclass(frozen=True)
class _Stored:
    value: Any
    wrote: bool


def _text(key: str | bytes) -> str:
    return key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key


def _register_templates(backend: Any) -> None:
    """This backend's key layout (its prefixes, ``global_keyprefix`` included), for every watcher.

    The group's suffixed keys first: a watcher tries templates in the order they were registered."""
    group, task = _text(backend.group_keyprefix), _text(backend.task_keyprefix)
    for suffix in (RESULTS, SIZE, SIZE_DIFF):
        runtime.key_templates.add(group + "{run_id}" + suffix)
    runtime.key_templates.add(task + "{run_id}")


def _task_key(arguments: Arguments) -> str:
    backend = arguments["self"]
    _register_templates(backend)
    return _text(backend.get_key_for_task(arguments["task_id"]))


def _group_key(backend: Any, group_id: str, suffix: str) -> str:
    _register_templates(backend)
    return _text(backend.get_key_for_group(group_id, suffix))


def _backend_client(arguments: Arguments) -> Any:
    return arguments["self"].client


def _seconds(value: Any) -> float | None:
    """A Celery expiry (seconds, a timedelta, ``None`` or 0: never) as the TTL of an init."""
    if hasattr(value, "total_seconds"):
        value = value.total_seconds()
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _store_ttl(arguments: Arguments) -> float | None:
    backend = arguments["self"]
    if arguments.get("state") == states.FAILURE:
        return _seconds(getattr(backend, "failure_expires", backend.expires))
    return _seconds(backend.expires)


def _chord_ttl(backend: Any) -> float | None:
    return _seconds(getattr(backend, "chord_expires", backend.expires))


def _is_missing(meta: Any) -> bool:
    """Celery's answer for a key that is not there: a bare PENDING meta (a stored one has its task id)."""
    return isinstance(meta, dict) and meta.get("status") == states.PENDING and meta.get("task_id") is None


def _mark_request(request: Any) -> None:
    root = getattr(request, "root_id", None)
    if root:
        trace.get_current_span().set_attribute(ATTR_ROOT_ID, str(root))


class CeleryResultInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Trace Celery's result reads and writes and its chords' join state; explain every miss.

    ``instrument(tracer_provider=..., meter_provider=..., watch=True)``; ``watch=False`` does not take
    part in the keyspace watcher election (``OTEL_SUBFLOW_WATCH=false`` does the same for everything).

    Example::

        from otel_subflow.integrations.celery import CeleryResultInstrumentor
        CeleryResultInstrumentor().instrument()
    """

    _patches = Patches()
    _watching = False

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("celery >= 5.3",)

    def _instrument(self, **kwargs: Any) -> None:
        providers = {k: kwargs[k] for k in ("tracer_provider", "meter_provider") if kwargs.get(k) is not None}
        patch = CeleryResultInstrumentor._patches.replace
        backend = RedisBackend
        patch(backend, "_get_task_meta_for", _read(backend._get_task_meta_for, providers))
        patch(AsyncResult, "get", _waits(AsyncResult.get))
        patch(backend, "_store_result", _store(backend._store_result, providers))
        patch(backend, "set_chord_size", _chord_size(backend.set_chord_size, providers))
        patch(backend, "on_chord_part_return", _part_return(backend.on_chord_part_return, providers))
        add_run_context(kwargs.get("tracer_provider"))
        if kwargs.get("watch", True):
            CeleryResultInstrumentor._watching = start_watching() is not None

    def _uninstrument(self, **kwargs: Any) -> None:
        CeleryResultInstrumentor._patches.restore()
        if CeleryResultInstrumentor._watching:
            CeleryResultInstrumentor._watching = False
            stop_watching(2.0)


def _read(original: Callable[..., Any], providers: dict[str, Any]) -> Callable[..., Any]:
    @instrument_state_get(run_id="task_id", node_id=lambda _a: None, key=_task_key, client=_backend_client,
                          is_missing=_is_missing, **providers)
    @functools.wraps(original)
    def traced(self: Any, task_id: Any) -> Any:
        meta = original(self, task_id)
        name = meta.get("name") if isinstance(meta, dict) else None
        if isinstance(name, str):  # stored with result_extended
            trace.get_current_span().set_attribute(names.ATTR_NODE_ID, name)
        return meta

    @functools.wraps(original)
    def read(self: Any, task_id: Any, *args: Any, **kwargs: Any) -> Any:
        store = _IN_STORE.get()
        if store is None and not _WAITING.get() and not args and not kwargs:
            return traced(self, task_id)
        meta = original(self, task_id, *args, **kwargs)
        if store is not None:  # the store's own check: a success is never overwritten
            store.skipped = isinstance(meta, dict) and meta.get("status") == states.SUCCESS
        return meta

    return read


def _waits(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _WAITING.set(True)
        try:
            return original(self, *args, **kwargs)
        finally:
            _WAITING.reset(token)

    return get


def _store(original: Callable[..., Any], providers: dict[str, Any]) -> Callable[..., Any]:
    @instrument_state_init(run_id="task_id", node_id=lambda a: getattr(a.get("request"), "task", None),
                           key=_task_key, client=_backend_client, ttl=_store_ttl, wrote=lambda s: s.wrote,
                           **providers)
    def traced(self: Any, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None,
               **kwargs: Any) -> _Stored:
        _mark_request(request)
        store = _Store()
        token = _IN_STORE.set(store)
        try:
            value = original(self, task_id, result, state, traceback=traceback, request=request, **kwargs)
        finally:
            _IN_STORE.reset(token)
        return _Stored(value, wrote=not store.skipped)

    @functools.wraps(original)
    def store_result(self: Any, *args: Any, **kwargs: Any) -> Any:
        return traced(self, *args, **kwargs).value

    return store_result


def _chord_size(original: Callable[..., Any], providers: dict[str, Any]) -> Callable[..., Any]:
    decorate = instrument_state_init(
        run_id="group_id", node_id=lambda _a: None, client=_backend_client,
        key=lambda a: _group_key(a["self"], a["group_id"], SIZE), ttl=lambda a: _chord_ttl(a["self"]), **providers)
    return functools.wraps(original)(decorate(original))


@dataclasses.dataclass(frozen=True)
class JoinState:
    """A chord's join state as a header task finds it, before appending its result."""

    results: bool  # the .j key holds the results of earlier header tasks
    size: bool  # the .s key holds the chord's size
    done: bool  # the callback was already sent (Celery 5.7's claim key)

    def missing_key(self, written_before: Callable[[], set[str]]) -> str | None:
        """The key of the join state that is gone although it was written (``None``: none is).

        Neither key being there is normal early on: the first header task creates the results, and
        Celery writes the size just before it sends the last header task, so the first ones may run
        before it. A key is missing only when the run's journal shows it was written."""
        if self.done or (self.results and self.size):
            return None
        written = written_before()
        for present, suffix in ((self.results, RESULTS), (self.size, SIZE)):
            if not present and suffix in written:
                return suffix
        return None


def _peek(backend: Any, group_id: str) -> JoinState | None:
    """One pipelined read of the join state, on our own short-timeout client (``None``: not known)."""
    target = Target.of_client(backend.client)
    if target is None:
        return None
    pipe = target.sync_client(get_config().analysis_timeout_s).pipeline(transaction=False)
    pipe.exists(_group_key(backend, group_id, RESULTS))
    pipe.exists(_group_key(backend, group_id, SIZE))
    pipe.get(_group_key(backend, group_id, CLAIM))
    results, size, claim = pipe.execute()
    return JoinState(results=bool(results), size=bool(size), done=claim == CLAIM_DONE)


def _written_before(backend: Any, group_id: str) -> set[str]:
    """Which join-state keys the run's journal shows written (an init, or a tombstone: it existed);
    this process's watcher's tombstones count at once, before they are flushed."""
    keys = {_group_key(backend, group_id, suffix): suffix for suffix in (RESULTS, SIZE)}
    written = {suffix for key, suffix in keys.items() if runtime.recent_tombstones.get(key) is not None}
    target = journal_target(backend.client, get_config())
    if target is not None and len(written) < len(keys):
        for entry in read_run(target.sync_client(get_config().analysis_timeout_s), group_id):
            if entry.key in keys and (entry.op == OP_INIT or entry.op in TOMBSTONE_OPS):
                written.add(keys[entry.key])
    return written


def _part_return(original: Callable[..., Any], providers: dict[str, Any]) -> Callable[..., Any]:
    @instrument_state_get(run_id="group_id", node_id="task", key=lambda a: a["key"],
                          client=lambda a: a["backend"].client, **providers)
    def join_state(backend: Any, group_id: str, task: str | None, key: str, found: bool) -> bool | None:
        return True if found else None

    def results_key(arguments: Arguments) -> str:
        return _group_key(arguments["self"], arguments["request"].group, RESULTS)

    @instrument_state_init(run_id=lambda a: a["request"].group, node_id=lambda a: a["request"].task,
                           key=results_key, client=_backend_client, ttl=lambda a: _chord_ttl(a["self"]),
                           **providers)
    def append(self: Any, request: Any, state: Any, result: Any, *args: Any, **kwargs: Any) -> Any:
        _mark_request(request)
        return original(self, request, state, result, *args, **kwargs)

    @functools.wraps(original)
    def on_chord_part_return(self: Any, request: Any, state: Any, result: Any, *args: Any, **kwargs: Any) -> Any:
        group_id, task = getattr(request, "group", None), getattr(request, "task", None)
        if not group_id or not getattr(request, "id", None) or not getattr(request, "chord", None):
            return original(self, request, state, result, *args, **kwargs)  # not a chord's header task
        try:
            found = _peek(self, group_id)
            missing = None if found is None else found.missing_key(lambda: _written_before(self, group_id))
        except Exception as exc:  # noqa: BLE001 - the boundary: a failed check costs only the read span
            swallow("celery join state", exc)
            found = missing = None
        if missing is not None:
            join_state(self, group_id, task, _group_key(self, group_id, missing), False)
        elif found is not None and found.results:
            join_state(self, group_id, task, _group_key(self, group_id, RESULTS), True)
        return append(self, request, state, result, *args, **kwargs)

    return on_chord_part_return


__all__ = ["ATTR_ROOT_ID", "CeleryResultInstrumentor", "JoinState"]
