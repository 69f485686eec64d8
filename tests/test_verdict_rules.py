"""The verdict rules on hand-built evidence: each rule, and the edges between them."""

from __future__ import annotations

from otel_subflow import names
from otel_subflow._analysis.probe import Evidence
from otel_subflow._analysis.verdict import decide
from otel_subflow._journal.entries import JournalEntry

KEY = "subflow:state:r1:n1"
NOW_MS = 1_800_000_000_000
RUN_A = "a" * 40
RUN_B = "b" * 40


def evidence(**kw) -> Evidence:
    info = {"run_id": RUN_A, "uptime_in_seconds": "3600", "server_time_usec": str(NOW_MS * 1000),
            "maxmemory_policy": "noeviction", "maxmemory": "0", "used_memory": "1000", "evicted_keys": "0",
            "role": "master"}
    info.update(kw.pop("info", {}))
    ev = Evidence(key=KEY, run_id="r1", node_id="n1", info=info, journal_read=True, scan_complete=True,
                  reader_endpoint="10.0.0.1:6379", cached_server_run_id=RUN_A)
    for name, value in kw.items():
        setattr(ev, name, value)
    if "journal_total" not in kw:
        ev.journal_total = len(ev.journal)
    return ev


def init(ms: int, **fields: str) -> JournalEntry:
    base = {"op": "init", "key": KEY, "node_id": "n1", "run_id": "r1", "server_run_id": RUN_A, "db": "0",
            "endpoint": "10.0.0.1:6379", "ttl_ms": "60000", "host": "worker-a"}
    base.update(fields)
    return JournalEntry(ms, 0, base)


def stone(ms: int, op: str, **fields: str) -> JournalEntry:
    return JournalEntry(ms, 0, {"op": op, "key": KEY, "db": "0", **fields})


def test_key_exists_now_is_get_before_init():
    """PTTL says the key exists at analysis time: the read came first."""
    v = decide(evidence(pttl_ms=59_000))
    assert (v.cause, v.confidence) == (names.CAUSE_GET_BEFORE_INIT, names.CONFIDENCE_DEFINITIVE)


def test_tombstone_after_the_last_init_decides():
    """The newest tombstone after the last init wins; one before it does not count."""
    journal = [stone(NOW_MS - 900, "del"), init(NOW_MS - 800), stone(NOW_MS - 100, "evicted")]
    v = decide(evidence(journal=journal))
    assert (v.cause, v.confidence) == (names.CAUSE_EVICTED, names.CONFIDENCE_DEFINITIVE)
    assert v.evidence["tombstone_op"] == "evicted"


def test_tombstone_of_another_db_is_ignored():
    """A del in db 3 says nothing about the key in db 0."""
    v = decide(evidence(journal=[init(NOW_MS - 800), stone(NOW_MS - 100, "del", db="3")]))
    assert v.cause == names.CAUSE_UNKNOWN


def test_ttl_arithmetic_uses_the_queue_lag():
    """Init flushed 300 ms after it happened: 60 s TTL from the operation time, not the flush."""
    journal = [init(NOW_MS - 59_800, ttl_ms="60000", lag_ms="300")]
    v = decide(evidence(journal=journal))
    assert (v.cause, v.confidence) == (names.CAUSE_EXPIRED, names.CONFIDENCE_PROBABLE)
    assert v.evidence["ms_since_init"] == 60_100


def test_eviction_is_probable_under_pressure_only():
    """Evicting policy, evictions, near maxmemory: probable eviction; without pressure: unknown."""
    pressure = {"maxmemory_policy": "volatile-lru", "maxmemory": "1000", "used_memory": "990", "evicted_keys": "7"}
    assert decide(evidence(journal=[init(NOW_MS - 10)], info=pressure)).cause == names.CAUSE_EVICTED
    relaxed = dict(pressure, used_memory="100")
    assert decide(evidence(journal=[init(NOW_MS - 10)], info=relaxed)).cause == names.CAUSE_UNKNOWN


def test_other_db_is_a_wrong_endpoint():
    v = decide(evidence(journal=[init(NOW_MS - 10, db="1")]))
    assert (v.cause, v.confidence) == (names.CAUSE_WRONG_ENDPOINT, names.CONFIDENCE_DEFINITIVE)


def test_same_address_new_run_id_is_a_restart():
    """The same address answers with another server process: restart, definitive."""
    v = decide(evidence(journal=[init(NOW_MS - 5000)], info={"run_id": RUN_B, "uptime_in_seconds": "2"},
                        cached_server_run_id=RUN_B))
    assert (v.cause, v.confidence) == (names.CAUSE_SERVER_RESTART, names.CONFIDENCE_DEFINITIVE)


