"""Self-contained HTML pages: one shell (CSS, JS, header), escaped markup helpers, small tables.

Every page the CLI writes (``diagnose --html``'s run view, and pages built on it later)
is one file with its CSS, SVG and JS inline: no CDN, no external asset, it opens from
disk offline. A Content-Security-Policy in the page lets the browser enforce that: no
request leaves the page, and only the shell's own script (by its hash) runs, so even a
value that escaped escaping could not execute.

The API (what another page needs)::

    from otel_subflow.cli._html import Markup, Section, el, esc, kv_table, page, table
    from otel_subflow.cli._svg import Bar, svg_bars, svg_timeline

    chart = svg_bars([Bar("expired", 12, kind="expired"), Bar("evicted", 3, kind="evicted")], unit="misses")
    html = page("Misses by cause", [Section("By cause", chart, note="last 24 h")],
                meta=[("Redis", masked_url), ("window", "24 h")])

- :class:`Markup` is text that is already HTML. Everything else is escaped where it is
  put into a page: :func:`el` escapes ``str`` children and every attribute value, keeps
  :class:`Markup` children as they are. Build markup only with :func:`el`,
  :func:`esc`, :func:`concat` and the helpers below, never by formatting strings.
- :func:`page` (title, sections, meta) returns the whole document as ``str``.
- :class:`Section`: a titled part of a page (``id`` makes it linkable).
- :func:`table` (header, rows) and :func:`kv_table` (pairs) for tabular facts.
- :func:`popover_source`: the rich content a click on an SVG mark shows (the shell's
  script copies it into the one popover; marks point at it with ``data-pop``).
- ``_svg.py``: :func:`~otel_subflow.cli._svg.svg_timeline` (lanes, marks, spans, links,
  rules on a server-time axis) and :func:`~otel_subflow.cli._svg.svg_bars` (bar charts).
- Colours of causes and operations are CSS classes ``k-<kind>`` (``k-expired``,
  ``k-init`` ...) defined once in ``assets/page.css``; ``_svg.legend`` draws their keys.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from importlib import resources

from otel_subflow._version import __version__


class Markup(str):
    """A string that is already HTML: :func:`el` inserts it as is."""

    __slots__ = ()


def esc(value: object) -> Markup:
    """``value`` as text inside HTML (``<``, ``>``, ``&`` and both quotes escaped)."""
    return Markup(html.escape("" if value is None else str(value), quote=True))


def concat(parts: Iterable[str]) -> Markup:
    """Markup parts joined; plain strings among them are escaped."""
    return Markup("".join(p if isinstance(p, Markup) else esc(p) for p in parts))


_VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "wbr"})
_SVG_EMPTY = frozenset({"circle", "rect", "line", "path", "polygon", "polyline", "ellipse", "use", "stop"})


def el(tag: str, *children: str | None, **attrs: object) -> Markup:
    """``<tag attrs>children</tag>``: attribute values and ``str`` children escaped, :class:`Markup` kept.

    Attribute names: a trailing ``_`` is dropped (``class_``), other ``_`` become ``-``
    (``data_pop`` -> ``data-pop``); ``True`` writes the bare name, ``None``/``False`` omit it.
    """
    parts = [f"<{tag}"]
    for name, value in attrs.items():
        if value is None or value is False:
            continue
        name = name[:-1] if name.endswith("_") else name.replace("_", "-")
        if value is True:
            parts.append(f" {name}")
        else:
            parts.append(f' {name}="{esc(_attr(value))}"')
    inner = concat(c for c in children if c is not None)
    if tag in _VOID:
        return Markup("".join(parts) + ">")
    if tag in _SVG_EMPTY and not inner:
        return Markup("".join(parts) + "/>")
    return Markup("".join(parts) + ">" + inner + f"</{tag}>")


def _attr(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return str(value)


@dataclasses.dataclass(frozen=True)
class Section:
    """A titled part of a page. ``body`` is markup; ``note`` a line of plain text under the title."""

    title: str
    body: Markup
    id: str | None = None
    note: str | None = None


def link(href: str | None, text: str) -> Markup:
    """A link that opens in a new tab (``text`` only, when there is no ``href``)."""
    if not href:
        return esc(text)
    return el("a", text, href=href, target="_blank", rel="noopener noreferrer")


def table(header: Sequence[str], rows: Iterable[Sequence[str | None]], *, class_: str = "data",
          row_ids: Sequence[str | None] | None = None) -> Markup:
    """A table; cells are text (escaped) or :class:`Markup`; ``None`` shows as ``-``."""
    head = el("thead", el("tr", concat(el("th", h) for h in header)))
    body_rows = []
    for i, row in enumerate(rows):
        row_id = row_ids[i] if row_ids is not None and i < len(row_ids) else None
        body_rows.append(el("tr", concat(el("td", "-" if c is None else c) for c in row), id=row_id))
    return el("table", head, el("tbody", concat(body_rows)), class_=class_)


def kv_table(pairs: Iterable[tuple[str, object]]) -> Markup:
    """Name/value pairs as a two-column table (values as text, or :class:`Markup`)."""
    rows = [el("tr", el("th", name), el("td", v if isinstance(v, Markup) else ("-" if v is None else str(v))))
            for name, v in pairs]
    return el("table", concat(rows), class_="kv")


def badge(kind: str, text: str) -> Markup:
    """A coloured label (``kind``: an operation or cause, styled by ``k-<kind>``)."""
    return el("span", text, class_=f"badge k-{css_token(kind)}")


def css_token(value: str) -> str:
    """``value`` as a class-name token: letters, digits, ``-`` and ``_`` only."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in value) or "none"


