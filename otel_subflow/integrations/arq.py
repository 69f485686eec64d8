"""``ArqInstrumentor``: arq's job results, read and written, traced and explained.

``ArqInstrumentor().instrument()`` (or ``opentelemetry-instrument`` with arq installed: entry point
``opentelemetry_instrumentor`` ``arq``) wraps, with the package's own decorators:

- reads: ``Job.result()`` (``ResultNotFound`` is a miss, re-raised unchanged), ``Job.result_info()``
  and ``Job.info()`` (``None`` is a miss), all of the key ``arq:result:<job_id>``;
- writes: ``Worker.finish_job`` and ``Worker.finish_failed_job``, where the worker stores the result
  (``SET arq:result:<job_id> ... PX keep_result``). A call that stores nothing (a retry, a job whose
  result is not kept) is outcome ``not_written`` and is not journalled.
- the job state: ``ArqRedis.enqueue_job`` writes the queued job (``arq:job:<job_id>``, with its
  expiry: ``_expires``, else the deferral plus the pool's ``expires_extra_ms``); it is an init, and
  ``not_written`` when arq refuses a duplicate id. The worker reads it when it takes the job from the
  queue; when it finds nothing, arq logs "job ... expired" and never runs the job: that read becomes
  a ``subflow.state.get`` miss on ``arq:job:<job_id>`` with its verdict (a read that finds the job is
  the job running, and has no span of its own).

The map: **run = the job id** (arq's generated one, or the ``_job_id`` the caller gave
``enqueue_job``), **node = the job's function name** (known to the worker when it stores the result;
on a read, from the result read: a miss's span has no node). Keys are templates
(``arq:result:{run_id}``), so every keyspace watcher of the process knows arq's result keys and
their expiry, eviction and deletion become tombstones of the job. The client is the worker's pool
or the ``ArqRedis`` the ``Job`` was given. Importing this module imports arq; the core never does.
"""

from __future__ import annotations

import contextvars
import functools
import uuid
from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timedelta
from typing import Any

import arq.connections
import arq.jobs
import arq.worker
from arq.constants import job_key_prefix, result_key_prefix
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from otel_subflow import names
from otel_subflow._instrument.context import add_run_context
from otel_subflow._instrument.decorators import instrument_state_get, instrument_state_init
from otel_subflow._watch.lease import start_watching, stop_watching
from otel_subflow.integrations._patches import Patches

#: arq's result key (``arq.constants.result_key_prefix`` + the job id), as a template of the run.
RESULT_KEY = result_key_prefix + "{run_id}"
#: arq's queued job (the job state), written by ``enqueue_job`` and deleted by the worker when it finishes.
JOB_KEY = job_key_prefix + "{run_id}"
#: What arq's worker records when the job state it takes from the queue is not there.
_JOB_GONE = "job expired"

#: (job id, function name) of the job this task runs: set where the worker serializes its result.
_JOB_FUNCTION: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "otel_subflow_arq_job_function", default=None)
#: Set while ``Job.info()`` runs: its own ``result_info()`` call is not a second read.
_IN_INFO: contextvars.ContextVar[bool] = contextvars.ContextVar("otel_subflow_arq_in_info", default=False)
#: The job id whose job state the worker found gone (set where it serializes the "job expired" failure).
_GONE: contextvars.ContextVar[str | None] = contextvars.ContextVar("otel_subflow_arq_gone", default=None)


def _job_of(arguments: Mapping[str, Any]) -> Any:
    return getattr(arguments["self"], "job_id", None)


def _job_client(arguments: Mapping[str, Any]) -> Any:
    return getattr(arguments["self"], "_redis", None)


def _worker_client(arguments: Mapping[str, Any]) -> Any:
    return getattr(arguments["self"], "pool", None)


def _function_of(arguments: Mapping[str, Any]) -> str | None:
    """The function of the job whose result the worker stores (set by ``serialize_result``)."""
    seen = _JOB_FUNCTION.get()
    return seen[1] if seen is not None and seen[0] == arguments.get("job_id") else None


