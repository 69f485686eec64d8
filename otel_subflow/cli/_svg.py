"""Inline SVG charts for the HTML pages (``_html.py``): a lane timeline and bar charts.

- :func:`svg_timeline`: one horizontal lane per :class:`Lane`, time (ms) on the x axis;
  :class:`Mark` (a shape, an optional label, a click popover), :class:`Span` (a bar
  between two times on a lane), :class:`Link` (an arrow from one lane and time to
  another) and :class:`Rule` (a vertical line across every lane). Long empty stretches
  of time are collapsed (drawn as a break, "≈ 10 min"), so a run with seconds of work
  and an hour's pause still shows who came before whom.
- :func:`svg_bars`: a bar chart of :class:`Bar` values, horizontal (categories) or
  vertical (time buckets).
- :func:`legend`: the keys of the kinds used (HTML, with the same shapes).

Colours come from the page's CSS classes ``k-<kind>`` (``assets/page.css``).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Mapping, Sequence

from otel_subflow.cli._html import Markup, concat, css_token, el

MARK_R = 6
#: Width of a label's character, estimated (11.5 px system font), to keep labels from overlapping.
CHAR_PX = 7.0


@dataclasses.dataclass(frozen=True)
class Lane:
    """One row of the timeline (e.g. one host and process)."""

    id: str
    label: str
    sublabel: str = ""


@dataclasses.dataclass(frozen=True)
class Mark:
    """A point in time on a lane. ``pop``: the id of a popover source (``_html.popover_source``)."""

    lane: str
    t_ms: int
    kind: str
    shape: str = "circle"  # circle, triangle, diamond, square
    label: str = ""
    title: str = ""
    pop: str | None = None
    strong: bool = False
    data: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Span:
    """A bar on a lane from ``start_ms`` to ``end_ms`` (``open_end``: it goes on past the axis)."""

    lane: str
    start_ms: int
    end_ms: int
    kind: str
    title: str = ""
    open_end: bool = False


@dataclasses.dataclass(frozen=True)
class Link:
    """An arrow from (``from_lane``, ``from_ms``) to (``to_lane``, ``to_ms``)."""

    from_lane: str
    from_ms: int
    to_lane: str
    to_ms: int
    kind: str
    label: str = ""


@dataclasses.dataclass(frozen=True)
class Rule:
    """A vertical line across all lanes at ``t_ms``, labelled above them."""

    t_ms: int
    kind: str
    label: str
    title: str = ""


@dataclasses.dataclass(frozen=True)
class Bar:
    label: str
    value: float
    kind: str = "bar"
    title: str = ""


def shape(kind: str, name: str, cx: float, cy: float, r: float = MARK_R) -> Markup:
    """One mark's shape, coloured by ``k-<kind>``."""
    cls = f"shape k-{css_token(kind)}"
    if name == "triangle":
        points = f"{cx - r},{cy - r * 0.8} {cx + r},{cy - r * 0.8} {cx},{cy + r}"
        return el("polygon", points=points, class_=cls)
    if name == "diamond":
        return el("polygon", points=f"{cx},{cy - r} {cx + r},{cy} {cx},{cy + r} {cx - r},{cy}", class_=cls)
    if name == "square":
        return el("rect", x=cx - r * 0.8, y=cy - r * 0.8, width=r * 1.6, height=r * 1.6, class_=cls)
    if name == "bar":
        return el("rect", x=cx - r * 1.4, y=cy - 2.5, width=r * 2.8, height=5, rx=2,
                  class_=f"span k-{css_token(kind)}")
    if name == "rule":
        return el("line", x1=cx, x2=cx, y1=cy - r * 1.4, y2=cy + r * 1.4, class_=f"rule k-{css_token(kind)}")
    return el("circle", cx=cx, cy=cy, r=r * 0.85, class_=cls)


def legend(items: Sequence[tuple[str, str, str]]) -> Markup:
    """Keys of a chart: (kind, shape name, text)."""
    keys = [el("span", el("svg", shape(kind, name, 9, 9), width=18, height=18, viewBox="0 0 18 18",
                          aria_hidden="true"), text, class_="key") for kind, name, text in items]
    return el("div", concat(keys), class_="legend")


# -- time ---------------------------------------------------------------------------------


def fmt_offset(ms: float) -> str:
    """``+1.25 s`` style offsets for axis ticks."""
    ms = round(ms)
    if abs(ms) < 1000:
        return f"{ms} ms"
    if abs(ms) < 60_000:
        return f"{ms / 1000:.3g} s"
    if abs(ms) < 3_600_000:
        return f"{int(ms // 60_000)} min {int(ms % 60_000 // 1000)} s"
    return f"{ms / 3_600_000:.3g} h"