def test_other_address_is_a_wrong_endpoint_definitive_only_with_uptime_to_spare():
    """Init on another address: wrong endpoint; definitive when the reader's server was up long before."""
    other = init(NOW_MS - 5000, server_run_id=RUN_B, endpoint="10.0.0.2:6379")
    v = decide(evidence(journal=[other]))
    assert (v.cause, v.confidence) == (names.CAUSE_WRONG_ENDPOINT, names.CONFIDENCE_DEFINITIVE)
    young = decide(evidence(journal=[other], info={"uptime_in_seconds": "5"}))
    assert (young.cause, young.confidence) == (names.CAUSE_WRONG_ENDPOINT, names.CONFIDENCE_PROBABLE)


def test_replica_lag_needs_the_master_to_have_the_key():
    replica = {"role": "slave", "master_host": "10.0.0.9", "master_port": "6379", "master_link_status": "up"}
    v = decide(evidence(info=replica, master_has_key=True, master_endpoint="10.0.0.9:6379"))
    assert (v.cause, v.confidence) == (names.CAUSE_REPLICA_LAG, names.CONFIDENCE_DEFINITIVE)
    assert decide(evidence(info=replica, master_has_key=False)).cause == names.CAUSE_NEVER_WRITTEN


def test_key_mismatch_from_scan_or_from_the_journal():
    """A near-identical key found by SCAN, or an init of the same node under another key."""
    assert decide(evidence(near_keys=["subflow:state:r1:N1"])).cause == names.CAUSE_KEY_MISMATCH
    other_key = init(NOW_MS - 10, key="subflow:state:r1:n1:v2")
    v = decide(evidence(journal=[other_key]))
    assert (v.cause, v.evidence["near_key"]) == (names.CAUSE_KEY_MISMATCH, "subflow:state:r1:n1:v2")


def test_no_journal_after_a_restart_is_a_probable_restart():
    v = decide(evidence(info={"run_id": RUN_B}, cached_server_run_id=RUN_A))
    assert (v.cause, v.confidence) == (names.CAUSE_SERVER_RESTART, names.CONFIDENCE_PROBABLE)


def test_never_written_is_probable_and_unread_journal_is_unknown():
    v = decide(evidence(journal=[init(NOW_MS - 10, key="subflow:state:r1:n2", node_id="n2")]))
    assert (v.cause, v.confidence) == (names.CAUSE_NEVER_WRITTEN, names.CONFIDENCE_PROBABLE)
    assert decide(evidence(journal_read=False)).cause == names.CAUSE_UNKNOWN


def test_flush_after_init_is_a_probable_deletion():
    info = {"cmdstat_flushdb": "calls=1,usec=10,usec_per_call=10.00"}
    v = decide(evidence(journal=[init(NOW_MS - 10)], info=info, run_keys_seen=0))
    assert (v.cause, v.confidence) == (names.CAUSE_DELETED, names.CONFIDENCE_PROBABLE)


def test_event_attributes_carry_the_contract_names():
    attrs = decide(evidence(pttl_ms=10)).event_attributes()
    assert attrs[names.ATTR_MISSING_CAUSE] == names.CAUSE_GET_BEFORE_INIT
    assert attrs[names.ATTR_MISSING_SUMMARY].endswith(".")
    assert all(k.startswith(("subflow.missing.", names.EVIDENCE_PREFIX)) for k in attrs)


def test_journal_on_an_evicting_redis_is_named_in_the_verdict():
    """The journal shares a Redis whose policy evicts: a verdict resting on the journal's silence says
    the journal may have been evicted too (evidence ``journal_evictable``); a dedicated journal does not."""
    shared = decide(evidence(info={"maxmemory_policy": "allkeys-lru"}))
    assert shared.cause == names.CAUSE_NEVER_WRITTEN
    assert shared.evidence["journal_evictable"] is True
    assert "may evict its records too" in shared.summary and "OTEL_SUBFLOW_JOURNAL_URL" in shared.summary
    dedicated = decide(evidence(info={"maxmemory_policy": "allkeys-lru"}, journal_dedicated=True))
    assert "journal_evictable" not in dedicated.evidence and "evict its records" not in dedicated.summary


def test_paused_journal_is_named_in_the_verdict():
    """The journal paused under memory pressure: a verdict resting on its silence says inits may be missing."""
    v = decide(evidence(journal_paused=True))
    assert v.cause == names.CAUSE_NEVER_WRITTEN
    assert v.evidence["journal_paused"] is True
    assert "journal is paused under memory pressure" in v.summary
    assert "journal_paused" not in decide(evidence()).evidence


# -- Redis's counters, when no tombstone was recorded ------------------------------------------


def counted(ms: int, evicted: int, expired: int, deletes: int, **fields: str):
    return init(ms, counters=f"{ms - 500} {evicted} {expired} {deletes}", **fields)