def popover_source(ident: str, title: Markup | str, body: Markup) -> Markup:
    """What a click on a mark with ``data-pop=ident`` shows (an inert ``<template>`` until then)."""
    return el("template", el("div", el("h3", title), body, class_="pop-body"), id=ident)


# -- the page ----------------------------------------------------------------------------


@cache
def _asset(name: str) -> str:
    return resources.files("otel_subflow.cli").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def _csp_hash(source: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii")


def page(title: str, sections: Sequence[Section], *, meta: Sequence[tuple[str, object]] = (),
         subtitle: str | None = None, footer: str | None = None, extra_js: str = "") -> str:
    """The whole HTML document: the shell's CSS and JS inline, a header, the sections in order.

    ``meta`` are facts shown under the title (values: text or :class:`Markup`); ``extra_js``
    is a page's own script, appended to the shell's (allowed by hash like it).
    """
    script = _asset("page.js") + ("\n" + extra_js if extra_js else "")
    if "</script" in script.lower():
        raise ValueError("a page script may not contain '</script'")
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src '{_csp_hash(script)}'; base-uri 'none'; form-action 'none'")
    header = [el("h1", title)]
    if subtitle:
        header.append(el("p", subtitle, class_="subtitle"))
    if meta:
        header.append(el("dl", concat(concat((el("dt", k), el("dd", v if isinstance(v, Markup) else str(v))))
                                      for k, v in meta), class_="meta"))
    nav = el("nav", concat(el("a", s.title, href=f"#{s.id}") for s in sections if s.id)) if any(
        s.id for s in sections) else Markup("")
    body = [el("header", concat(header), nav)]
    for section in sections:
        parts = [el("h2", section.title)]
        if section.note:
            parts.append(el("p", section.note, class_="note"))
        parts.append(section.body)
        body.append(el("section", concat(parts), id=section.id))
    body.append(el("footer", footer or "", " " if footer else "", f"otel-subflow {__version__}"))
    body.append(el("div", id="popover", class_="popover", role="dialog", hidden=True))
    head = concat([
        Markup('<meta charset="utf-8">'),
        el("meta", http_equiv="Content-Security-Policy", content=csp),
        el("meta", name="viewport", content="width=device-width, initial-scale=1"),
        el("title", title),
        el("style", Markup(_asset("page.css"))),
    ])
    return ("<!DOCTYPE html>\n" + el("html", el("head", head), el("body", el("main", concat(body)),
                                                                  el("script", Markup(script))), lang="en") + "\n")


def data_attrs(values: Mapping[str, str]) -> dict[str, str]:
    """``{"op": "miss"}`` as ``el`` keyword arguments (``data_op="miss"``)."""
    return {f"data_{name}": value for name, value in values.items()}


__all__ = [
    "Markup", "Section", "badge", "concat", "css_token", "data_attrs", "el", "esc", "kv_table", "link",
    "page", "popover_source", "table",
]
