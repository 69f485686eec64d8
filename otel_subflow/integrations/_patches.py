"""Replacing an engine's methods and putting them back: what every instrumentor here does.

``BaseInstrumentor`` is a singleton whose ``__init__`` runs again on every ``Instrumentor()``, so an
instrumentor keeps its :class:`Patches` on the class: ``Instrumentor().uninstrument()`` restores what
another reference patched.
"""

from __future__ import annotations

from typing import Any

_INHERITED = object()  # the attribute came from a base class: restoring deletes ours


class Patches:
    """The attributes one instrumentor replaced, restored in reverse order."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def replace(self, owner: Any, attr: str, wrapped: Any) -> None:
        """Set ``owner.attr`` to ``wrapped``, remembering what ``owner`` itself held (maybe nothing)."""
        self._saved.append((owner, attr, vars(owner).get(attr, _INHERITED)))
        setattr(owner, attr, wrapped)

    def restore(self) -> None:
        while self._saved:
            owner, attr, original = self._saved.pop()
            if original is _INHERITED:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)

    def __bool__(self) -> bool:
        return bool(self._saved)


__all__ = ["Patches"]
