"""The patterns page of ``diagnose --patterns --html``: the window's misses drawn, on the run view's shell."""

from __future__ import annotations

from typing import Any

from otel_subflow.cli._common import iso_ms
from otel_subflow.cli._html import Section, el, kv_table, page, table
from otel_subflow.cli._svg import Bar, svg_bars


def _bucket_label(start_ms: int, bucket_ms: int) -> str:
    stamp = iso_ms(start_ms)  # 2026-12-02T05:57:10.000Z
    return stamp[11:19] if bucket_ms < 86_400_000 else stamp[:10]


def patterns_page(section: dict[str, Any], *, redis_url: str, generated_at: str) -> str:
    """One self-contained page of a ``patterns`` section (see ``_patterns.collect``)."""
    window_s = (section["until_ms"] - section["since_ms"]) / 1000
    meta = [("Redis", redis_url), ("window", f"{window_s:g} s up to {iso_ms(section['until_ms'])}"),
            ("misses", section["misses"]), ("not analysed (rate limit)", section["misses_not_analysed"]),
            ("generated", generated_at)]
    if not section["misses"]:
        return page("Missing-state patterns", [Section("Misses", el("p", "No miss in the window."))], meta=meta)
    causes = svg_bars([Bar(cause, n, kind=cause) for cause, n in section["by_cause"].items()], unit="misses")
    categories = svg_bars([Bar(name, n, kind=name) for name, n in section["by_category"].items()], unit="misses")
    bucket_ms = section["bucket_ms"]
    over_time = svg_bars([Bar(_bucket_label(row["start_ms"], bucket_ms), sum(row["misses"].values()),
                              kind="miss", title=", ".join(f"{c} {n}" for c, n in sorted(row["misses"].items())))
                          for row in section["buckets"]], unit="misses", vertical=True, width=720)
    server = table(("from", "misses", "evicted", "expired", "used memory (bytes)", "avg command latency (us)"),
                   [(iso_ms(row["start_ms"]), ", ".join(f"{c} {n}" for c, n in sorted(row["misses"].items())),
                     _text(row["evicted"]), _text(row["expired"]), _text(row["used_memory_bytes"]),
                     _text(row["avg_command_latency_us"])) for row in section["buckets"]])
    pairs = table(("writer (the init's host)", "reader (the miss's host)", "misses", "cross-server"),
                  [(p["writer"], p["reader"], str(p["misses"]), "yes" if p["cross_server"] else "")
                   for p in section["host_pairs"]])
    fixes = table(("misses it would have prevented", "action", "what", "causes"),
                  [(str(f["misses_prevented"]), f["action"], f["what"], ", ".join(f["causes"]))
                   for f in section["remediations"]])
    sections = [
        Section("Fixes, ranked", fixes, id="fixes",
                note="by how many of the window's misses each would have prevented"),
        Section("By cause", causes, id="causes"),
        Section("By category", categories, id="categories",
                note="infrastructure, timing or the application's own logic and configuration"),
        Section("Over time", el("div", over_time, server), id="time",
                note=f"{bucket_ms / 1000:g} s buckets; the server's figures are its own counters, sampled into "
                     "the journal (- where no sample fell)"),
        Section("Writer -> reader", pairs, id="pairs", note="cross-server: the key was written and read on two hosts"),
        Section("Counts", kv_table([("misses", section["misses"]), *section["by_cause"].items()]), id="counts"),
    ]
    return page("Missing-state patterns", sections, meta=meta)


def _text(value: object) -> str | None:
    return None if value is None else str(value)
