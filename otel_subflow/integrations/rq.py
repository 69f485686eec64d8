"""RQ: the reads and writes of RQ's job hashes and results, with verdicts on every miss.

``RQInstrumentor().instrument()`` (or ``opentelemetry-instrument`` with ``rq`` installed) wraps,
with the package's own decorators:

- reads: ``Job.fetch(id, connection)`` (missing: ``NoSuchJobError``, re-raised unchanged) and
  ``job.latest_result()`` (missing: ``None``), which ``job.return_value()`` reads through (wrapping
  both would trace and analyse one read twice; a failed job's ``return_value()`` is ``None`` with
  its result present, which is no miss);
- writes: ``Job.save()`` (the job hash ``rq:job:<id>``) and ``Result.save(ttl)`` (the results
  stream ``rq:results:<id>``, with its TTL).

The map: the **run** is the job's ``meta["workflow_id"]`` when the job in hand has one, else the
job id; ``Job.fetch`` (no job yet, only its id) and ``Result.save`` (a result knows only its job
id) always use the job id. The **node** is the job's function name (``job.func_name``) where the
job is in hand, else the job id. The key is RQ's own key; the client is the job's ``connection``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from otel_subflow._instrument.decorators import instrument_state_get, instrument_state_init
from otel_subflow._runtime import runtime
from otel_subflow.integrations._patches import Patches

#: The meta field that names a job's workflow (its run).
WORKFLOW_META = "workflow_id"
#: RQ's keys, as templates for the keyspace watchers (tombstones carry the job id as the run).
KEY_TEMPLATES = ("rq:job:{run_id}", "rq:results:{run_id}")

Arguments = Mapping[str, Any]


def _job_run(job: Any) -> str | None:
    """The workflow id in the job's meta, else the job id."""
    meta = getattr(job, "meta", None)
    workflow = meta.get(WORKFLOW_META) if isinstance(meta, dict) else None
    return str(workflow) if workflow else getattr(job, "id", None)


def _job_node(job: Any) -> str | None:
    try:
        name = job.func_name
    except Exception:  # noqa: BLE001  (a job whose data cannot be read: its id names it)
        name = None
    return str(name) if name else getattr(job, "id", None)


def _fetch_id(a: Arguments) -> str | None:
    job_id = a.get("id")
    return str(job_id).split(":", 1)[0] if job_id else None  # (an execution id is "<job>:<execution>")


def _job_options() -> dict[str, Any]:
    """The options of the methods of a job in hand (``self``)."""
    return {"run_id": lambda a: _job_run(a["self"]), "node_id": lambda a: _job_node(a["self"]),
            "client": lambda a: a["self"].connection}


class RQInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Trace RQ's job hash and result reads and writes; explain every miss.

    Example::

        from otel_subflow.integrations.rq import RQInstrumentor
        RQInstrumentor().instrument()
    """

    _patches = Patches()

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("rq >= 2.0",)

    def _instrument(self, **kwargs: Any) -> None:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job
        from rq.results import Result

        results_key: Callable[[str], str] = Result.get_key  # type: ignore[no-untyped-call,unused-ignore]
        providers = {k: kwargs[k] for k in ("tracer_provider", "meter_provider") if kwargs.get(k) is not None}
        for template in KEY_TEMPLATES:
            runtime.key_templates.add(template)
        fetch = instrument_state_get(
            run_id=_fetch_id, node_id=_fetch_id, key=lambda a: Job.key_for(_fetch_id(a) or ""),
            client=lambda a: a.get("connection"), missing_on=(NoSuchJobError,), **providers)
        result_read = instrument_state_get(key=lambda a: results_key(a["self"].id), **_job_options(),
                                           **providers)
        job_save = instrument_state_init(key=lambda a: a["self"].key, **_job_options(), **providers)
        result_save = instrument_state_init(
            run_id=lambda a: a["self"].job_id, node_id=lambda a: a["self"].job_id,
            key=lambda a: results_key(a["self"].job_id), client=lambda a: a["self"].connection,
            ttl=lambda a: a["ttl"] if a.get("ttl") is not None and a["ttl"] >= 0 else None, **providers)
        self._patch(Job, "fetch", fetch, classmethod_=True)
        self._patch(Job, "latest_result", result_read)
        self._patch(Job, "save", job_save)
        self._patch(Result, "save", result_save)

    def _patch(self, owner: type, attr: str, decorator: Callable[[Any], Any], classmethod_: bool = False) -> None:
        raw = owner.__dict__[attr]
        if getattr(getattr(raw, "__func__", raw), "__subflow_spec__", None) is not None:
            return  # already wrapped
        wrapped = classmethod(decorator(raw.__func__)) if classmethod_ else decorator(raw)
        RQInstrumentor._patches.replace(owner, attr, wrapped)

    def _uninstrument(self, **kwargs: Any) -> None:
        RQInstrumentor._patches.restore()


__all__ = ["KEY_TEMPLATES", "WORKFLOW_META", "RQInstrumentor"]