def counters_now(evicted: int, expired: int, deletes: int) -> dict[str, str]:
    return {"evicted_keys": str(evicted), "expired_keys": str(expired), "cmdstat_get": "calls=9,usec=1",
            "cmdstat_del": f"calls={deletes},usec=1,usec_per_call=1.00"}


def test_counters_decide_evicted_when_nothing_deleted():
    """No tombstone; since the init Redis evicted keys and ran no deleting command: evicted (probable)."""
    v = decide(evidence(journal=[counted(NOW_MS - 5000, 10, 3, 7)], info=counters_now(12, 3, 7)))
    assert (v.cause, v.confidence) == (names.CAUSE_EVICTED, names.CONFIDENCE_PROBABLE)
    assert v.evidence["evicted_since_init"] == 2 and v.evidence["deletes_since_init"] == 0


def test_counters_decide_deleted_when_nothing_evicted():
    v = decide(evidence(journal=[counted(NOW_MS - 5000, 10, 3, 7)], info=counters_now(10, 5, 8)))
    assert (v.cause, v.confidence) == (names.CAUSE_DELETED, names.CONFIDENCE_PROBABLE)
    assert v.evidence["deletes_since_init"] == 1


def test_counters_that_both_rose_decide_nothing():
    v = decide(evidence(journal=[counted(NOW_MS - 5000, 10, 3, 7)], info=counters_now(11, 3, 8)))
    assert v.cause == names.CAUSE_UNKNOWN


def test_unchanged_expiries_rule_out_expired():
    """The TTL arithmetic says 'expired', but Redis expired nothing since the init (and deleted a key)."""
    journal = [counted(NOW_MS - 90_000, 10, 3, 7, ttl_ms="60000")]
    v = decide(evidence(journal=journal, info=counters_now(10, 3, 8)))
    assert v.cause == names.CAUSE_DELETED
    still = decide(evidence(journal=journal, info=counters_now(10, 4, 7)))
    assert (still.cause, still.confidence) == (names.CAUSE_EXPIRED, names.CONFIDENCE_PROBABLE)


def test_counters_of_a_restarted_server_say_nothing():
    """uptime shorter than the sample's age: the counters started from zero again."""
    info = {**counters_now(12, 3, 7), "uptime_in_seconds": "2"}
    v = decide(evidence(journal=[counted(NOW_MS - 5000, 10, 3, 7)], info=info))
    assert "evicted_since_init" not in v.evidence and v.cause != names.CAUSE_EVICTED


def test_key_mismatch_when_one_side_adds_a_prefix():
    """The run's journal has the init under the writer's prefixed key (Celery's ``global_keyprefix`` on the
    worker only), the reader names no node: key_mismatch, definitive, both spellings in the evidence."""
    read = "celery-task-meta-t1"
    written = "myprefix:celery-task-meta-t1"
    ev = evidence(journal=[init(NOW_MS - 10, key=written, node_id="")], key=read, node_id=None)
    v = decide(ev)
    assert (v.cause, v.confidence) == (names.CAUSE_KEY_MISMATCH, names.CONFIDENCE_DEFINITIVE)
    assert (v.evidence["read_key"], v.evidence["written_key"]) == (read, written)
    assert (v.evidence["key_affix"], v.evidence["key_affix_text"]) == ("prefix", "myprefix:")
    assert read in v.summary and written in v.summary and "writer's side" in v.summary


def test_key_mismatch_when_the_reader_adds_a_prefix_or_a_suffix():
    """The reverse (the reader's key is the longer one), and a suffix either way."""
    for read, written, affix in (("myprefix:celery-task-meta-t1", "celery-task-meta-t1", ("prefix", "myprefix:")),
                                 ("subflow:state:r1:n1", "subflow:state:r1:n1:v2", ("suffix", ":v2")),
                                 ("subflow:state:r1:n1.json", "subflow:state:r1:n1", ("suffix", ".json"))):
        v = decide(evidence(journal=[init(NOW_MS - 10, key=written, node_id="")], key=read, node_id=None))
        assert v.cause == names.CAUSE_KEY_MISMATCH, (read, written)
        assert (v.evidence["key_affix"], v.evidence["key_affix_text"]) == affix


def test_an_affix_must_be_separator_delimited_and_another_node_is_not_a_spelling():
    """``t1`` vs ``xt1`` is another key, not a prefix; node ``n1`` vs ``n1-2`` is another node."""
    v = decide(evidence(journal=[init(NOW_MS - 10, key="celery-task-meta-xt1", node_id="")],
                        key="celery-task-meta-t1", node_id=None))
    assert v.cause == names.CAUSE_NEVER_WRITTEN
    v = decide(evidence(journal=[init(NOW_MS - 10, key=KEY + "-2", node_id="n1-2")]))
    assert v.cause == names.CAUSE_NEVER_WRITTEN


