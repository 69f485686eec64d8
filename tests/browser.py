"""Headless Chromium for the pages' tests: Debian's ``chromium`` driven by Playwright, never a download.

The ``browser`` fixture is in conftest.py: a missing Chromium or Playwright fails the test
(skips only with OTEL_SUBFLOW_ALLOW_SKIP=1).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any


def chromium_path() -> str | None:
    """``OTEL_SUBFLOW_CHROMIUM``, else Debian's ``chromium`` on PATH (None when there is none)."""
    explicit = os.environ.get("OTEL_SUBFLOW_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclasses.dataclass
class Loaded:
    """A page loaded from disk, with what went wrong while it did."""

    page: Any
    errors: list[str]
    requests: list[str]
    dialogs: list[str]


def load(browser: Any, path: Path) -> Loaded:
    """Open ``path`` offline: any request that is not the file itself is refused and recorded."""
    page = browser.new_page(viewport={"width": 1240, "height": 900})
    loaded = Loaded(page, [], [], [])
    page.on("console", lambda m: loaded.errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: loaded.errors.append(str(exc)))
    page.on("dialog", lambda d: (loaded.dialogs.append(d.message), d.dismiss()))

    def route(request_route: Any) -> None:
        url = request_route.request.url
        if url == path.as_uri():
            request_route.continue_()
        else:
            loaded.requests.append(url)
            request_route.abort()

    page.route("**/*", route)
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return loaded


__all__ = ["Loaded", "chromium_path", "load"]
