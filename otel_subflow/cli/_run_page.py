"""The run view page: one run's journal as a self-contained HTML page (``diagnose --html``, the demo).

A person sees within seconds who read before whom and what vanished when: a sentence
per miss and the misses by verdict, then the timeline (one lane per host and process,
Redis server time on the x axis; a click on a mark shows its evidence and links its
trace in Jaeger), the misses with their evidence, the conflicts, and the whole journal.
The model is ``_run_view.py``; the shell ``_html.py`` and ``_svg.py``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otel_subflow import names
from otel_subflow._analysis.miss import analyze_state
from otel_subflow._config import SubflowConfig
from otel_subflow._journal import store
from otel_subflow._journal.entries import JournalEntry
from otel_subflow._journal.schema import OP_GAP, OP_INIT, OP_MISS, OP_RACE
from otel_subflow.cli._common import iso_ms, write_private
from otel_subflow.cli._html import Section, badge, concat, el, link, page, popover_source, table
from otel_subflow.cli._run_view import MissVerdict, RunView, trace_of
from otel_subflow.cli._svg import Bar, fmt_offset, legend, svg_bars, svg_timeline
from otel_subflow.cli._timeline import jaeger_link

if TYPE_CHECKING:
    from otel_subflow.lab.harness import Injection, Lab

#: Most misses told as sentences and detailed below the chart (the chart and journal table show all).
MAX_TOLD = 50
#: Recent global-journal entries searched for watcher gaps (they are journalled for no run in particular).
GAP_SCAN = 2000
#: Most missed states ``diagnose --html`` analyses now.
MAX_ANALYSED = 20

_LEGEND = [(OP_INIT, "circle", "init"), (OP_MISS, "triangle", "read that missed"), (OP_RACE, "diamond", "race"),
           ("expired", "square", "expired"), ("evicted", "square", "evicted"), ("del", "square", "deleted"),
           ("alive", "bar", "state alive"), ("restart", "rule", "server restart"), ("failover", "rule", "failover"),
           (OP_GAP, "square", "watcher gap")]


def run_page(run_id: str, entries: Sequence[JournalEntry], *, verdicts: Sequence[MissVerdict] = (),
             jaeger_url: str | None = None, redis_url: str | None = None, generated_at: str | None = None,
             gaps: Sequence[JournalEntry] = ()) -> str:
    """The run view of ``run_id`` as one HTML document (``redis_url`` must already be masked)."""
    view = RunView(run_id, entries, verdicts=verdicts, jaeger_url=jaeger_url, gaps=gaps)
    hosts = sorted({e.host or "?" for e in view.entries})
    meta: list[tuple[str, object]] = [("Redis", redis_url), ("journal", f"{len(view.entries)} entries from "
                                                                        f"{len(hosts)} host(s): {', '.join(hosts)}")]
    if view.entries:
        meta.append(("server time", f"{iso_ms(view.origin)} to {iso_ms(view.entries[-1].op_ms)} "
                                    f"({fmt_offset(view.entries[-1].op_ms - view.origin)})"))
    meta += [("generated", generated_at)] if generated_at else []
    meta = [(k, v) for k, v in meta if v]
    if not view.entries:
        body = el("p", "The journal holds no record of this run (never journalled, or trimmed since).")
        return page(f"Run {run_id}", [Section("Timeline", body, id="timeline")], meta=meta)

    causes = Counter(m.cause for m in view.misses)
    story = [el("li", view.sentence(m)) for m in view.misses[:MAX_TOLD]]
    story += [el("li", badge(r.kind, r.label), " ", r.title[:1].upper() + r.title[1:] + ".") for r in view.rules]
    glance = el("div", el("div", el("ol", concat(story), class_="story") if story else
                          el("p", "No read of this run missed."), class_="told"),
                el("div", svg_bars([Bar(c, n, kind=c) for c, n in causes.most_common()], unit="misses"),
                   class_="causes") if causes else None, class_="glance")
    chart = svg_timeline(view.lanes(), view.marks(), spans=view.spans(), links=view.links(), rules=view.rules,
                         origin_ms=view.origin, caption=f"+0 = {iso_ms(view.origin)[11:]}")
    sources = concat(popover_source(f"pop-{view.ids[id(e)]}", view.title(e), view.details(e)) for e in view.all)
    timeline = concat([legend(_LEGEND), el("div", chart, class_="chart"), sources])
    misses = concat(el("details", el("summary", view.title(m.entry), " ", view.offset(m.entry), " ",
                                     m.entry.host or "?"), view.details(m.entry), open=True)
                    for m in view.misses[:MAX_TOLD])
    conflicts = table(["type", "node", "hosts", "what happened"],
                      [[badge(c["type"], c["type"]), c["node_id"], " → ".join(h or "?" for h in c["hosts"]),
                        c["description"]] for c in view.conflicts]) if view.conflicts else el("p", "No conflicts.")
    journal_rows = []
    for e in view.all:
        detail = e.cause or e.fields.get("detected_by") or e.fields.get("reason") or (
            f"ttl {e.ttl_ms} ms" if e.ttl_ms is not None else "")
        trace = trace_of(e)
        journal_rows.append([view.offset(e), iso_ms(e.op_ms)[11:], badge(e.op, e.op), e.host, e.pid, e.node_id,
                             el("span", e.key or "-", class_="mono"), detail,
                             link(jaeger_link(jaeger_url, trace), trace[:16]) if trace else None])
    journal = table(["+", "server time", "op", "host", "pid", "node", "key", "detail", "trace"], journal_rows,
                    row_ids=[f"row-{view.ids[id(e)]}" for e in view.all])
    sections = [
        Section("At a glance", glance, id="glance", note=f"{len(view.misses)} read(s) missed; "
                                                          f"{len(view.conflicts)} conflict(s)."),
        Section("Timeline", timeline, id="timeline",
                note="One lane per process, Redis server time left to right. Hover or click a mark for its "
                     "evidence. Arrows: a read that came before the init. Bars above a lane: how long each state "
                     "lived, coloured by how it ended."),
        Section("Misses", el("div", misses, class_="misses") if view.misses else el("p", "None."), id="misses"),
        Section("Conflicts", conflicts, id="conflicts"),
        Section("Journal", journal, id="journal", note="Every entry, in Redis server order."),
    ]
    return page(f"Run {run_id}", sections, meta=meta, subtitle="otel-subflow run view: who read before whom, "
                "and what vanished when", footer="Times are the Redis server's clock.")


def read_run_page(client: object, journal: Any, config: SubflowConfig, run_id: str, *, jaeger_url: str | None,
                  redis_url: str, generated_at: str) -> str:
    """``diagnose --html``: the run's journal and the watcher gaps over it, each missed state analysed now."""
    entries = store.read_run(journal, run_id)
    gaps = [e for e in store.read_recent(journal, GAP_SCAN) if e.op == OP_GAP]
    verdicts: list[MissVerdict] = []
    for node, key in list(dict.fromkeys((e.node_id, e.key) for e in entries if e.op == OP_MISS and e.node_id))[
            :MAX_ANALYSED]:
        assert node is not None  # (filtered above)
        verdict, _ = analyze_state(client, run_id, node, key=key, config=config)
        verdicts.append(MissVerdict(verdict.as_dict(), f"analysed now by diagnose, at {generated_at}; the state "
                                    "may have changed since the read", node_id=node))
    return run_page(run_id, entries, verdicts=verdicts, jaeger_url=jaeger_url, redis_url=redis_url,
                    generated_at=generated_at, gaps=gaps)


