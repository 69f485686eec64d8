"""The run view in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

The data is real: the lab's worker processes (two hosts) and keyspace watcher on real
redis-servers. One run holds a race (worker-b reads before worker-a's init), an
expired state, a deleted state and a server restart. ``diagnose --html`` writes the
page; Chromium loads it from disk with every network request refused, and the test
counts lanes and marks against the journal, opens a miss's evidence, and saves a
screenshot (``test-artifacts/``; with ``OTEL_SUBFLOW_UPDATE_SCREENSHOTS=1`` also
``docs/images/run-view.png``, the README's picture).

A missing Chromium or Playwright fails the test (skips only with OTEL_SUBFLOW_ALLOW_SKIP=1).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otel_subflow import names
from otel_subflow._identity import identity
from otel_subflow._journal import store
from otel_subflow.lab.harness import Lab, wait_for
from otel_subflow.lab.servers import RedisServer
from tests.browser import Loaded, load
from tests.cli_helpers import invoke
from tests.service import get_state, initialize_state

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("OTEL_SUBFLOW_TEST_ARTIFACTS", REPO / "test-artifacts"))
SCREENSHOT = REPO / "docs" / "images" / "run-view.png"
JAEGER = "http://jaeger.example:16686"
HOSTILE = "run-<script>alert(1)</script>-*?[x]"


@dataclasses.dataclass
class Incident:
    run_id: str
    journal_url: str
    state_url: str
    ops: Counter[str]
    hosts: set[str]
    #: What each read's own span said, as the page must label it: "node: cause (confidence)".
    labels: list[str]


@pytest.fixture(scope="module")
def incident(redis_server: RedisServer) -> Iterator[Incident]:
    """One run: a race, an expiry, a delete and a restart, between two worker hosts, with the watcher on."""
    with Lab(keyspace_events=True, seed=5) as lab:
        a, b = lab.workers[0], lab.workers[1]
        url, run = lab.state.url(), lab.new_run()

        def key(node: str) -> str:
            return names.DEFAULT_KEY_TEMPLATE.format(run_id=run, node_id=node)

        reads: dict[str, Any] = {}

        def read(node: str) -> None:
            reads[node] = b.get(url, run, node)
            assert reads[node].value is None

        a.init(url, run, "node-1")
        assert b.get(url, run, "node-1").value is not None  # a hit: not journalled
        read("node-race")  # worker-b reads before worker-a's init
        b.flush()
        a.init(url, run, "node-race")
        a.init(url, run, "node-ttl", ttl_ms=30)
        assert lab.wait_journal(run, "expired", key("node-ttl"))
        read("node-ttl")
        a.init(url, run, "node-del")
        lab.admin.delete(key("node-del"))
        assert lab.wait_journal(run, "del", key("node-del"))
        read("node-del")
        a.init(url, run, "node-restart")
        a.flush()
        lab.state.restart()  # type: ignore[union-attr]
        for watcher in lab.watchers:
            watcher.wait_subscribed(10)
        read("node-restart")

        def journalled() -> bool:
            lab.settle()
            got = Counter(e.op for e in lab.journal_entries(run))
            return got["miss"] == 4 and got["race"] == 1

        assert wait_for(journalled, 15, 0.1)
        entries = lab.journal_entries(run)
        ops = Counter(e.op for e in entries)
        assert ops == {"init": 5, "miss": 4, "race": 1, "expired": 1, "del": 1}, ops
        hosts = {e.host or "?" for e in entries}
        labels = ["node-race: get_before_init (definitive)"]  # the race entry settles it, whatever the span said
        for node in ("node-ttl", "node-del", "node-restart"):
            verdict = reads[node].verdict
            labels.append(f"{node}: {verdict[names.ATTR_MISSING_CAUSE]} ({verdict[names.ATTR_MISSING_CONFIDENCE]})")
        assert [label.split(": ")[1].split(" ")[0] for label in labels] == [
            "get_before_init", "expired", "deleted", "server_restart"]
        yield Incident(run, lab.journal_server.url(), url, ops, hosts, labels)


def shoot(loaded: Loaded, name: str) -> Path:
    """The top of the page (header, sentences, timeline, an open popover) as a PNG artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = loaded.page
    bottom = page.evaluate("""() => {
        const box = (sel) => { const el = document.querySelector(sel); if (!el || el.hidden) return 0;
                               const r = el.getBoundingClientRect(); return r.bottom + window.scrollY; };
        return Math.max(box('#timeline'), box('#popover')) + 12; }""")
    page.set_viewport_size({"width": 1240, "height": int(bottom)})
    path = ARTIFACTS / name
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": 1240, "height": int(bottom)})
    page.screenshot(path=str(ARTIFACTS / name.replace(".png", "-full.png")), full_page=True)
    return path