def _nice(step: float) -> int:
    magnitude = 1
    while magnitude * 10 <= step:
        magnitude *= 10
    for factor in (1, 2, 5, 10):
        if magnitude * factor >= step:
            return max(1, magnitude * factor)
    return magnitude * 10


class TimeScale:
    """Server ms to x, piecewise linear: gaps longer than a quarter of the rest (and 1 s) are collapsed."""

    BREAK_PX = 36.0

    def __init__(self, times: Sequence[int], x0: float, x1: float) -> None:
        points = sorted(set(times)) or [0]
        lo, hi = points[0], points[-1]
        gaps = sorted(((b - a, a, b) for a, b in itertools.pairwise(points)), reverse=True)
        collapsed: list[tuple[int, int]] = []
        rest = max(1, hi - lo)
        for size, a, b in gaps:
            if size > 1000 and size > 0.25 * (rest - size):
                collapsed.append((a, b))
                rest -= size
        collapsed.sort()
        self.breaks = collapsed
        pad = max(1.0, rest * 0.03)
        self.start, self.end = lo - pad, hi + pad
        linear_ms = (self.end - self.start) - sum(b - a for a, b in collapsed)
        px_per_ms = (x1 - x0 - self.BREAK_PX * len(collapsed)) / max(1.0, linear_ms)
        self.px_per_ms = px_per_ms
        # Segments: (t_start, t_end, x_start, x_end), alternating linear and collapsed.
        self.segments: list[tuple[float, float, float, float]] = []
        t, x = self.start, x0
        for a, b in collapsed:
            nx = x + (a - t) * px_per_ms
            self.segments.append((t, a, x, nx))
            self.segments.append((a, b, nx, nx + self.BREAK_PX))
            t, x = b, nx + self.BREAK_PX
        self.segments.append((t, self.end, x, x1))
        self._starts = [s[0] for s in self.segments]

    def x(self, t_ms: float) -> float:
        t_ms = min(max(t_ms, self.start), self.end)
        i = max(0, bisect.bisect_right(self._starts, t_ms) - 1)
        t0, t1, x0, x1 = self.segments[i]
        return x0 if t1 <= t0 else x0 + (t_ms - t0) * (x1 - x0) / (t1 - t0)

    def ticks(self, origin: int, spacing_px: float = 110.0) -> list[tuple[float, str]]:
        """(x, label) of round offsets from ``origin`` in each linear segment."""
        step = _nice(spacing_px / max(self.px_per_ms, 1e-9))
        out: list[tuple[float, str]] = []
        for t0, t1, x0, x1 in self.segments:
            if (t0, t1) in self.breaks or x1 - x0 < 30:
                continue
            first = origin + -(-(t0 - origin) // step) * step
            t = first
            while t <= t1:
                out.append((self.x(t), fmt_offset(t - origin)))
                t += step
        return out


# -- the timeline ---------------------------------------------------------------------------


def _rows(items: Sequence[tuple[float, float]], limit: int) -> list[int]:
    """Greedy rows for intervals (start, end) so that no two in a row overlap (past ``limit`` rows they may)."""
    ends: list[float] = []
    rows = []
    for start, end in items:
        row = next((i for i, e in enumerate(ends) if e <= start), None)
        if row is None and len(ends) < limit:
            row = len(ends)
            ends.append(end)
        elif row is None:
            row = min(range(len(ends)), key=ends.__getitem__)
        ends[row] = max(ends[row], end)
        rows.append(row)
    return rows


def svg_timeline(lanes: Sequence[Lane], marks: Sequence[Mark], *, spans: Sequence[Span] = (),
                 links: Sequence[Link] = (), rules: Sequence[Rule] = (), origin_ms: int | None = None,
                 caption: str = "", width: int = 1120, gutter: int = 200, id_prefix: str = "tl") -> Markup:
    """Lanes of marks on one time axis; ``origin_ms`` is the axis' 0 (default: the first mark), which
    ``caption`` names (e.g. its server time). Each lane is a ``<g class="lane" data-lane=...>`` holding its
    marks (``<g class="mark" data-op=kind>``), so pages and tests find them by lane and kind."""
    times = [m.t_ms for m in marks] + [r.t_ms for r in rules] + [s.start_ms for s in spans]
    times += [s.end_ms for s in spans if not s.open_end]
    scale = TimeScale(times, gutter + 10, width - 16)
    origin = origin_ms if origin_ms is not None else (min(times) if times else 0)
    top = 30 + (18 if rules else 0)
    parts: list[str] = []
    lane_y: dict[str, float] = {}
    lane_parts: list[str] = []
    y = float(top)
    for index, lane in enumerate(lanes):
        lane_marks = sorted((m for m in marks if m.lane == lane.id), key=lambda m: m.t_ms)
        # A label runs right of its mark, or ends at it near the right edge.
        flip = {id(m): scale.x(m.t_ms) + 10 + CHAR_PX * len(m.label) > width - 8 for m in lane_marks}
        boxes = [(x - CHAR_PX * len(m.label) - 10, x + 6) if flip[id(m)] else (x - 6, x + 10 + CHAR_PX * len(m.label))
                 for m in lane_marks if m.label for x in (scale.x(m.t_ms),)]
        order = sorted(range(len(boxes)), key=boxes.__getitem__)
        label_rows = [0] * len(boxes)
        for i, row in zip(order, _rows([boxes[i] for i in order], 6), strict=True):
            label_rows[i] = row
        lane_spans = sorted((s for s in spans if s.lane == lane.id), key=lambda s: s.start_ms)
        span_rows = _rows([(scale.x(s.start_ms), scale.x(s.end_ms) + 2) for s in lane_spans], 4)
        span_band = 7 * (max(span_rows) + 1) if span_rows else 0
        center = y + 14 + span_band
        height = (center - y) + 14 + 14 * (max(label_rows) + 1 if label_rows else 0) + 6
        height = max(height, 52.0)
        lane_y[lane.id] = center
        own: list[str] = [
            el("rect", x=0, y=y, width=width, height=height, class_=f"lane-bg{' odd' if index % 2 else ''}"),
            el("text", lane.label, x=8, y=y + 18, class_="lane-label"),
            el("text", lane.sublabel, x=8, y=y + 33, class_="lane-sublabel") if lane.sublabel else "",
            el("line", x1=gutter, x2=width - 8, y1=center, y2=center, class_="lane-line"),
        ]
        for span, row in zip(lane_spans, span_rows, strict=True):
            sy = center - 9 - 7 * row
            x1, x2 = scale.x(span.start_ms), scale.x(span.end_ms)
            own.append(el("rect", el("title", span.title) if span.title else None, x=x1, y=sy - 2.5,
                                 width=max(2.0, x2 - x1), height=5, rx=2,
                                 class_=f"span k-{css_token(span.kind)}{' open' if span.open_end else ''}"))
        labelled = iter(label_rows)
        for mark in lane_marks:
            x = scale.x(mark.t_ms)
            inner = [el("title", mark.title) if mark.title else None, shape(mark.kind, mark.shape, x, center)]
            if mark.label:
                row = next(labelled)
                ly = center + 20 + 14 * row
                inner.insert(1, el("line", x1=x, x2=x, y1=center + MARK_R, y2=ly - 9, class_="tick-line"))
                cls = "mark-label" + (" strong" if mark.strong else "") + (" end" if flip[id(mark)] else "")
                inner.append(el("text", mark.label, x=x + 3 if flip[id(mark)] else x - 3, y=ly, class_=cls))
            data = {f"data_{k.replace('-', '_')}": v for k, v in mark.data.items()}
            own.append(el("g", *inner, class_=f"mark k-{css_token(mark.kind)}", data_op=mark.kind,
                                 data_lane=lane.id, data_pop=mark.pop, tabindex="0" if mark.pop else None,
                                 role="button" if mark.pop else None, aria_label=mark.title or mark.label, **data))
        lane_parts.append(el("g", concat(own), class_="lane", data_lane=lane.id, data_label=lane.label))
        y += height
    total = y + 8
    # The axis: ticks at round offsets, breaks where time was collapsed.
    parts.append(el("text", caption, x=8, y=18, class_="axis-caption"))  # (in the gutter: keep it short)
    for x, text in scale.ticks(origin):
        parts.append(el("line", x1=x, x2=x, y1=24, y2=total - 4, class_="grid"))
        parts.append(el("text", text, x=x, y=18, class_="axis-label"))
    for a, b in scale.breaks:
        xa, xb = scale.x(a), scale.x(b)
        parts.append(el("rect", el("title", f"{fmt_offset(b - a)} without entries, collapsed"), x=xa, y=24,
                        width=xb - xa, height=total - 28, class_="break"))
        parts.append(el("text", "≈ " + fmt_offset(b - a), x=(xa + xb) / 2, y=18, class_="axis-label break-label"))
    parts.extend(lane_parts)
    for rule in rules:
        x = scale.x(rule.t_ms)
        parts.append(el("g", el("title", rule.title or rule.label),
                        el("line", x1=x, x2=x, y1=top - 4, y2=total - 4, class_=f"rule k-{css_token(rule.kind)}"),
                        el("text", rule.label, x=x + 3, y=top - 6, class_="rule-label"),
                        class_="rule-g", data_op=rule.kind))
    arrow = f"{id_prefix}-arrow"
    for link in links:
        if link.from_lane not in lane_y or link.to_lane not in lane_y:
            continue
        x1, y1 = scale.x(link.from_ms), lane_y[link.from_lane]
        x2, y2 = scale.x(link.to_ms), lane_y[link.to_lane]
        mid = (y1 + y2) / 2
        d = f"M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}"
        if y1 == y2:
            d = f"M{x1:.1f},{y1:.1f} Q{(x1 + x2) / 2:.1f},{y1 - 30:.1f} {x2:.1f},{y2:.1f}"
        parts.append(el("g", el("title", link.label) if link.label else None,
                        el("path", d=d, class_=f"link k-{css_token(link.kind)}", marker_end=f"url(#{arrow})"),
                        class_="link-g", data_op=link.kind))
    defs = el("defs", el("marker", el("path", d="M0,0 L8,4 L0,8 z", class_="arrow-head"), id=arrow,
                         viewBox="0 0 8 8", refX=8, refY=4, markerWidth=6, markerHeight=6, orient="auto"))
    return el("svg", defs, concat(parts), class_="timeline", viewBox=f"0 0 {width} {total:.0f}",
              width=width, height=f"{total:.0f}", role="img", aria_label="timeline of the run, one lane per process",
              xmlns="http://www.w3.org/2000/svg")


# -- bars -------------------------------------------------------------------------------------


def svg_bars(bars: Sequence[Bar], *, unit: str = "", vertical: bool = False, width: int = 480,
             bar_px: int = 18, height: int = 160, label_px: int = 150) -> Markup:
    """A bar chart: horizontal (a label per row) or ``vertical`` (columns, labels below)."""
    peak = max((b.value for b in bars), default=0) or 1
    parts: list[str] = []
    if not vertical:
        total = len(bars) * (bar_px + 6) + 4
        room = width - label_px - 60
        for i, bar in enumerate(bars):
            y = 2 + i * (bar_px + 6)
            w = max(1.0 if bar.value else 0.0, room * bar.value / peak)
            parts.append(el("g", el("title", bar.title or f"{bar.label}: {bar.value:g} {unit}".strip()),
                            el("text", bar.label, x=label_px - 6, y=y + bar_px * 0.72, class_="bar-label end"),
                            el("rect", x=label_px, y=y, width=w, height=bar_px, rx=2,
                               class_=f"bar k-{css_token(bar.kind)}"),
                            el("text", f"{bar.value:g}", x=label_px + w + 5, y=y + bar_px * 0.72, class_="bar-value"),
                            class_="bar-g", data_label=bar.label, data_value=f"{bar.value:g}"))
        return el("svg", concat(parts), class_="bars", viewBox=f"0 0 {width} {total}", width=width, height=total,
                  role="img", aria_label=f"bar chart{' of ' + unit if unit else ''}", xmlns="http://www.w3.org/2000/svg")
    slot = (width - 10) / max(1, len(bars))
    room = height - 36
    for i, bar in enumerate(bars):
        h = max(1.0 if bar.value else 0.0, room * bar.value / peak)
        x = 5 + i * slot
        parts.append(el("g", el("title", bar.title or f"{bar.label}: {bar.value:g} {unit}".strip()),
                        el("rect", x=x + slot * 0.12, y=height - 20 - h, width=slot * 0.76, height=h, rx=2,
                           class_=f"bar k-{css_token(bar.kind)}"),
                        el("text", f"{bar.value:g}", x=x + slot / 2, y=height - 24 - h, class_="bar-value mid"),
                        el("text", bar.label, x=x + slot / 2, y=height - 6, class_="bar-label mid"),
                        class_="bar-g", data_label=bar.label, data_value=f"{bar.value:g}"))
    return el("svg", concat(parts), class_="bars", viewBox=f"0 0 {width} {height}", width=width, height=height,
              role="img", aria_label=f"bar chart{' of ' + unit if unit else ''}", xmlns="http://www.w3.org/2000/svg")


__all__ = ["Bar", "Lane", "Link", "Mark", "Rule", "Span", "TimeScale", "fmt_offset", "legend", "shape",
           "svg_bars", "svg_timeline"]