def _finish_ttl(arguments: Mapping[str, Any]) -> float | None:
    return None if arguments.get("keep_result_forever") else arguments.get("result_timeout_s")


def _failed_ttl(arguments: Mapping[str, Any]) -> float | None:
    worker = arguments["self"]
    return None if getattr(worker, "keep_result_forever", False) else getattr(worker, "keep_result_s", None)


def _mark_node(result: Any) -> None:
    """On a hit, the node is the function named in the result read (the span is the current one)."""
    function = result.function if isinstance(result, arq.jobs.JobDef) else None  # (not a job's own return value)
    if isinstance(function, str):
        trace.get_current_span().set_attribute(names.ATTR_NODE_ID, function)


class ArqInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Trace arq's job result reads and writes; explain every missing result.

    ``instrument(tracer_provider=..., meter_provider=..., watch=True)``; ``watch=False`` does not take
    part in the keyspace watcher election (``OTEL_SUBFLOW_WATCH=false`` does the same for everything).
    """

    _patches = Patches()  # on the class: see _patches.py
    _watching = False

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("arq >= 0.25",)

    def _instrument(self, **kwargs: Any) -> None:
        providers = {k: kwargs[k] for k in ("tracer_provider", "meter_provider") if kwargs.get(k) is not None}
        job, worker = arq.jobs.Job, arq.worker.Worker
        self._patch(arq.worker, "serialize_result", _remember_function(vars(arq.worker)["serialize_result"]))
        self._patch(job, "result", _read(job.result, providers, missing_on=True))
        self._patch(job, "result_info", _read(job.result_info, providers, missing_on=False))
        self._patch(job, "info", _read(job.info, providers, missing_on=False, is_info=True))
        self._patch(worker, "finish_job", _write(worker.finish_job, providers, failed=False))
        self._patch(worker, "finish_failed_job", _write(worker.finish_failed_job, providers, failed=True))
        self._patch(arq.connections.ArqRedis, "enqueue_job", _enqueue(arq.connections.ArqRedis.enqueue_job, providers))
        add_run_context(kwargs.get("tracer_provider"))
        if kwargs.get("watch", True):
            ArqInstrumentor._watching = start_watching() is not None

    def _patch(self, owner: Any, attr: str, wrapped: Any) -> None:
        ArqInstrumentor._patches.replace(owner, attr, wrapped)

    def _uninstrument(self, **kwargs: Any) -> None:
        ArqInstrumentor._patches.restore()
        if ArqInstrumentor._watching:
            ArqInstrumentor._watching = False
            stop_watching(2.0)


def _remember_function(original: Callable[..., Any]) -> Callable[..., Any]:
    """``arq.worker.serialize_result`` noting the job's function for ``finish_job`` (same task)."""

    @functools.wraps(original)
    def serialize_result(*args: Any, **kwargs: Any) -> Any:
        function = kwargs.get("function", args[0] if args else None)
        job_id = kwargs.get("job_id", args[11] if len(args) > 11 else None)
        ref = kwargs.get("ref", args[9] if len(args) > 9 else None)
        if job_id is None and isinstance(ref, str) and isinstance(function, str) and ref.endswith(":" + function):
            job_id = ref[: -len(function) - 1]  # arq < 0.26 passes no job_id: its ref is "<job_id>:<function>"
        if isinstance(function, str) and isinstance(job_id, str):
            _JOB_FUNCTION.set((job_id, function))
            result = kwargs.get("result", args[6] if len(args) > 6 else None)
            if isinstance(result, arq.worker.JobExecutionFailed) and str(result) == _JOB_GONE:
                _GONE.set(job_id)
        return original(*args, **kwargs)

    return serialize_result


