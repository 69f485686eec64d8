"""The remediation rules on hand-built verdicts, journals and server figures: the arithmetic and its edges."""

from __future__ import annotations

from typing import Any

import pytest

from otel_subflow import names
from otel_subflow._analysis import remediation as rem
from otel_subflow._analysis.probe import Evidence
from otel_subflow._analysis.remediation import Remediation, ServerFacts, remediate
from otel_subflow._analysis.verdict import Verdict
from otel_subflow._journal.entries import JournalEntry

NOW_MS = 1_800_000_000_000
KEY = "subflow:state:r1:n1"


def entry(ms: int, op: str, run: str = "r1", node: str = "n1", key: str | None = None, **fields: str) -> JournalEntry:
    base = {"op": op, "run_id": run, "node_id": node, "key": key or f"subflow:state:{run}:{node}",
            "host": "worker-a", "endpoint": "10.0.0.1:6379", "db": "0"}
    base.update(fields)
    return JournalEntry(ms, 0, base)


def facts(**info: Any) -> ServerFacts:
    base: dict[str, Any] = {"server_time_usec": NOW_MS * 1000, "uptime_in_seconds": 3600, "run_id": "a" * 40}
    base.update(info)
    return ServerFacts(info=base, config={"appendonly": "no", "appendfsync": "everysec", "save": ""})


def fixes(cause: str, entries: list[JournalEntry], server: ServerFacts | None = None, key: str = KEY,
          **said: Any) -> dict[str, Remediation]:
    verdict = Verdict(cause, names.CONFIDENCE_DEFINITIVE, "", said)
    evidence = Evidence(key=key, run_id="r1", node_id="n1", reader_endpoint="10.0.0.1:6379")
    return {fix.action: fix for fix in remediate(verdict, evidence, entries, server or facts())}


# -- arithmetic ---------------------------------------------------------------------------


def test_round_up_keeps_two_significant_digits_and_never_rounds_down() -> None:
    assert [rem.round_up(v) for v in (0, 7, 90, 370.5, 1234, 12_001)] == [0, 7, 90, 380, 1300, 13_000]
    assert rem.with_margin(247) == 380  # 370.5 rounded up
    assert rem.mib_up(1) == rem.mib_up(2**20) == 2**20 and rem.mib_up(2**20 + 1) == 2**21


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert (rem.percentile(values, 50), rem.percentile(values, 99), rem.percentile([5], 99)) == (50, 99, 5)
    assert rem.percentile([], 50) is None


def test_merge_entries_counts_a_record_once_and_orders_by_operation_time() -> None:
    """The run's read and the recent window overlap; a record that waited in its queue sorts by its own time."""
    init = entry(NOW_MS - 100, "init")
    late = entry(NOW_MS - 10, "miss", lag_ms="50")  # happened at NOW - 60
    merged = rem.merge_entries([init, late], [JournalEntry(init.arrival_ms, 7, dict(init.fields)), late])
    assert [e.op for e in merged] == ["init", "miss"]
    assert rem.init_to_read_gaps(merged, "n1") == [40]


def test_rank_actions_counts_the_misses_each_fix_prevents() -> None:
    def fix(action: str, prevents: bool | None) -> Remediation:
        return Remediation(action, "x", "", prevents)

    per_miss = [[fix("raise_ttl", True), fix("enable_aof", None)], [fix("raise_ttl", True)],
                [fix("align_endpoint", True), fix("raise_ttl", False)]]
    assert rem.rank_actions(per_miss) == [("raise_ttl", 2), ("align_endpoint", 1)]


# -- the rules ------------------------------------------------------------------------------


def test_expired_gaps_across_runs_recommended_ttl_and_its_memory_cost() -> None:
    """Gaps of node n1 in three runs (another node ignored): p50/p99/max, max x1.5, and rate x TTL x bytes."""
    journal: list[JournalEntry] = []
    for run, gap in (("r1", 120), ("r2", 80), ("r3", 300)):
        start = NOW_MS - 10_000 + len(journal) * 1000
        journal += [entry(start, "init", run, ttl_ms="50"), entry(start + gap, "miss", run)]
    journal.append(entry(NOW_MS - 9_000, "miss", "r9", "other"))
    server = ServerFacts(info=facts().info, state_keys_sampled=4, state_key_bytes=100.0, state_keys_seen=4)
    fix = fixes(names.CAUSE_EXPIRED, journal, server)[rem.RAISE_TTL]
    n = fix.numbers
    assert n["init_to_read_ms"] == {"samples": 3, "p50_ms": 120, "p99_ms": 300, "max_ms": 300}
    assert n["recommended_ttl_ms"] == 450 and n["current_ttl_ms"] == 50 and fix.prevents is True
    window_s = (NOW_MS - journal[0].op_ms) / 1000  # the journal's window: its first record .. the analysis
    assert n["node_inits_per_s"] == round(3 / window_s, 3) and n["window_ms"] == window_s * 1000
    assert n["keys_alive_at_recommended"] == 1 and n["memory_at_recommended_bytes"] == 100
    assert n["extra_memory_bytes"] == pytest.approx(3 / window_s * 0.4 * 100, abs=1)
    assert "x1.5" in fix.why and "300 ms" in fix.why