# -- failover -----------------------------------------------------------------------------------

REPLID2 = "c" * 40
OLD_MASTER = "10.0.0.2:6379"


def cluster_nodes(init_flags: str, init_master: str = "-", init_slots: str = "") -> list:
    from otel_subflow._analysis.probe import parse_cluster_nodes

    slot = _slot()
    lines = [f"me01 10.0.0.1:6379@16379 myself,master - 0 0 7 connected {slot}-{slot}",
             f"old02 {OLD_MASTER}@16379 {init_flags} {init_master} 0 0 6 connected {init_slots}".rstrip(),
             "c03 10.0.0.3:6379@16379 master - 0 0 3 connected 0-100"]
    return parse_cluster_nodes("\n".join(lines))


def _slot() -> int:
    from redis.crc import key_slot

    return key_slot(KEY.encode())


def failover_evidence(**kw) -> Evidence:
    journal = [init(NOW_MS - 800, endpoint=OLD_MASTER, server_run_id=RUN_B)]
    return evidence(journal=journal, cached_server_run_id=None, **kw)


def test_a_cluster_whose_init_node_failed_and_whose_reader_serves_the_slot_is_a_definitive_failover():
    v = decide(failover_evidence(info={"master_replid2": REPLID2}, key_slot=_slot(),
                                 cluster_nodes=cluster_nodes("master,fail")))
    assert (v.cause, v.confidence) == (names.CAUSE_FAILOVER, names.CONFIDENCE_DEFINITIVE)
    assert "failed" in v.summary and v.evidence["init_endpoint"] == OLD_MASTER


def test_a_cluster_whose_init_node_now_follows_the_reader_is_a_definitive_failover():
    v = decide(failover_evidence(key_slot=_slot(), cluster_nodes=cluster_nodes("slave", init_master="me01")))
    assert (v.cause, v.confidence) == (names.CAUSE_FAILOVER, names.CONFIDENCE_DEFINITIVE)


def test_a_cluster_whose_init_node_still_serves_the_slot_is_no_failover():
    """Both claim the slot (a stale view): nothing proves the failover, and the reader was never promoted."""
    slot = _slot()
    v = decide(failover_evidence(key_slot=slot, cluster_nodes=cluster_nodes("master", init_slots=f"{slot}-{slot}")))
    assert v.cause == names.CAUSE_WRONG_ENDPOINT


def test_a_promoted_reader_whose_replica_is_the_old_master_is_a_definitive_failover():
    """Sentinel or plain replication: INFO replication of the reader lists the init's server as its replica."""
    v = decide(failover_evidence(info={"master_replid2": REPLID2, "second_repl_offset": "4242",
                                       "slave0": "ip=10.0.0.2,port=6379,state=online,offset=5000,lag=0"}))
    assert (v.cause, v.confidence) == (names.CAUSE_FAILOVER, names.CONFIDENCE_DEFINITIVE)
    assert v.evidence["second_repl_offset"] == 4242


def test_a_promoted_reader_with_no_link_to_the_init_is_a_probable_failover():
    v = decide(failover_evidence(info={"master_replid2": REPLID2}))
    assert (v.cause, v.confidence) == (names.CAUSE_FAILOVER, names.CONFIDENCE_PROBABLE)


def test_a_never_promoted_reader_is_still_a_wrong_endpoint():
    v = decide(failover_evidence(info={"master_replid2": "0" * 40}))
    assert v.cause == names.CAUSE_WRONG_ENDPOINT


def test_a_cluster_client_reading_replicas_with_the_init_before_the_read_is_replica_lag():
    """The key is on its master now; the init was journalled before the read started; the cluster client
    may read from replicas: the replica that served the read lagged."""
    v = decide(evidence(pttl_ms=59_000, reads_replicas=True, read_age_ms=5.0, journal=[init(NOW_MS - 300)]))
    assert (v.cause, v.confidence) == (names.CAUSE_REPLICA_LAG, names.CONFIDENCE_DEFINITIVE)
    assert v.evidence["ms_init_before_read"] == 295.0


def test_an_init_after_the_read_started_is_still_get_before_init_on_a_replica_reading_cluster():
    v = decide(evidence(pttl_ms=59_000, reads_replicas=True, read_age_ms=500.0, journal=[init(NOW_MS - 300)]))
    assert v.cause == names.CAUSE_GET_BEFORE_INIT


def test_a_cluster_client_reading_masters_only_is_get_before_init():
    v = decide(evidence(pttl_ms=59_000, reads_replicas=False, read_age_ms=5.0, journal=[init(NOW_MS - 300)]))
    assert v.cause == names.CAUSE_GET_BEFORE_INIT
