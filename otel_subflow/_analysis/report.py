"""The verdict of a miss, recorded: span event and status, log record, metric, journal, race memory."""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry.trace import Status, StatusCode

from otel_subflow import names
from otel_subflow._analysis.interface import TracedCall
from otel_subflow._analysis.steps import NOT_PERMITTED, RATE_LIMITED, SERVER_SLOW
from otel_subflow._analysis.verdict import Verdict
from otel_subflow._journal.location import journal_for
from otel_subflow._journal.races import MissRecord
from otel_subflow._runtime import runtime
from otel_subflow._telemetry.instruments import emit_log, logger

#: Verdicts of misses that were not analysed: counted and summed up, not logged one by one.
_UNANALYSED = frozenset({RATE_LIMITED, SERVER_SLOW, NOT_PERMITTED})


def emit_verdict(call: TracedCall, verdict: Verdict) -> None:
    """Record the verdict: span event + status, log record, metric, journal, race memory."""
    span = call.span
    attrs = verdict.event_attributes()
    span.add_event(names.EVENT_STATE_MISSING, attrs)
    if call.config.miss_is_error:
        span.set_status(Status(StatusCode.ERROR, f"state missing: {verdict.cause}"))
    call.instruments.missing.add(1, {names.ATTR_MISSING_CAUSE: verdict.cause})
    reason = verdict.evidence.get("reason")
    analysed = reason not in _UNANALYSED
    level = logging.WARNING
    if not analysed:
        # A storm or a slow server: one line a minute says so; the records go to debug.
        level = logging.DEBUG
        runtime.log.log(f"miss.{reason}", logging.WARNING,
                    "otel-subflow: misses are not analysed one by one (%s); they are counted in the "
                    "subflow.state.missing metric with cause unknown", reason)
    if logger.isEnabledFor(level):
        fields: dict[str, Any] = {
            names.ATTR_RUN_ID: call.run_id,
            names.ATTR_NODE_ID: call.node_id,
            names.ATTR_STATE_KEY: call.key,
        }
        fields.update(attrs)
        emit_log(level, names.LOG_MISSING_STATE_ANALYSIS, span, fields)
    miss = None
    ctx = span.get_span_context()
    if call.key is not None and ctx.is_valid:
        miss = MissRecord(call.key, call.run_id, call.node_id, ctx, verdict.cause)
        runtime.recent_misses.add(miss)
    journal = journal_for(call.client, call.config)
    if journal is None:
        return
    if not analysed:
        journal.count_suppressed_miss()  # counted, not written one by one
        return
    seen = verdict.evidence.get("journal_seen_ms")
    journal.record_miss(call, verdict.cause, verdict.confidence, miss, int(seen) if seen is not None else None)