def test_expired_without_a_journalled_read_uses_the_time_until_the_analysis() -> None:
    fix = fixes(names.CAUSE_EXPIRED, [entry(NOW_MS - 2_000, "init", ttl_ms="1000")], ms_since_init=2_000)
    n = fix[rem.RAISE_TTL].numbers
    assert n["unjournalled_read_ms"] == 2_000 and n["recommended_ttl_ms"] == 3_000
    assert "no state key was alive" in n["memory_cost_unknown"]
    assert remediate(Verdict(names.CAUSE_EXPIRED, "probable", "", {}), Evidence(key=KEY, run_id="r1", node_id="n1"),
                     [], ServerFacts()) == []  # no init, no read: no gap to size a TTL on


def test_evicted_since_the_inits_counters_sample() -> None:
    """The init's counters ('<ms> <evicted> <expired> <deletes>') give the evictions of this incident only."""
    init = entry(NOW_MS - 4_000, "init", ttl_ms="600000", counters=f"{NOW_MS - 5_000} 10 0 0")
    server = facts(used_memory=2 * 2**20, maxmemory=2 * 2**20, maxmemory_policy="allkeys-lru", evicted_keys=110,
                   db0={"keys": 1024, "expires": 1024, "avg_ttl": 1000})
    found = fixes(names.CAUSE_EVICTED, [init, entry(NOW_MS, "evicted")], server)
    n = found[rem.RAISE_MAXMEMORY].numbers
    assert (n["evicted_since_init"], n["eviction_window_ms"], n["eviction_rate_per_s"]) == (100, 5_000, 20.0)
    assert n["avg_key_bytes"] == 2048.0 and n["evicted_bytes_estimate"] == 204_800
    assert n["recommended_maxmemory_bytes"] == rem.mib_up((2 * 2**20 + 204_800) * 1.25) == 3 * 2**20
    assert found[rem.OWN_NOEVICTION_REDIS].numbers["recommended_maxmemory_bytes"] is None  # nothing weighed
    # 600,000 ms TTL, gone 4,000 ms after the init: 596,000 ms left > 1,000 ms on average
    volatile = found[rem.VOLATILE_TTL_POLICY]
    assert volatile.numbers["state_ttl_left_ms"] == 596_000 and volatile.prevents is True


def test_restart_with_config_refused_reads_info_persistence_and_says_so() -> None:
    init = entry(NOW_MS - 4_500, "init")
    server = ServerFacts(info={"server_time_usec": NOW_MS * 1000, "uptime_in_seconds": 2, "aof_enabled": 0,
                               "run_id": "b" * 40},
                         config_refused="refused to this user (ACL)")
    found = fixes(names.CAUSE_SERVER_RESTART, [init], server, server_run_id="b" * 40)
    aof = found[rem.ENABLE_AOF]
    assert aof.numbers["init_to_restart_ms"] == 2_500 and aof.prevents is True  # > 1 s: kept even by everysec
    assert aof.numbers["aof_enabled"] == 0 and "refused to this user (ACL)" in aof.numbers["persistence_source"]
    assert "save points unknown" in aof.why
    assert rem.RDB_SAVE_POINTS in found


def test_restart_time_is_unknown_when_the_server_restarted_again() -> None:
    found = fixes(names.CAUSE_SERVER_RESTART, [entry(NOW_MS - 4_500, "init")], facts(), server_run_id="c" * 40)
    assert found[rem.ENABLE_AOF].numbers["init_to_restart_ms"] is None
    assert found[rem.ENABLE_AOF].prevents is None


def test_a_promoted_reader_adds_the_replication_fix() -> None:
    init = entry(NOW_MS - 500, "init", endpoint="10.0.0.2:6379", server_run_id="old")
    server = facts(role="master", second_repl_offset=4242, connected_slaves=0)
    found = fixes(names.CAUSE_WRONG_ENDPOINT, [init], server)
    assert set(found) == {rem.ALIGN_ENDPOINT, rem.REPLICATE_AND_WAIT}
    assert found[rem.REPLICATE_AND_WAIT].numbers["second_repl_offset"] == 4242


@pytest.mark.parametrize("cause", names.ALL_CAUSES)
def test_every_cause_survives_no_evidence_at_all(cause: str) -> None:
    """Nothing journalled, nothing from the server: no crash, and no number made up."""
    for fix in remediate(Verdict(cause, names.CONFIDENCE_UNKNOWN, "", {}), Evidence(key=KEY, run_id=None,
                         node_id=None), [], ServerFacts()):
        assert fix.action and fix.why and fix.cause == cause
        assert fix.numbers.get("recommended_ttl_ms") is None
