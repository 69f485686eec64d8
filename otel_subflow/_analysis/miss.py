"""The miss analysis, driven: on sync or ``redis.asyncio`` pipelines, within a timeout and a breaker.

The steps (``steps.py``) say what to ask; the drivers here run each step on our own
connections, with a short socket timeout and instrumentation suppressed (no spans of
their own). A failed step is thrown back into the steps, which decide what it costs.
An endpoint that keeps timing out is skipped for a while (``limits.CircuitBreaker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Generator, Iterator
from typing import Any, TypeGuard, cast

from opentelemetry.instrumentation.utils import suppress_instrumentation
from redis.exceptions import TimeoutError as RedisTimeoutError

from otel_subflow._analysis.interface import StateCall, StateQuery
from otel_subflow._analysis.limits import Skipped
from otel_subflow._analysis.probe import Call, Evidence
from otel_subflow._analysis.steps import SERVER_SLOW, WAIT, Step, analysis_steps, conclude, new_evidence, precheck
from otel_subflow._analysis.verdict import Verdict, unknown
from otel_subflow._config import SubflowConfig, get_config
from otel_subflow._redis.clients import Target
from otel_subflow._runtime import runtime


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, (RedisTimeoutError, TimeoutError))


@contextlib.contextmanager
def _guarded(target: Target, timeout_s: float) -> Iterator[None]:
    """The circuit breaker around one round trip: skip an endpoint that keeps timing out."""
    ident = target.ident(timeout_s)
    breaker = runtime.breaker
    if not breaker.allow(ident):
        raise Skipped
    try:
        yield
    except Exception as exc:
        if _timed_out(exc):
            breaker.failure(ident)
        raise
    breaker.success(ident)


def _fill(pipe: Any, calls: list[Call]) -> Any:
    for name, args, kwargs in calls:
        getattr(pipe, name)(*args, **kwargs)
    return pipe


def _run_sync(target: Target, calls: list[Call], timeout_s: float) -> list[Any] | Exception:
    """One step's replies, or the exception that ended it (thrown back into the steps)."""
    try:
        if target is WAIT:
            time.sleep(calls[0][1][0])
            return []
        with _guarded(target, timeout_s):
            return list(_fill(target.sync_client(timeout_s).pipeline(transaction=False), calls).execute(
                raise_on_error=False))
    except Exception as exc:  # noqa: BLE001 - the steps decide what a failure costs
        return exc


async def _run_async(target: Target, calls: list[Call], timeout_s: float) -> list[Any] | Exception:
    """As :func:`_run_sync`, on ``redis.asyncio``."""
    try:
        if target is WAIT:
            await asyncio.sleep(calls[0][1][0])
            return []
        with _guarded(target, timeout_s):
            pipe = _fill(target.async_client(timeout_s).pipeline(transaction=False), calls)
            return list(await pipe.execute(raise_on_error=False))
    except Exception as exc:  # noqa: BLE001 - as above
        return exc


Outcome = tuple[Verdict, Evidence | None]
Analysis = Generator[Step, list[Any], Outcome]


def _resume(steps: Analysis, sent: list[Any] | Exception | None) -> Step | Outcome:
    """The next step, or the verdict when the analysis is over."""
    try:
        if sent is None:
            return next(steps)
        if isinstance(sent, Exception):
            return steps.throw(sent)
        return steps.send(sent)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _is_step(item: Step | Outcome) -> TypeGuard[Step]:
    return isinstance(item[0], Target)


def _drive_sync(steps: Analysis, timeout_s: float) -> Outcome:
    """Run an analysis on sync pipelines (raises what the steps did not handle)."""
    with suppress_instrumentation():
        step = _resume(steps, None)
        while _is_step(step):
            step = _resume(steps, _run_sync(*step, timeout_s))
        return cast(Outcome, step)


async def _drive_async(steps: Analysis, timeout_s: float) -> Outcome:
    """Run an analysis on ``redis.asyncio`` pipelines (as :func:`_drive_sync`)."""
    with suppress_instrumentation():
        step = _resume(steps, None)
        while _is_step(step):
            step = _resume(steps, await _run_async(*step, timeout_s))
        return cast(Outcome, step)


def _failed(exc: Exception) -> Verdict:
    if isinstance(exc, Skipped):
        return unknown(SERVER_SLOW)
    return unknown(f"the analysis failed ({type(exc).__name__})", analysis_error=type(exc).__name__)


def _analysis(call: StateCall, *, checked: bool) -> Generator[Step, list[Any], tuple[Verdict, Evidence | None]]:
    """The whole analysis of one miss: the checks, the steps, the verdict (with its evidence).

    ``checked``: a miss in a decorated call, rate-limited, and a failed step gives an
    ``unknown`` verdict; otherwise (the CLI) a failure raises for the caller to report.
    """
    early = precheck(call) if checked else None
    if early is not None:
        return early, None
    if call.key is None:
        return unknown("the state key could not be built from the call's arguments"), None
    evidence = new_evidence(call, call.key)
    started = time.perf_counter()
    try:
        yield from analysis_steps(call, evidence)
    except Exception as exc:
        if not checked:
            raise
        return _failed(exc), evidence
    return conclude(call, evidence, time.perf_counter() - started), evidence


def analyze_miss_sync(call: StateCall) -> Verdict:
    """Run the analysis for a miss in a sync call."""
    return _drive_sync(_analysis(call, checked=True), call.config.analysis_timeout_s)[0]


async def analyze_miss_async(call: StateCall) -> Verdict:
    """Run the analysis for a miss in an ``async def`` call (redis.asyncio)."""
    return (await _drive_async(_analysis(call, checked=True), call.config.analysis_timeout_s))[0]


def analyze_state(
    client: object,
    run_id: str,
    node_id: str,
    *,
    key: str | None = None,
    config: SubflowConfig | None = None,
) -> tuple[Verdict, Evidence]:
    """Analyse one state now, outside any decorated call (the CLI's ``--missing-state``).

    Not rate-limited, not journalled; raises redis errors so the caller can report them.
    """
    cfg = config or get_config()
    state_key = key if key is not None else cfg.key_template.format(run_id=run_id, node_id=node_id)
    query = StateQuery(client, run_id, node_id, state_key, cfg)
    verdict, evidence = _drive_sync(_analysis(query, checked=False), max(cfg.analysis_timeout_s, 2.0))
    return verdict, evidence if evidence is not None else new_evidence(query, state_key)