def _read(original: Callable[..., Any], providers: dict[str, Any], *, missing_on: bool,
          is_info: bool = False) -> Callable[..., Any]:
    decorate = instrument_state_get(
        run_id=_job_of, node_id=lambda _a: None, key=RESULT_KEY, client=_job_client,
        missing_on=(arq.jobs.ResultNotFound,) if missing_on else (), **providers,
    )

    @decorate
    @functools.wraps(original)
    async def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _IN_INFO.set(True) if is_info else None
        try:
            result = await original(self, *args, **kwargs)
        finally:
            if token is not None:
                _IN_INFO.reset(token)
        _mark_node(result)
        return result

    @functools.wraps(original)
    async def read(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _IN_INFO.get():  # Job.info()'s own result_info(): info() is the read
            return await original(self, *args, **kwargs)
        return await traced(self, *args, **kwargs)

    return read


def _write(original: Callable[..., Any], providers: dict[str, Any], *, failed: bool) -> Callable[..., Any]:
    decorate = instrument_state_init(
        run_id="job_id", node_id=_function_of, key=RESULT_KEY, client=_worker_client,
        ttl=_failed_ttl if failed else _finish_ttl, wrote=bool, **providers,
    )

    if failed:
        @decorate
        async def store(self: Any, job_id: str, result_data: bytes | None) -> bool:
            await original(self, job_id, result_data)
            return result_data is not None and bool(self.keep_result_forever or self.keep_result_s > 0)
    else:
        @decorate
        async def store(self: Any, job_id: str, finish: bool, result_data: bytes | None,  # type: ignore[misc]
                        result_timeout_s: float | None, keep_result_forever: bool, *args: Any,
                        **kwargs: Any) -> bool:
            await original(self, job_id, finish, result_data, result_timeout_s, keep_result_forever,
                           *args, **kwargs)
            return bool(finish and result_data)

    job_state = instrument_state_get(run_id="job_id", node_id=lambda _a: None, key=JOB_KEY, client=_worker_client,
                                     **providers)(_job_state_gone)

    @functools.wraps(original)
    async def write(self: Any, *args: Any, **kwargs: Any) -> None:
        job_id = kwargs.get("job_id", args[0] if args else None)
        if failed and job_id is not None and _GONE.get() == job_id:
            await job_state(self, job_id)
        await store(self, *args, **kwargs)  # True when the result was stored: wrote=

    return write


async def _job_state_gone(self: Any, job_id: str) -> None:
    """The worker's read of a queued job that found nothing (arq already read it: no command here)."""
    return None


def _enqueue_ttl(arguments: Mapping[str, Any]) -> float | None:
    """The job state's expiry as arq computes it: ``_expires``, else the deferral plus ``expires_extra_ms``."""
    expires = arguments.get("_expires")
    if expires is not None:
        return expires.total_seconds() if isinstance(expires, timedelta) else float(expires)
    defer_by, defer_until = arguments.get("_defer_by"), arguments.get("_defer_until")
    if isinstance(defer_by, timedelta):
        defer_by = defer_by.total_seconds()
    if isinstance(defer_until, datetime):
        now = datetime.now(defer_until.tzinfo)
        defer_by = max(0.0, (defer_until - now).total_seconds())
    extra_ms = getattr(arguments["self"], "expires_extra_ms", None)
    if not isinstance(extra_ms, (int, float)):
        return None
    return float(defer_by or 0) + extra_ms / 1000


def _enqueue(original: Callable[..., Any], providers: dict[str, Any]) -> Callable[..., Any]:
    decorate = instrument_state_init(
        run_id="_job_id", node_id="function", key=JOB_KEY,
        client=lambda a: a["self"], ttl=_enqueue_ttl, wrote=lambda job: job is not None, **providers)
    traced = decorate(original)

    @functools.wraps(original)
    async def enqueue_job(self: Any, function: str, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("_job_id"):
            kwargs["_job_id"] = uuid.uuid4().hex  # what arq generates: the id is known before the call
        return await traced(self, function, *args, **kwargs)

    return enqueue_job


__all__ = ["JOB_KEY", "RESULT_KEY", "ArqInstrumentor"]
