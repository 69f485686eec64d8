"""``diagnose --patterns``: a known mix of misses over time, from two hosts, counted and ranked."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from otel_subflow import names
from otel_subflow.cli import main
from otel_subflow.cli._patterns import parse_duration_ms
from otel_subflow.lab.servers import RedisServer
from otel_subflow.lab.worker import Worker
from tests.browser import load
from tests.cli_helpers import wait_for

ARTIFACTS = Path(os.environ.get("OTEL_SUBFLOW_TEST_ARTIFACTS",
                                Path(__file__).resolve().parent.parent / "test-artifacts"))
BUCKET_S = 3


@pytest.fixture
def hosts(r: redis.Redis) -> Iterator[tuple[Worker, Worker]]:
    """A writer host and a reader host: worker processes with host identities, on the session's server."""
    # (counters into the journal's series every second, so each 3 s bucket gets its server figures)
    env = {"OTEL_SUBFLOW_JOURNAL_SERIES_INTERVAL": "1"}
    writer, reader = Worker("writer-1", env=env), Worker("reader-1", env=env)
    try:
        yield writer, reader
    finally:
        writer.stop()
        reader.stop()


def _server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _bucket_start(client: redis.Redis) -> int:
    """Wait until a bucket (a whole multiple of its width, as ``--patterns`` lays them out) begins."""
    width = BUCKET_S * 1000
    boundary = (_server_ms(client) // width + 1) * width
    wait_for(lambda: _server_ms(client) >= boundary, BUCKET_S + 5)
    return boundary


def test_patterns_count_a_known_mix_by_cause_host_pair_and_time_and_rank_the_fixes(
        r: redis.Redis, redis_server: RedisServer, hosts: tuple[Worker, Worker], browser: Any,
        tmp_path: Path) -> None:
    writer, reader = hosts
    url = redis_server.url()
    opened = _bucket_start(r)
    # Bucket 1: three states written with a 30 ms TTL by writer-1 and read by reader-1 after they
    # expired (timing), and two reads of states nobody wrote (application logic).
    for i in range(3):
        assert writer.init(url, "pat-exp", f"n{i}", ttl_ms=30)
    assert writer.flush()  # (an init still in its writer's queue at the read looks like a race: README, Limits)
    wait_for(lambda: r.exists(*[f"subflow:state:pat-exp:n{i}" for i in range(3)]) == 0, 5)
    # (the reader's journal flush a second after the writer's takes the bucket's second counters sample)
    wait_for(lambda: _server_ms(r) >= opened + 1100, 5)
    for i in range(3):
        assert reader.get(url, "pat-exp", f"n{i}").value is None
    for i in range(2):
        assert reader.get(url, "pat-none", f"n{i}").value is None
    assert reader.flush() and writer.flush()
    _bucket_start(r)
    # Bucket 2: two reads before the init, the init written by the other host afterwards (a race
    # found by the journal: the misses move from never_written to get_before_init).
    for i in range(2):
        assert reader.get(url, "pat-race", f"n{i}").value is None
    assert reader.flush()
    for i in range(2):
        assert writer.init(url, "pat-race", f"n{i}")
    assert writer.flush()

    result = CliRunner().invoke(main, ["diagnose", "--redis-url", url, "--patterns", "--since", "60s",
                                       "--bucket", f"{BUCKET_S}s", "--json"])
    assert result.exit_code in (0, 1), result.output
    section = json.loads(result.stdout)["sections"]["patterns"]
    assert section["misses"] == 7
    assert section["by_cause"] == {names.CAUSE_EXPIRED: 3, names.CAUSE_NEVER_WRITTEN: 2,
                                   names.CAUSE_GET_BEFORE_INIT: 2}
    assert section["by_category"] == {names.CATEGORY_TIMING: 5, names.CATEGORY_APPLICATION: 2}
    pairs = {(p["writer"], p["reader"]): (p["misses"], p["cross_server"]) for p in section["host_pairs"]}
    assert pairs == {("writer-1", "reader-1"): (5, True), ("(no init seen)", "reader-1"): (2, False)}
    # The misses fall in the buckets they were made in: find the bucket of each phase by its content.
    with_misses = [b for b in section["buckets"] if b["misses"]]
    assert [b["misses"] for b in with_misses] == [
        {names.CAUSE_EXPIRED: 3, names.CAUSE_NEVER_WRITTEN: 2}, {names.CAUSE_GET_BEFORE_INIT: 2}]
    assert with_misses[1]["start_ms"] - with_misses[0]["start_ms"] == BUCKET_S * 1000
    # The server beside them: the inits' counters samples (expired keys rose in the first bucket).
    first = with_misses[0]
    assert first["samples"] >= 1 and first["used_memory_bytes"] > 0
    assert first["avg_command_latency_us"] is not None and first["avg_command_latency_us"] > 0
    # The fixes ranked by the misses each would have prevented.
    ranking = [(fix["action"], fix["misses_prevented"]) for fix in section["remediations"]]
    assert ranking == [("raise_ttl", 3), ("await_init_before_dispatch", 2), ("initialise_node", 2)]

    text = CliRunner().invoke(main, ["diagnose", "--redis-url", url, "--patterns", "--since", "60s",
                                     "--bucket", f"{BUCKET_S}s"])
    assert "Fixes, by the misses each would have prevented" in text.stdout and "raise_ttl" in text.stdout
    assert "writer-1" in text.stdout and "reader-1" in text.stdout

    # The same as a page, in headless Chromium: it renders offline, and draws what the JSON says.
    html = tmp_path / "patterns.html"
    written = CliRunner().invoke(main, ["diagnose", "--redis-url", url, "--patterns", "--since", "60s",
                                        "--bucket", f"{BUCKET_S}s", "--html", str(html)])
    assert written.exit_code in (0, 1) and "Wrote the patterns page" in written.stdout, written.output
    loaded = load(browser, html)
    assert loaded.errors == [] and loaded.requests == [] and loaded.dialogs == []
    page = loaded.page
    bars = page.eval_on_selector_all("#causes .bar-g", "gs => gs.map(g => [g.dataset.label, g.dataset.value])")
    assert bars == [[names.CAUSE_EXPIRED, "3"], [names.CAUSE_NEVER_WRITTEN, "2"], [names.CAUSE_GET_BEFORE_INIT, "2"]]
    over_time = page.eval_on_selector_all("#time .bar-g", "gs => gs.map(g => Number(g.dataset.value))")
    assert sorted(v for v in over_time if v) == [2, 5]
    fixes = page.eval_on_selector_all("#fixes tbody tr", "rows => rows.map(r => r.cells[1].textContent)")
    assert fixes == ["raise_ttl", "await_init_before_dispatch", "initialise_node"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "patterns.png"), full_page=True)
    page.close()


def test_patterns_of_a_quiet_window_and_bad_durations(r: redis.Redis, redis_server: RedisServer) -> None:
    result = CliRunner().invoke(main, ["diagnose", "--redis-url", redis_server.url(), "--patterns", "--json"])
    section = json.loads(result.stdout)["sections"]["patterns"]
    assert section["misses"] == 0 and section["remediations"] == [] and 12 <= len(section["buckets"]) <= 13
    bad = CliRunner().invoke(main, ["diagnose", "--redis-url", redis_server.url(), "--patterns", "--since", "soon"])
    assert bad.exit_code == 2 and "is not a duration" in bad.output
    assert parse_duration_ms("24h") == 86_400_000 and parse_duration_ms("500ms") == 500
    with pytest.raises(ValueError):
        parse_duration_ms("0s")
