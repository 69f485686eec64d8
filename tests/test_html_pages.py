"""The HTML pages without a browser: escaping, the self-contained shell, the run view's model, ``diagnose --html``."""

from __future__ import annotations

import base64
import hashlib
import html as html_lib
import re
import stat
from pathlib import Path

import redis

from otel_subflow import flush_journals, names
from otel_subflow._journal.entries import JournalEntry
from otel_subflow.cli._html import Markup, Section, el, esc, page
from otel_subflow.cli._run_page import page_name, run_page
from otel_subflow.cli._run_view import RunView
from otel_subflow.cli._svg import Bar, Lane, Mark, TimeScale, svg_bars, svg_timeline
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import assert_one_line_error, invoke, run_cli
from tests.service import get_state, initialize_state

HOSTILE = "<script>alert(1)</script>*?[a]\"'&"


def entry(ms: int, op: str, pos: int = 0, **fields: str) -> JournalEntry:
    return JournalEntry(ms, pos, {"op": op, "lag_ms": "0", **fields})


def writer(host: str, pid: str, endpoint: str = "10.0.0.1:6379", server: str = "s1") -> dict[str, str]:
    return {"host": host, "pid": pid, "endpoint": endpoint, "db": "0", "server_run_id": server}


# -- the shell -----------------------------------------------------------------------------


def test_el_escapes_text_and_attributes_and_keeps_markup() -> None:
    """Plain strings are escaped wherever they go; Markup children are kept as they are."""
    out = el("a", HOSTILE, Markup("<b>ok</b>"), href=HOSTILE, data_pop="p1", class_="x", hidden=True, title=None)
    assert "<script>" not in out
    assert out.count("&lt;script&gt;") == 2
    assert "<b>ok</b>" in out and 'data-pop="p1"' in out and 'class="x"' in out and " hidden" in out
    assert "title" not in out
    assert esc(None) == "" and isinstance(esc("x"), Markup)


def test_the_page_is_self_contained_and_its_script_is_allowed_by_hash() -> None:
    """No external reference; CSP forbids every load and allows only the inline script's hash."""
    html = page("T <i>", [Section("One", el("p", "body"), id="one")], meta=[("k", "v")])
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", html)
    assert "<link" not in html and "@import" not in html
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert csp is not None
    policy = html_lib.unescape(csp.group(1))
    assert "default-src 'none'" in policy
    script = re.search(r"<script>(.*)</script>", html, re.S)
    assert script is not None and html.count("<script") == 1
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode()).digest()).decode()
    assert f"'sha256-{digest}'" in policy
    assert "<title>T &lt;i&gt;</title>" in html and 'href="#one"' in html


def test_svg_bars_and_timeline_draw_what_they_are_given() -> None:
    bars = svg_bars([Bar("expired", 3, kind="expired"), Bar("evicted", 1, kind="evicted")], unit="misses")
    assert bars.count('class="bar-g"') == 2 and 'data-value="3"' in bars
    columns = svg_bars([Bar("00:00", 2), Bar("00:05", 0)], vertical=True)
    assert columns.count('class="bar-g"') == 2
    chart = svg_timeline([Lane("a", "host-a"), Lane("b", HOSTILE)],
                         [Mark("a", 0, "init", label="n1"), Mark("b", 5, "miss", "triangle", label=HOSTILE, pop="p")])
    assert chart.count('class="lane"') == 2 and chart.count('data-op="miss"') == 1
    assert "<script>" not in chart


def test_time_scale_collapses_long_pauses_and_keeps_the_order() -> None:
    """Work at 0..200 ms and an hour later: the hour is a break, the first 200 ms keep most of the width."""
    scale = TimeScale([0, 100, 200, 3_600_000, 3_600_050], 0, 1000)
    assert len(scale.breaks) == 1
    xs = [scale.x(t) for t in (0, 100, 200, 3_600_000, 3_600_050)]
    assert xs == sorted(xs) and xs[1] - xs[0] > 100


# -- the run view's model ------------------------------------------------------------------------