def test_the_run_view_renders_the_incident_in_chromium(incident: Incident, browser: Any, tmp_path: Path) -> None:
    """No console error, no request; lanes and marks match the journal; a miss's evidence opens on click."""
    path = tmp_path / "run.html"
    result = invoke("diagnose", "--redis-url", incident.state_url, "--run-id", incident.run_id, "--html", str(path),
                    "--jaeger-url", JAEGER, env={"OTEL_SUBFLOW_JOURNAL_URL": incident.journal_url})
    assert result.exit_code == 0, (result.stdout, result.stderr)
    loaded = load(browser, path)
    page = loaded.page
    assert loaded.errors == [] and loaded.requests == [] and loaded.dialogs == []

    lanes = page.locator("svg.timeline g.lane")
    assert sorted(lanes.evaluate_all("els => els.map(e => e.dataset.label)")) == sorted(incident.hosts)
    assert {"worker-a", "worker-b", identity.host} <= incident.hosts  # two workers and the lab's watcher
    marks = page.locator("svg.timeline g.mark")
    counts = Counter(marks.evaluate_all("els => els.map(e => e.dataset.op)"))
    gaps = counts.pop("watcher_gap", 0)
    assert counts == incident.ops, counts
    assert marks.count() == sum(incident.ops.values()) + gaps
    # worker-b did the reading, worker-a the writing; the watcher saw the expiry and the delete.
    assert page.locator('g.lane[data-label="worker-b"] g.mark[data-op="miss"]').count() == 4
    assert page.locator('g.lane[data-label="worker-a"] g.mark[data-op="init"]').count() == 5
    assert page.locator(f'g.lane[data-label="{identity.host}"] g.mark[data-op="expired"]').count() == 1
    labels = " ".join(page.locator('g.mark[data-op="miss"] text').evaluate_all("els => els.map(e => e.textContent)"))
    for label in incident.labels:
        assert label in labels, (label, labels)
    assert page.locator('g.link-g[data-op="get_before_init"]').count() == 1  # who read before whom
    assert page.locator('g.rule-g[data-op="restart"]').count() == 1
    assert page.locator("ol.story li").first.inner_text().count("worker-b") == 1

    # The evidence of the expired read, on click; the row of the journal table lights up.
    popover = page.locator("#popover")
    assert popover.is_hidden()
    page.locator('g.mark[data-op="miss"]', has_text="node-ttl").locator(".shape").click()
    assert popover.is_visible()
    text = popover.inner_text()
    assert incident.labels[1].split(": ")[1].split(" ")[0] in text and "worker-a had initialised it" in text
    assert popover.locator(f'a[href^="{JAEGER}/trace/"]').count() == 1
    assert page.locator("table.data tr.selected").count() == 1
    shot = shoot(loaded, "run-view.png")
    assert shot.stat().st_size > 10_000
    page.keyboard.press("Escape")
    assert popover.is_hidden()
    if os.environ.get("OTEL_SUBFLOW_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    page.close()


def test_a_run_id_with_markup_and_glob_characters_stays_text_in_chromium(r: Any, redis_server: RedisServer,
                                                                         browser: Any, tmp_path: Path) -> None:
    """A run id holding ``<script>`` and ``*?[``: shown as text, no script runs, the page still works."""
    from otel_subflow import flush_journals

    initialize_state(r, HOSTILE, "n1", "v")
    assert get_state(r, HOSTILE, "<b>n2</b>") is None
    assert flush_journals(5.0)
    assert len(store.read_run(r, HOSTILE)) == 2
    path = tmp_path / "hostile.html"
    result = invoke("diagnose", "--redis-url", redis_server.url(), "--run-id", HOSTILE, "--html", str(path))
    assert result.exit_code == 0, result.stderr
    loaded = load(browser, path)
    page = loaded.page
    assert loaded.errors == [] and loaded.dialogs == [] and loaded.requests == []
    assert page.locator("h1").inner_text() == f"Run {HOSTILE}"
    assert page.title() == f"Run {HOSTILE}"
    assert page.locator("script").count() == 1 and page.locator("b", has_text="n2").count() == 0
    assert page.locator('g.mark[data-op="miss"]').count() == 1
    page.locator('g.mark[data-op="miss"] .shape').click()
    assert "<b>n2</b>" in page.locator("#popover").inner_text()
    page.close()
