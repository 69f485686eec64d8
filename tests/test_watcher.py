"""The keyspace watcher: tombstones for state keys only, flag checks, reconnects with a recorded gap."""

from __future__ import annotations

import time

import pytest

from otel_subflow import KeyspaceEventsOff, KeyspaceWatcher, SubflowConfig, flush_journals
from otel_subflow._journal import journal_for, store
from otel_subflow._watcher import check_events_flags, key_pattern, merge_flags
from otel_subflow.lab.scenarios import wait_for
from otel_subflow.lab.servers import RedisServer


def _ops(client, run_id):
    return [e.op for e in store.read_run(client, run_id)]


def test_expired_evicted_del_become_tombstones_for_state_keys_only(redis_server):
    """expired and del of state keys are journalled; other keys are ignored."""
    with RedisServer(notify_keyspace_events="Exeg") as server:
        client = server.client()
        watcher = KeyspaceWatcher(server.client(), config=SubflowConfig()).start()
        try:
            client.set("subflow:state:run-w:a", 1, px=20)
            client.set("subflow:state:run-w:b", 1)
            client.delete("subflow:state:run-w:b")
            client.set("unrelated", 1)
            client.delete("unrelated")
            assert wait_for(lambda: (watcher.journal.flush(1), len(_ops(client, "run-w")))[1] == 2, 10)
        finally:
            watcher.stop()
        assert sorted(_ops(client, "run-w")) == ["del", "expired"]
        assert watcher.stats.tombstones == 2
        assert watcher.stats.ignored >= 1


def test_flags_check_and_enable():
    """Missing flags are named; enable_events adds them and keeps the others."""
    assert check_events_flags("").missing == "Exeg"
    assert check_events_flags("KEA").ok
    assert check_events_flags("Ex").missing == "eg"
    assert merge_flags("Kl") == "KlExeg"
    with RedisServer(notify_keyspace_events="Kl") as server:
        with pytest.raises(KeyspaceEventsOff, match="lacks 'Exeg'"):
            KeyspaceWatcher(server.client()).start()
        watcher = KeyspaceWatcher(server.client(), enable_events=True).start()
        watcher.stop()
        value = server.client().config_get("notify-keyspace-events")["notify-keyspace-events"]
        assert check_events_flags(value).ok and "l" in value


@pytest.mark.parametrize("down_s", [0.0, 2.0])
def test_reconnects_after_a_drop_and_records_the_gap(redis_server, down_s):
    """Server killed, restarted on the same port (at once, or later): resubscribed, gap journalled."""
    with RedisServer() as journal_server, RedisServer(notify_keyspace_events="Exeg") as server:
        config = SubflowConfig(journal_url=journal_server.url())
        journal = journal_for(None, config)
        watcher = KeyspaceWatcher(server.client(), journal=journal, config=config).start()
        try:
            server.kill()
            time.sleep(down_s)  # the outage itself, not a wait for a condition
            server.start()
            assert wait_for(lambda: watcher.stats.reconnects == 1 and watcher.subscribed, 30)
            client = server.client()
            client.set("subflow:state:run-g:a", 1)
            client.delete("subflow:state:run-g:a")
            jc = journal_server.client()
            assert wait_for(lambda: (journal.flush(1), _ops(jc, "run-g"))[1] == ["del"], 10)
            gaps = [e.fields for e in store.read_recent(jc, 1000) if e.op == "watcher_gap"]
            assert len(gaps) == 1
            assert int(gaps[0]["gap_end_ms"]) >= int(gaps[0]["gap_start_ms"])
        finally:
            watcher.stop()
        flush_journals()


def test_key_pattern_parses_run_and_node():
    """The template parser pulls run and node out of keys, and rejects other keys."""
    pattern = key_pattern("subflow:state:{run_id}:{node_id}")
    assert pattern.match("subflow:state:r1:n1").groupdict() == {"run_id": "r1", "node_id": "n1"}
    assert pattern.match("subflow:state:r:1:n") is not None
    assert pattern.match("other:r1:n1") is None
    custom = key_pattern("wf/{tenant}/{run_id}.{node_id}")
    assert custom.match("wf/acme/R.N").groupdict() == {"run_id": "R", "node_id": "N"}