def test_run_view_finds_races_restarts_and_failovers_in_the_journal() -> None:
    """A race corrects the miss's cause; a server run id change is a restart; a process moving server, a failover."""
    run = "r1"
    k = "subflow:state:r1:n1"
    entries = [
        entry(1000, "miss", key=k, node_id="n1", span_id="aa", cause="never_written", confidence="probable",
              **writer("b", "2")),
        entry(1003, "init", key=k, node_id="n1", ttl_ms="60000", **writer("a", "1")),
        entry(1004, "race", key=k, node_id="n1", get_span_id="aa", detected_by="cross_process_init",
              **writer("a", "1")),
        entry(1010, "init", key="subflow:state:r1:n2", node_id="n2", **writer("a", "1")),
        entry(1500, "miss", key="subflow:state:r1:n2", node_id="n2", span_id="bb", cause="server_restart",
              confidence="definitive", **writer("b", "2", server="s2")),
        entry(1600, "init", key="subflow:state:r1:n3", node_id="n3", **writer("a", "1", "10.0.0.2:6379", "s3")),
    ]
    view = RunView(run, entries)
    first, second = view.misses
    assert (first.cause, first.confidence, first.corrected_from) == ("get_before_init", "definitive", "never_written")
    assert first.read_before is entries[1]
    assert [link.kind for link in view.links()] == ["get_before_init"]
    kinds = [rule.kind for rule in view.rules]
    assert kinds == ["restart", "failover"], kinds
    restart = view.rules[0]
    assert 1010 <= restart.t_ms <= 1500 and "10.0.0.1:6379" in restart.title
    # n2's state ended with the restart; the sentence of its miss says so.
    assert any(s.kind == "restart" for s in view.spans())
    assert "restarted" in view.sentence(second)
    assert [lane.label for lane in view.lanes()] == ["b", "a"]
    assert len(view.marks()) == len(entries)


def test_a_hostile_run_id_and_fields_stay_text() -> None:
    """Run ids, hosts and nodes with markup or glob characters are escaped everywhere in the page."""
    entries = [entry(5, "init", key=f"k:{HOSTILE}", node_id=HOSTILE, **writer(HOSTILE, "1")),
               entry(9, "miss", key=f"k:{HOSTILE}", node_id=HOSTILE, cause="expired", confidence="definitive",
                     trace_id="ab" * 16, **writer("h2", "2"))]
    html = run_page(HOSTILE, entries, jaeger_url="http://jaeger:16686", redis_url="redis://:***@db:6379/0")
    assert "<script>alert" not in html
    assert html.count("<script") == 1
    assert esc(HOSTILE) in html
    assert 'href="http://jaeger:16686/trace/' + "ab" * 16 + '"' in html
    name = page_name(HOSTILE)
    assert "/" not in name and "<" not in name and "*" not in name and name.endswith(".html")
    assert page_name("run-abc") == "run-view_run-abc.html"


def test_an_unknown_run_gets_a_page_that_says_so() -> None:
    html = run_page("nope", [])
    assert "holds no record of this run" in html


# -- diagnose --html -------------------------------------------------------------------------------


def test_diagnose_html_writes_a_private_page_without_secrets(r: redis.Redis, redis_server: RedisServer,
                                                              tmp_path: Path) -> None:
    """--html alone: the page is written (0600), health is not run (exit 0), Jaeger credentials stay out."""
    run = "run-html-1"
    initialize_state(r, run, "n1", "v")
    assert get_state(r, run, "n2") is None
    assert flush_journals(5.0)
    path = tmp_path / "run.html"
    result = invoke("diagnose", "--redis-url", redis_server.url(), "--run-id", run, "--html", str(path),
                    "--jaeger-url", "http://admin:s3cret@jaeger.example:16686")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert f"Wrote the run view {path}" in result.stdout
    assert "Redis health" not in result.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    html = path.read_text()
    assert "s3cret" not in html and "http://jaeger.example:16686/trace/" in html
    assert html.count('data-op="miss"') == 1 and html.count('data-op="init"') == 1
    assert names.CAUSE_NEVER_WRITTEN in html


def test_diagnose_html_json_names_the_page(r: redis.Redis, redis_server: RedisServer, tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    result = invoke("diagnose", "--redis-url", redis_server.url(), "--run-id", "run-none", "--html", str(path),
                    "--json")
    assert result.exit_code == 0, result.stderr
    assert f'"html_path": "{path}"' in result.stdout
    assert "holds no record of this run" in path.read_text()


def test_diagnose_html_bad_input_is_one_line(redis_server: RedisServer, tmp_path: Path) -> None:
    """No --run-id, or a path in a missing directory: one line, exit 2, before any work."""
    missing = run_cli("diagnose", "--redis-url", redis_server.url(), "--html", str(tmp_path / "x.html"))
    assert missing.returncode == 2
    assert_one_line_error(missing.stderr, "--html needs --run-id")
    nowhere = run_cli("diagnose", "--redis-url", redis_server.url(), "--run-id", "r", "--html",
                      str(tmp_path / "no" / "x.html"))
    assert nowhere.returncode == 2
    assert_one_line_error(nowhere.stderr, "does not exist")
