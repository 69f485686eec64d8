"""The tree keeps its shape: docs/architecture.md matches it, modules stay small, the seams are typed."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import otel_subflow
from otel_subflow._analysis import miss, report
from otel_subflow._analysis.interface import StateCall, TracedCall
from otel_subflow._instrument.call import DecoratedCall
from otel_subflow._journal import location
from otel_subflow._journal.writer import Journal

PACKAGE = Path(otel_subflow.__file__).parent
DOC = (PACKAGE.parent / "docs" / "architecture.md").read_text()
#: "No module is over ~400 lines."
MAX_LINES = 420
_NOT_DOCUMENTED = {"__init__.py", "__main__.py", "_version.py", "py.typed"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".lua") and "__pycache__" not in p.parts)


def test_every_module_is_in_the_architecture_page() -> None:
    missing = [str(p.relative_to(PACKAGE)) for p in _modules()
               if p.name not in _NOT_DOCUMENTED and p.name not in DOC]
    assert not missing, f"docs/architecture.md does not mention {missing}"
    folders = {p.parent.name for p in _modules() if p.parent != PACKAGE}
    assert not [f for f in folders if f"`{f}/`" not in DOC], folders


def test_every_file_the_page_names_exists() -> None:
    named = set(re.findall(r"`([\w]+\.(?:py|lua))`", DOC)) | set(re.findall(r"([\w]+\.(?:py|lua))\b", DOC))
    existing = {p.name for p in _modules()}
    assert named and not sorted(named - existing), sorted(named - existing)


def test_no_module_is_over_about_400_lines() -> None:
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in _modules()}
    assert not {name: n for name, n in sizes.items() if n > MAX_LINES}


def _annotations(obj: object) -> dict[str, str]:
    """Annotations as written (``from __future__ import annotations``: strings)."""
    return {name: str(value) for name, value in inspect.get_annotations(obj).items()}


def test_the_seams_between_decorator_analysis_and_journal_are_typed() -> None:
    """No ``Any`` where a call crosses from the decorators into the analysis, the report and the journal."""
    seams: list[object] = [miss.analyze_miss_sync, miss.analyze_miss_async, report.emit_verdict, Journal.record_init,
                           Journal.record_miss, location.journal_for, location.journal_target, DecoratedCall]
    seams += [member.fget for protocol in (StateCall, TracedCall) for member in vars(protocol).values()
              if isinstance(member, property)]
    untyped = {}
    for obj in seams:
        hints = _annotations(obj)
        if any(re.search(r"\bAny\b", hint) for hint in hints.values()):
            untyped[getattr(obj, "__qualname__", str(obj))] = hints
    assert not untyped
    assert _annotations(TracedCall.span.fget)["return"] == "trace.Span"  # the check reads real annotations