def page_name(run_id: str) -> str:
    """A file name for a run's page: the id's safe characters, and a digest when any were replaced."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id).strip(".")[:80] or "run"
    if safe != run_id:
        safe += "-" + hashlib.blake2b(run_id.encode("utf-8"), digest_size=4).hexdigest()
    return f"run-view_{safe}.html"


def write_demo_pages(lab: Lab, injections: Iterable[Injection], directory: Path, *, jaeger_url: str | None,
                     redis_url: str, generated_at: str) -> dict[str, Path]:
    """The demo: one page per failed run, each miss with the verdict its read's own span carried.

    The workers' journals are flushed first (a last read's record may still be queued). Returns run id -> path.
    """
    lab.settle()
    journal = lab.journal_client
    by_run: dict[str, list[MissVerdict]] = {}
    for injection in injections:
        attrs = injection.result.verdict or {}
        prefix = names.EVIDENCE_PREFIX
        evidence = {k[len(prefix):]: v for k, v in attrs.items() if k.startswith(prefix)}
        by_run.setdefault(injection.run_id, []).append(MissVerdict(
            {"cause": injection.final_cause, "confidence": injection.final_confidence,
             "summary": injection.summary, "evidence": evidence},
            "the read's own span", node_id=injection.node_id, span_id=injection.result.span_id))
    gaps = [e for e in store.read_recent(journal, GAP_SCAN) if e.op == OP_GAP]
    written: dict[str, Path] = {}
    for run_id, verdicts in by_run.items():
        path = directory / page_name(run_id)
        html = run_page(run_id, store.read_run(journal, run_id), verdicts=verdicts, jaeger_url=jaeger_url,
                        redis_url=redis_url, generated_at=generated_at, gaps=gaps)
        write_private(path, html)
        written[run_id] = path
    return written


__all__ = ["GAP_SCAN", "MissVerdict", "page_name", "read_run_page", "run_page", "write_demo_pages"]
