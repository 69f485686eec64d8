"""The run view's model: what one run's journal shows, worked out once (the page: ``_run_page.py``).

One lane per process that wrote to the journal (host and pid: the writers, the readers,
the keyspace watcher). Every journal entry is a mark: inits, misses (with their verdict
and confidence, corrected to ``get_before_init`` when a race entry answers the miss),
races, tombstones (expired, evicted, del), watcher gaps. Spans show how long each
initialised state lived and how it ended; links go from a read to the init it came
before; rules mark a server restart (the server run id changed on one endpoint) or a
failover (a process's reads and writes moved to another endpoint and server).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from otel_subflow import names
from otel_subflow._journal.entries import JournalEntry
from otel_subflow._journal.schema import OP_GAP, OP_INIT, OP_MISS, OP_RACE, OP_SUPPRESSED, TOMBSTONE_OPS
from otel_subflow.cli._common import iso_ms
from otel_subflow.cli._html import Markup, badge, concat, el, kv_table, link
from otel_subflow.cli._svg import Lane, Link, Mark, Rule, Span, fmt_offset
from otel_subflow.cli._timeline import find_conflicts, jaeger_link

#: Shape of each operation's mark.
SHAPES = {OP_INIT: "circle", OP_MISS: "triangle", OP_RACE: "diamond", OP_GAP: "square", OP_SUPPRESSED: "square",
          **{op: "square" for op in TOMBSTONE_OPS}}


@dataclasses.dataclass(frozen=True)
class MissVerdict:
    """A verdict known for a miss beyond its journal entry (cause, confidence, summary, evidence).

    Matched to the miss by ``span_id`` (the read's own span) or else by ``node_id``
    (``diagnose`` analysing the state now); ``source`` says which.
    """

    verdict: Mapping[str, Any]
    source: str
    node_id: str | None = None
    span_id: str | None = None


@dataclasses.dataclass
class _Miss:
    entry: JournalEntry
    cause: str
    confidence: str
    corrected_from: str | None = None
    verdict: MissVerdict | None = None
    read_before: JournalEntry | None = None  # the init this read came before


def _lane_id(entry: JournalEntry) -> str:
    return f"{entry.host or '?'}|{entry.pid or '?'}"


def trace_of(entry: JournalEntry) -> str | None:
    return entry.trace_id or entry.fields.get("get_trace_id") or None


class RunView:
    """What the page shows of one run, worked out once from its journal."""

    def __init__(self, run_id: str, entries: Sequence[JournalEntry], *, verdicts: Sequence[MissVerdict] = (),
                 jaeger_url: str | None = None, gaps: Sequence[JournalEntry] = ()) -> None:
        self.run_id = run_id
        self.jaeger_url = jaeger_url
        self.entries = sorted(entries, key=lambda e: (e.op_ms, e.seq))
        self.origin = self.entries[0].op_ms if self.entries else 0
        # Watcher gaps are journalled for every run at once: those over this run's time.
        last = self.entries[-1].op_ms if self.entries else 0
        self.gaps = [g for g in gaps if g.op == OP_GAP and gap_range(g)[0] <= last and gap_range(g)[1] >= self.origin]
        self.all = sorted([*self.entries, *self.gaps], key=lambda e: (e.op_ms, e.seq))
        self.ids = {id(e): f"e{i}" for i, e in enumerate(self.all)}
        self.conflicts = find_conflicts(list(self.entries))
        self.by_stream = {e.stream_id: e for e in self.entries}
        self.misses = self._misses(verdicts)
        #: (time, endpoint) of each restart: the states written there before it were lost with it.
        self.restarted: list[tuple[int, str]] = []
        self.rules = self._restarts() + self._failovers()

    # -- what happened ---------------------------------------------------------------------

    def _misses(self, verdicts: Sequence[MissVerdict]) -> list[_Miss]:
        races = {e.fields.get("get_span_id"): e for e in self.entries if e.op == OP_RACE}
        by_span = {v.span_id: v for v in verdicts if v.span_id}
        by_node = {v.node_id: v for v in verdicts if v.node_id is not None and not v.span_id}
        out = []
        for entry in self.entries:
            if entry.op != OP_MISS:
                continue
            miss = _Miss(entry, entry.cause or names.CAUSE_UNKNOWN, entry.confidence or names.CONFIDENCE_UNKNOWN)
            race = races.get(entry.span_id) if entry.span_id else None
            if race is not None and miss.cause != names.CAUSE_GET_BEFORE_INIT:
                miss.corrected_from = miss.cause
                miss.cause, miss.confidence = names.CAUSE_GET_BEFORE_INIT, names.CONFIDENCE_DEFINITIVE
            miss.verdict = by_span.get(entry.span_id or "") or by_node.get(entry.node_id or "")
            if miss.cause == names.CAUSE_GET_BEFORE_INIT:
                miss.read_before = next((e for e in self.entries if e.op == OP_INIT and e.key == entry.key
                                         and e.seq > entry.seq), None)
            out.append(miss)
        return out

    def _restarts(self) -> list[Rule]:
        """A server run id that changed on one endpoint: the server restarted between the two entries."""
        rules: list[Rule] = []
        last: dict[str, JournalEntry] = {}
        for entry in self.entries:
            if not entry.endpoint or not entry.server_run_id:
                continue
            before = last.get(entry.endpoint)
            if before is not None and before.server_run_id != entry.server_run_id and entry.op_ms >= before.op_ms:
                self.restarted.append(((before.op_ms + entry.op_ms) // 2, entry.endpoint))
                rules.append(Rule(
                    (before.op_ms + entry.op_ms) // 2, "restart", "restart",
                    f"the server at {entry.endpoint} restarted between {self.offset(before)} and "
                    f"{self.offset(entry)} (its run id changed from {(before.server_run_id or '')[:8]} to "
                    f"{entry.server_run_id[:8]}): what it held only in memory was lost"))
            last[entry.endpoint] = entry
        return rules

    def _failovers(self) -> list[Rule]:
        """A process whose reads and writes moved to another endpoint and server, never to come back."""
        rules: list[Rule] = []
        by_lane: dict[str, list[JournalEntry]] = {}
        for entry in self.entries:
            if entry.op in (OP_INIT, OP_MISS) and entry.endpoint:
                by_lane.setdefault(_lane_id(entry), []).append(entry)
        for ops in by_lane.values():
            for i, (a, b) in enumerate(itertools.pairwise(ops)):
                moved = a.endpoint != b.endpoint and a.server_run_id and a.server_run_id != b.server_run_id
                if moved and all(e.endpoint != a.endpoint for e in ops[i + 1:]):
                    rules.append(Rule((a.op_ms + b.op_ms) // 2, "failover", "failover",
                                      f"{b.host} (pid {b.pid}) moved from {a.endpoint} to {b.endpoint}, another "
                                      f"server, between {self.offset(a)} and {self.offset(b)}: a failover, or the "
                                      "client was pointed elsewhere"))
        return rules

    def offset(self, entry: JournalEntry | int) -> str:
        ms = entry if isinstance(entry, int) else entry.op_ms
        return "+" + fmt_offset(ms - self.origin)

    def lanes(self) -> list[Lane]:
        seen: dict[str, list[JournalEntry]] = {}
        for entry in self.all:
            seen.setdefault(_lane_id(entry), []).append(entry)
        lanes = []
        for lane_id, ops in seen.items():
            kinds = {e.op for e in ops}
            roles = [r for r, hit in (("writes", OP_INIT in kinds), ("reads", OP_MISS in kinds),
                                      ("keyspace watcher", bool(kinds & {*TOMBSTONE_OPS, OP_GAP}))) if hit]
            endpoints = sorted({e.endpoint for e in ops if e.endpoint and e.op in (OP_INIT, OP_MISS)})
            sub = f"pid {ops[0].pid or '?'} · {', '.join(roles) or 'other'}"
            if endpoints:
                sub += " · " + ", ".join(endpoints)[:40]
            lanes.append(Lane(lane_id, ops[0].host or "?", sub))
        return lanes

    # -- the chart ----------------------------------------------------------------------------

    def _miss_of(self, entry: JournalEntry) -> _Miss | None:
        return next((m for m in self.misses if m.entry is entry), None)

    def marks(self) -> list[Mark]:
        out = []
        for entry in self.all:
            ident = self.ids[id(entry)]
            node = entry.node_id or "-"
            miss = self._miss_of(entry)
            if miss is not None:
                label, title = f"{node}: {miss.cause} ({miss.confidence})", f"read {node}: missing, {miss.cause}"
            elif entry.op == OP_INIT:
                label, title = node, f"init {node}" + (f", ttl {entry.ttl_ms} ms" if entry.ttl_ms is not None else "")
            elif entry.op == OP_GAP:
                label, title = "watcher gap", f"keyspace watcher gap: {entry.fields.get('reason', '?')}"
            elif entry.op == OP_SUPPRESSED:
                label, title = f"{entry.fields.get('count', '?')} misses", "misses not journalled (rate limit)"
            else:
                label, title = f"{entry.op} {node}", f"{entry.op} {node}"
            out.append(Mark(_lane_id(entry), entry.op_ms, entry.op, SHAPES.get(entry.op, "square"), label,
                            f"{self.offset(entry)} {entry.host or '?'}: {title}", f"pop-{ident}",
                            strong=miss is not None, data={"row": f"row-{ident}", "entry": entry.stream_id}))
        return out

    def spans(self) -> list[Span]:
        """How long each initialised state lived, and how it ended."""
        out = []
        last = self.all[-1].op_ms if self.all else 0
        for i, init in enumerate(self.entries):
            if init.op != OP_INIT or not init.key:
                continue
            end: tuple[int, str, str] | None = None
            for later in self.entries[i + 1:]:
                if later.key == init.key and (later.op in TOMBSTONE_OPS or later.op == OP_INIT):
                    how = later.op if later.op != OP_INIT else "overwritten by a later init"
                    end = (later.op_ms, later.op if later.op != OP_INIT else "alive", how)
                    break
            restart = next((t for t, where in self.restarted if t > init.op_ms and where == init.endpoint), None)
            if restart is not None and (end is None or restart < end[0]):
                end = (restart, "restart", "lost in the server restart")
            ttl_end = init.op_ms + init.ttl_ms if init.ttl_ms else None
            if end is None and ttl_end is not None and ttl_end <= last:
                end = (ttl_end, "expired", "its TTL ran out")
            title = f"{init.node_id}: initialised by {init.host} at {self.offset(init)}"
            if end is None:
                out.append(Span(_lane_id(init), init.op_ms, max(last, init.op_ms), "alive",
                                title + ", still alive at the last entry", open_end=True))
            else:
                out.append(Span(_lane_id(init), init.op_ms, end[0], end[1],
                                f"{title}; {end[2]} at {self.offset(end[0])}"))
        for gap in self.gaps:
            start, stop = gap_range(gap)
            out.append(Span(_lane_id(gap), max(start, self.origin - 1), stop, OP_GAP,
                            f"keyspace watcher disconnected for {fmt_offset(stop - start)} (watcher's clock)"))
        return out

    def links(self) -> list[Link]:
        out: dict[tuple[str, str], Link] = {}
        for miss in self.misses:
            if miss.read_before is not None:
                a, b = miss.entry, miss.read_before
                out[(a.stream_id, b.stream_id)] = Link(
                    _lane_id(a), a.op_ms, _lane_id(b), b.op_ms, names.CAUSE_GET_BEFORE_INIT,
                    f"{a.host} read {a.node_id} {b.op_ms - a.op_ms} ms before {b.host} initialised it")
        for conflict in self.conflicts:
            found = [self.by_stream[s] for s in conflict["stream_ids"] if s in self.by_stream]
            if len(found) == 2 and conflict["type"] in (names.CONFLICT_INIT_AFTER_MISS, names.CONFLICT_DOUBLE_INIT):
                a, b = found
                out.setdefault((a.stream_id, b.stream_id), Link(_lane_id(a), a.op_ms, _lane_id(b), b.op_ms,
                                                                conflict["type"], conflict["description"]))
        return list(out.values())

    # -- the text -----------------------------------------------------------------------------

    def sentence(self, miss: _Miss) -> Markup:
        """Who read, what they found, and what had happened to the state before."""
        e = miss.entry
        parts: list[str] = [f"{self.offset(e)} ", el("b", e.host or "?"), f" (pid {e.pid or '?'}) read ",
                            el("code", e.node_id or "?"), " and found nothing: ", badge(miss.cause, miss.cause),
                            f" ({miss.confidence}). "]
        if miss.read_before is not None:
            b = miss.read_before
            parts.append(f"{b.host} initialised it {b.op_ms - e.op_ms} ms later ({self.offset(b)}).")
            return concat(parts)
        before = [x for x in self.entries if x.key == e.key and x.seq < e.seq and x.op in (OP_INIT, *TOMBSTONE_OPS)]
        init = next((x for x in reversed(before) if x.op == OP_INIT), None)
        if init is None:
            parts.append("No init of this key is journalled before the read.")
        else:
            ttl = f", ttl {init.ttl_ms} ms" if init.ttl_ms is not None else ""
            parts.append(f"{init.host} had initialised it at {self.offset(init)}{ttl}")
            gone = next((x for x in before if x.seq > init.seq and x.op in TOMBSTONE_OPS), None)
            restart = next((r for r in self.rules if init.op_ms < r.t_ms < e.op_ms), None)
            if gone is not None:
                parts.append(f"; it was {_past(gone.op)} at {self.offset(gone)}, {gone.op_ms - init.op_ms} ms after.")
            elif restart is not None:
                parts.append(f"; then {restart.title}.")
            else:
                parts.append(".")
        if miss.corrected_from:
            parts.append(f" (Journalled as {miss.corrected_from}; a race entry shows the read came before the init.)")
        return concat(parts)

    def details(self, entry: JournalEntry) -> Markup:
        """Everything known of one entry (the popover and the misses section)."""
        trace = trace_of(entry)
        rows: list[tuple[str, object]] = [
            ("server time", f"{iso_ms(entry.op_ms)} ({self.offset(entry)})"),
            ("host, pid", f"{entry.host or '?'}, {entry.pid or '?'}"),
            ("key", entry.key), ("endpoint", entry.endpoint), ("db", entry.db),
            ("server run id", entry.server_run_id),
            ("trace", link(jaeger_link(self.jaeger_url, trace), trace) if trace else None),
        ]
        if entry.ttl_ms is not None:
            rows.append(("ttl", f"{entry.ttl_ms} ms"))
        miss = self._miss_of(entry)
        skip = {"op", "host", "pid", "key", "endpoint", "db", "server_run_id", "trace_id", "get_trace_id", "ttl_ms",
                "run_id", "node_id", "lag_ms"}
        if miss is not None and not miss.corrected_from:
            skip |= {"cause", "confidence"}  # (in the title)
        rows += [(name, value) for name, value in sorted(entry.fields.items()) if name not in skip and value]
        parts: list[str] = []
        if miss is not None:
            parts.append(el("p", self.sentence(miss)))
        parts.append(kv_table(rows))
        if miss is not None and miss.verdict is not None:
            verdict = miss.verdict.verdict
            cause = str(verdict.get("cause"))
            evidence = {k: v for k, v in (verdict.get("evidence") or {}).items() if v is not None and v != ""}
            parts.append(el("p", el("b", f"Verdict ({miss.verdict.source}): "), badge(cause, cause),
                            f" {verdict.get('confidence', '')}. ", str(verdict.get("summary") or ""), class_="verdict"))
            if evidence:
                parts.append(el("details", el("summary", f"evidence ({len(evidence)})"),
                                kv_table(sorted(evidence.items()))))
        return concat(parts)

    def title(self, entry: JournalEntry) -> Markup:
        miss = self._miss_of(entry)
        if miss is not None:
            return concat([badge(OP_MISS, "miss"), " ", entry.node_id or "?", " ", badge(miss.cause, miss.cause),
                           f" {miss.confidence}"])
        return concat([badge(entry.op, entry.op), " ", entry.node_id or entry.fields.get("reason", "")])


def _past(op: str) -> str:
    return {"del": "deleted"}.get(op, op)


def gap_range(entry: JournalEntry) -> tuple[int, int]:
    def num(name: str) -> int:
        raw = entry.fields.get(name, "")
        return int(raw) if raw.isdigit() else entry.op_ms

    return num("gap_start_ms"), num("gap_end_ms")


__all__ = ["MissVerdict", "RunView", "gap_range", "trace_of"]
