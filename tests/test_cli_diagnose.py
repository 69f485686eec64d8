"""``otel-subflow diagnose``: every section against real redis-servers seeded by the lab's scenarios."""

from __future__ import annotations

import json
import re
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from otel_subflow import flush_journals, names
from otel_subflow.cli.diagnose import SCHEMA
from otel_subflow.lab.harness import Lab, wait_for
from otel_subflow.lab.scenarios import SCENARIOS
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import invoke, invoke_json, run_cli
from tests.service import get_state, initialize_state

JAEGER = "http://jaeger.example:16686"


@pytest.fixture(scope="module")
def lab(redis_server: RedisServer) -> Iterator[Lab]:
    with Lab(keyspace_events=True, seed=4) as running:
        yield running


def lab_env(lab: Lab) -> dict[str, str]:
    """The CLI reads the journal where the lab's workers write it."""
    return {"OTEL_SUBFLOW_JOURNAL_URL": lab.journal_server.url()}


def finding_rules(document: dict[str, Any]) -> dict[str, str]:
    return {f["rule"]: f["severity"] for f in document["findings"]}


# -- --redis-health ----------------------------------------------------------------


def test_health_of_a_well_configured_server_is_exit_0() -> None:
    """AOF on, keyspace events on, no eviction: no findings, status healthy, exit 0 (a real process)."""
    with RedisServer(extra_args=["--appendonly", "yes"]) as server:
        proc = run_cli("diagnose", "--redis-health", "--redis-url", server.url(), "--json")
        assert proc.returncode == 0, proc.stderr
        document = json.loads(proc.stdout)
        human = run_cli("diagnose", "--redis-health", "--redis-url", server.url())
        run_id = server.run_id()
    assert human.returncode == 0
    assert "Redis health: healthy" in human.stdout
    assert "No findings" in human.stdout
    assert document["schema"] == SCHEMA
    assert document["status"] == "healthy" and document["exit_code"] == 0 and document["findings"] == []
    health = document["sections"]["redis_health"]
    assert health["persistence"]["enabled"] is True
    assert health["role"] == "master"
    assert health["server"]["run_id"] == run_id
    assert health["keyspace_events"]["missing"] == ""


def test_health_ping_samples_and_shape(r: redis.Redis, redis_server: RedisServer) -> None:
    """--samples PINGs; p50 <= p99 <= max; clients and replication reported."""
    document = invoke_json("diagnose", "--redis-health", "--samples", "7", "--redis-url", redis_server.url(), code=1)
    ping = document["sections"]["redis_health"]["ping"]
    assert ping["samples"] == 7
    assert 0 < ping["min_ms"] <= ping["p50_ms"] <= ping["p99_ms"] <= ping["max_ms"]
    health = document["sections"]["redis_health"]
    assert health["clients"]["connected"] >= 1
    assert health["clients"]["rejected_connections"] == 0
    assert health["replication"] == {"role": "master", "connected_replicas": 0, "replicas": [], "master": None}
    # The test server runs without persistence: a warning, exit 1.
    assert finding_rules(document) == {"persistence_off": "warning"}
    assert document["status"] == "warning" and document["exit_code"] == 1


def test_health_without_section_flag_defaults_to_redis_health(r: redis.Redis, redis_server: RedisServer) -> None:
    document = invoke_json("diagnose", "--redis-url", redis_server.url(), code=1)
    assert list(document["sections"]) == ["redis_health"]


def test_health_flags_keyspace_events_off() -> None:
    """notify-keyspace-events empty: a warning that names the missing flags and the fix."""
    with RedisServer(notify_keyspace_events="") as server:
        document = invoke_json("diagnose", "--redis-health", "--redis-url", server.url(), code=1)
    (finding,) = [f for f in document["findings"] if f["rule"] == "keyspace_events"]
    assert finding["severity"] == "warning"
    assert "Exeg" in finding["fix"]
    assert document["sections"]["redis_health"]["keyspace_events"]["missing"] == "Exeg"


def _fill_until_evicting(client: redis.Redis) -> None:
    payload = b"x" * 8192
    for batch in range(200):
        pipe = client.pipeline(transaction=False)
        for i in range(50):
            pipe.set(f"filler:{batch}:{i}", payload, ex=600)
        pipe.execute()
        if int(client.info("stats")["evicted_keys"]) > 0:
            return
    raise AssertionError("the server never evicted")


def test_health_is_critical_when_ttl_keys_are_being_evicted() -> None:
    """volatile-lru near maxmemory with evictions: critical findings, exit 2 (the probe's 'down')."""
    with RedisServer(maxmemory="2mb", maxmemory_policy="volatile-lru") as server:
        client = server.client()
        _fill_until_evicting(client)
        proc = run_cli("diagnose", "--redis-health", "--redis-url", server.url(), "--json")
        client.close()
    assert proc.returncode == 2, proc.stderr
    document = json.loads(proc.stdout)
    rules = finding_rules(document)
    assert rules["eviction_policy"] == "critical"
    assert rules["memory_near_max"] in ("warning", "critical")
    assert document["status"] == "critical" and document["exit_code"] == 2
    assert document["sections"]["redis_health"]["memory"]["maxmemory_policy"] == "volatile-lru"


def test_health_policy_without_maxmemory_is_only_info() -> None:
    with RedisServer(maxmemory_policy="allkeys-lru", extra_args=["--appendonly", "yes"]) as server:
        document = invoke_json("diagnose", "--redis-url", server.url(), code=0)
    assert finding_rules(document) == {"eviction_policy": "info"}


# -- --memory-analysis -----------------------------------------------------------------


def test_memory_analysis_weighs_state_keys(r: redis.Redis, redis_server: RedisServer) -> None:
    """State keys counted on the template's pattern, largest first by MEMORY USAGE; other keys ignored."""
    for i in range(29):
        r.set(f"subflow:state:run-m:n{i}", "v" * (10 + i), px=600_000)
    r.set("subflow:state:run-m:mid", "M" * 5_000, px=600_000)
    r.set("subflow:state:run-m:big", "B" * 20_000)  # no TTL
    r.set("unrelated:key", "u" * 50_000)
    document = invoke_json("diagnose", "--memory-analysis", "--sample-interval", "0.1", "--top", "3",
                           "--redis-url", redis_server.url())
    memory = document["sections"]["memory_analysis"]
    keys = memory["state_keys"]
    assert keys["pattern"] == "subflow:state:*:*"
    assert keys["count"] == 31 and keys["count_is_lower_bound"] is False
    assert keys["without_ttl"] == 1
    largest = keys["largest"]
    assert len(largest) == 3
    assert largest[0]["key"] == "subflow:state:run-m:big"
    assert largest[0]["bytes"] >= 20_000 and largest[0]["pttl_ms"] == -1
    assert largest[1]["key"] == "subflow:state:run-m:mid"
    assert largest[0]["bytes"] > largest[1]["bytes"] > largest[2]["bytes"]
    assert 5_000 <= largest[1]["bytes"] < 20_000 and 0 < largest[1]["pttl_ms"] <= 600_000
    assert memory["keyspace"]["db0"]["keys"] == 32
    assert memory["keyspace"]["db0"]["expires"] == 30
    assert memory["maxmemory_bytes"] == 0 and memory["used_ratio"] is None
    assert memory["used_bytes"] > 0 and memory["fragmentation_ratio"] is not None
    assert isinstance(memory["memory_doctor"], str) and memory["memory_doctor"]
    assert "redis_health" not in document["sections"]


def test_memory_analysis_shows_the_journals_own_bytes(r: redis.Redis) -> None:
    """The journal's footprint (MEMORY USAGE of its keys) beside the state, against its budget: 2 % of maxmemory."""
    with RedisServer(maxmemory="64mb", maxmemory_policy="allkeys-lru") as server:
        client = server.client()
        for i in range(500):
            initialize_state(client, f"run-j{i}", "n", "v" * 100)
        assert flush_journals(5.0)
        document = invoke_json("diagnose", "--memory-analysis", "--sample-interval", "0",
                               "--redis-url", server.url())
        text = invoke("diagnose", "--memory-analysis", "--sample-interval", "0", "--redis-url", server.url())
        client.close()
    journal = document["sections"]["memory_analysis"]["journal"]
    assert journal["keys"] == names.JOURNAL_KEY_PREFIX + "*" and journal["dedicated"] is False
    assert journal["budget_bytes"] == 64 * 2**20 * 2 // 100
    assert journal["buckets"] >= 1 and 0 < journal["measured_bytes"] <= journal["budget_bytes"]
    assert journal["estimated_bytes"] > 0 and journal["paused"] is False
    assert "otel-subflow journal ({subflow:journal}:*, on this Redis):" in text.output
    assert "of used memory" in text.output


def test_memory_analysis_scan_limit_makes_the_count_a_lower_bound(r: redis.Redis, redis_server: RedisServer) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(300):
        pipe.set(f"subflow:state:run-s:n{i}", "v", px=600_000)
    pipe.execute()
    document = invoke_json("diagnose", "--memory-analysis", "--sample-interval", "0", "--scan-limit", "50",
                           "--redis-url", redis_server.url())
    keys = document["sections"]["memory_analysis"]["state_keys"]
    assert keys["count"] == 50 and keys["count_is_lower_bound"] is True


def test_memory_analysis_rates_come_from_two_samples(r: redis.Redis, redis_server: RedisServer) -> None:
    """Keys expiring between the two INFO samples show up as an expiry rate; no evictions."""
    before = int(r.info("stats")["expired_keys"])
    pipe = r.pipeline(transaction=False)
    for i in range(40):
        pipe.set(f"subflow:state:run-e:n{i}", "v", px=150)
    pipe.execute()
    document = invoke_json("diagnose", "--memory-analysis", "--sample-interval", "1.5",
                           "--redis-url", redis_server.url())
    memory = document["sections"]["memory_analysis"]
    expired = memory["expired_keys"]
    assert wait_for(lambda: r.dbsize() == 0, 5)
    assert 0 < expired["delta"] <= 40
    assert expired["total"] >= before + expired["delta"]
    assert expired["per_min"] == pytest.approx(expired["delta"] / memory["sample_interval_s"] * 60, rel=0.01)
    assert memory["evicted_keys"]["delta"] == 0
    assert 1.5 <= memory["sample_interval_s"] < 3


# -- --missing-state -----------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["ttl_too_short", "early_cleanup", "wrong_db", "key_mismatch", "never_written"])
def test_missing_state_verdict_matches_the_injected_cause(lab: Lab, scenario: str) -> None:
    """The lab injects a cause from one host, reads from another; the CLI's analysis names the same cause."""
    injection = SCENARIOS[scenario](lab)
    lab.settle()
    document = invoke_json("diagnose", "--missing-state", "--run-id", injection.run_id, "--node-id",
                           injection.node_id, "--jaeger-url", JAEGER, "--redis-url", lab.state.url(),
                           env=lab_env(lab), code=None)
    section = document["sections"]["missing_state"]
    assert section["verdict"]["cause"] == injection.truth, section["verdict"]["summary"]
    assert section["journal_read"] is True
    timeline = section["timeline"]
    hosts = {row["host"] for row in timeline}
    assert injection.writer in hosts
    ids = [row["stream_id"] for row in timeline]
    assert ids == sorted(ids, key=lambda s: tuple(int(p) for p in s.split("-")))  # server order
    init = next(row for row in timeline if row["op"] == "init")
    assert re.fullmatch(r"[0-9a-f]{32}", init["trace_id"])
    assert init["jaeger_url"] == f"{JAEGER}/trace/{init['trace_id']}"
    assert section["trace_links"][init["trace_id"]] == init["jaeger_url"]


def test_missing_state_human_output_names_cause_hosts_and_links(lab: Lab) -> None:
    injection = SCENARIOS["early_cleanup"](lab)
    lab.settle()
    result = invoke("diagnose", "--missing-state", "--run-id", injection.run_id, "--node-id", injection.node_id,
                    "--jaeger-url", JAEGER, "--redis-url", lab.state.url(), env=lab_env(lab))
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "cause: deleted (definitive)" in out
    assert injection.writer in out and injection.reader in out
    assert f"{JAEGER}/trace/" in out
    assert "Journal of the run (server order)" in out


def test_missing_state_of_a_race_is_get_before_init(lab: Lab) -> None:
    """Analysed after the fact, the raced key exists now: get_before_init, and the race entry is in the timeline."""
    injection = SCENARIOS["cross_worker_race"](lab)
    lab.settle()
    document = invoke_json("diagnose", "--missing-state", "--run-id", injection.run_id, "--node-id",
                           injection.node_id, "--redis-url", lab.state.url(), env=lab_env(lab))
    section = document["sections"]["missing_state"]
    assert section["verdict"]["cause"] == names.CAUSE_GET_BEFORE_INIT
    # The journal's order is the order the records were flushed: the race entry always comes last.
    ops = [row["op"] for row in section["timeline"]]
    assert sorted(ops) == ["init", "miss", "race"] and ops[-1] == "race"
    assert section["trace_links"] == {}


def test_missing_state_with_the_journal_in_db0(r: redis.Redis, redis_server: RedisServer) -> None:
    """Without OTEL_SUBFLOW_JOURNAL_URL the journal is read from db 0 of the state server."""
    initialize_state(r, "run-db0", "n1", "x", ttl_ms=50)
    flush_journals()  # journal stream ids are flush times: keep the init's close to the write
    wait_for(lambda: r.exists("subflow:state:run-db0:n1") == 0, 5)
    assert get_state(r, "run-db0", "n1") is None
    flush_journals()
    document = invoke_json("diagnose", "--missing-state", "--run-id", "run-db0", "--node-id", "n1",
                           "--redis-url", redis_server.url())
    section = document["sections"]["missing_state"]
    assert section["verdict"]["cause"] == names.CAUSE_EXPIRED
    assert [row["op"] for row in section["timeline"]][:2] == ["init", "miss"]


# -- --race-conditions -------------------------------------------------------------------


def conflict_types(section: dict[str, Any]) -> list[str]:
    return [c["type"] for c in section["conflicts"]]


def test_race_conditions_of_a_cross_worker_race(lab: Lab) -> None:
    injection = SCENARIOS["cross_worker_race"](lab)
    lab.settle()
    document = invoke_json("diagnose", "--race-conditions", "--run-id", injection.run_id,
                           "--redis-url", lab.state.url(), env=lab_env(lab))
    section = document["sections"]["race_conditions"]
    assert section["journal_found"] is True
    assert set(section["hosts"]) == {injection.writer, injection.reader}
    assert conflict_types(section) == [names.CONFLICT_GET_BEFORE_INIT]
    (conflict,) = section["conflicts"]
    assert conflict["key"] == f"subflow:state:{injection.run_id}:{injection.node_id}"
    assert conflict["trace_ids"][0] == injection.result.trace_id


def test_race_conditions_double_init_and_interleaving(lab: Lab) -> None:
    """worker-a, worker-b, worker-a initialise one node: two double inits and an A-B-A interleaving."""
    a, b = lab.workers[0], lab.workers[1]
    run = f"run-{uuid.uuid4().hex[:8]}"
    for worker in (a, b, a):
        worker.init(lab.state.url(), run, "shared")
        worker.flush()
    document = invoke_json("diagnose", "--race-conditions", "--run-id", run, "--redis-url", lab.state.url(),
                           env=lab_env(lab))
    section = document["sections"]["race_conditions"]
    assert [row["host"] for row in section["timeline"]] == [a.host, b.host, a.host]
    assert conflict_types(section) == [names.CONFLICT_DOUBLE_INIT, names.CONFLICT_DOUBLE_INIT,
                                       names.CONFLICT_CROSS_HOST_INTERLEAVING]
    assert section["conflicts"][0]["hosts"] == [a.host, b.host]
    assert section["conflicts"][2]["hosts"] == [a.host, b.host, a.host]


def test_race_conditions_init_after_miss(lab: Lab) -> None:
    """Initialised, expired, missed on another host, initialised again: init_after_miss (and no double init)."""
    a, b = lab.workers[0], lab.workers[1]
    run = f"run-{uuid.uuid4().hex[:8]}"
    a.init(lab.state.url(), run, "n", ttl_ms=30)
    a.flush()
    assert lab.wait_journal(run, "expired")
    assert b.get(lab.state.url(), run, "n").outcome == names.OUTCOME_MISS
    b.flush()
    b.init(lab.state.url(), run, "n")
    b.flush()
    document = invoke_json("diagnose", "--race-conditions", "--run-id", run, "--redis-url", lab.state.url(),
                           env=lab_env(lab))
    section = document["sections"]["race_conditions"]
    # The init answered a miss of its own process: the writer journals a race too.
    assert [row["op"] for row in section["timeline"]] == ["init", "expired", "miss", "init", "race"]
    assert conflict_types(section) == [names.CONFLICT_INIT_AFTER_MISS]
    assert section["conflicts"][0]["hosts"] == [b.host, b.host]


def test_race_conditions_of_a_clean_run_and_an_unknown_run(lab: Lab) -> None:
    a = lab.workers[0]
    run = f"run-{uuid.uuid4().hex[:8]}"
    a.init(lab.state.url(), run, "n")
    a.flush()
    clean = invoke_json("diagnose", "--race-conditions", "--run-id", run, "--redis-url", lab.state.url(),
                        env=lab_env(lab))["sections"]["race_conditions"]
    assert clean["entries"] == 1 and clean["conflicts"] == []
    result = invoke("diagnose", "--race-conditions", "--run-id", "no-such-run", "--redis-url", lab.state.url(),
                    env=lab_env(lab))
    assert result.exit_code == 0
    assert "The journal holds no record of this run" in result.stdout


# -- --recent-operations -------------------------------------------------------------------


def test_recent_operations_limit_and_order(r: redis.Redis, redis_server: RedisServer) -> None:
    for i in range(5):
        initialize_state(r, "run-recent", f"n{i}", "x")
    get_state(r, "run-recent", "absent")
    flush_journals()
    document = invoke_json("diagnose", "--recent-operations", "--limit", "3", "--redis-url", redis_server.url())
    section = document["sections"]["recent_operations"]
    assert section["journal"] == names.JOURNAL_KEY_PREFIX + "*"
    assert section["records_written"] == 6  # five inits and the miss
    entries = section["entries"]
    assert len(entries) == 3
    all_entries = invoke_json("diagnose", "--recent-operations", "--limit", "100",
                              "--redis-url", redis_server.url())["sections"]["recent_operations"]["entries"]
    assert [e["stream_id"] for e in entries] == [e["stream_id"] for e in all_entries[-3:]]
    assert all_entries[0]["op"] == "init" and all_entries[0]["node_id"] == "n0"
    assert any(e["op"] == "miss" and e["node_id"] == "absent" for e in all_entries)
    human = invoke("diagnose", "--recent-operations", "--limit", "2", "--redis-url", redis_server.url())
    assert "Recent operations (last 2 of" in human.stdout


# -- --export-traces -----------------------------------------------------------------------


def test_export_writes_everything_to_a_private_file(lab: Lab, tmp_path: Path) -> None:
    """The export bundles health, memory, recent ops, journal stats and every run with misses."""
    injection = SCENARIOS["early_cleanup"](lab)
    lab.settle()
    proc = run_cli("diagnose", "--export-traces", "--output-dir", str(tmp_path), "--sample-interval", "0.1",
                   "--redis-url", lab.state.url(), env=lab_env(lab))
    assert proc.returncode == 1, proc.stderr  # lab servers run without persistence: a warning
    (path,) = tmp_path.iterdir()
    assert re.fullmatch(r"subflow_diagnostics_\d{8}T\d{6}Z\.json", path.name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"Wrote {path}" in proc.stdout
    document = json.loads(path.read_text())
    assert document["export_path"] == str(path)
    assert set(document["sections"]) == {
        "redis_health", "memory_analysis", "recent_operations", "journal_stats", "runs_with_misses"}
    stats = document["sections"]["journal_stats"]
    assert stats["records_written"] >= stats["window_entries"] > 0
    assert stats["ops"]["miss"] >= 1 and stats["buckets"] >= 1
    assert stats["estimated_bytes"] > 0 and stats["measured_bytes"] > 0
    runs = {run["run_id"]: run for run in document["sections"]["runs_with_misses"]}
    run = runs[injection.run_id]
    assert run["missing_states"] == [
        {"node_id": injection.node_id, "verdict": run["missing_states"][0]["verdict"]}]
    assert run["missing_states"][0]["verdict"]["cause"] == names.CAUSE_DELETED
    assert [row["op"] for row in run["timeline"]] == ["init", "del", "miss"]


def test_export_to_an_explicit_path_with_a_run(lab: Lab, tmp_path: Path) -> None:
    injection = SCENARIOS["never_written"](lab)
    lab.settle()
    target = tmp_path / "incident.json"
    target.write_text("old")
    target.chmod(0o644)
    document = invoke_json("diagnose", "--export-traces", "--output", str(target), "--run-id", injection.run_id,
                           "--node-id", injection.node_id, "--sample-interval", "0", "--redis-url",
                           lab.state.url(), env=lab_env(lab), code=1)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    written = json.loads(target.read_text())
    assert written["sections"]["missing_state"]["verdict"]["cause"] == names.CAUSE_NEVER_WRITTEN
    assert written["sections"]["race_conditions"]["run_id"] == injection.run_id
    assert document["sections"]["missing_state"] == written["sections"]["missing_state"]


# -- replicas, key overrides, env defaults, export bounds --------------------------------------


def test_health_of_a_replica_and_its_master(lab: Lab) -> None:
    """The lab's replica: role slave, its master link, an info finding; the master lists one replica."""
    replica = invoke_json("diagnose", "--redis-health", "--redis-url", lab.replica.url(), code=None)
    health = replica["sections"]["redis_health"]
    assert health["role"] == "slave"
    master = health["replication"]["master"]
    assert master["host"] == "127.0.0.1" and master["link_status"] == "up"
    assert finding_rules(replica)["replica"] == "info"
    primary = invoke_json("diagnose", "--redis-health", "--redis-url", lab.state.url(), code=None)
    replication = primary["sections"]["redis_health"]["replication"]
    assert replication["connected_replicas"] == 1
    assert replication["replicas"][0]["state"] == "online"


def test_key_override_and_key_template_env(r: redis.Redis, redis_server: RedisServer) -> None:
    """--key names the state key; OTEL_SUBFLOW_KEY_TEMPLATE changes the default key and the SCAN pattern."""
    r.set("custom/run-k/node-k", "x", px=60_000)
    default = invoke_json("diagnose", "--missing-state", "--run-id", "run-k", "--node-id", "node-k",
                          "--redis-url", redis_server.url())["sections"]["missing_state"]
    assert default["key"] == "subflow:state:run-k:node-k"
    assert default["verdict"]["cause"] == names.CAUSE_NEVER_WRITTEN
    override = invoke_json("diagnose", "--missing-state", "--run-id", "run-k", "--node-id", "node-k",
                           "--key", "custom/run-k/node-k", "--redis-url", redis_server.url())
    assert override["sections"]["missing_state"]["key"] == "custom/run-k/node-k"
    assert override["sections"]["missing_state"]["verdict"]["cause"] == names.CAUSE_GET_BEFORE_INIT
    env = {"OTEL_SUBFLOW_KEY_TEMPLATE": "custom/{run_id}/{node_id}", "OTEL_SUBFLOW_REDIS_URL": redis_server.url()}
    document = invoke_json("diagnose", "--missing-state", "--run-id", "run-k", "--node-id", "node-k",
                           "--memory-analysis", "--sample-interval", "0", env=env)
    assert document["redis_url"] == redis_server.url()  # from OTEL_SUBFLOW_REDIS_URL
    assert document["sections"]["missing_state"]["key"] == "custom/run-k/node-k"
    keys = document["sections"]["memory_analysis"]["state_keys"]
    assert keys["pattern"] == "custom/*/*" and keys["count"] == 1


def test_export_keeps_the_newest_runs_up_to_max_runs(r: redis.Redis, redis_server: RedisServer,
                                                     tmp_path: Path) -> None:
    for run in ("run-x1", "run-x2", "run-x3"):
        assert get_state(r, run, "n1") is None
        assert get_state(r, run, "n2") is None
        flush_journals()
    document = invoke_json("diagnose", "--export-traces", "--max-runs", "2", "--output-dir", str(tmp_path),
                           "--sample-interval", "0", "--redis-url", redis_server.url(), code=1)
    runs = document["sections"]["runs_with_misses"]
    assert [run["run_id"] for run in runs] == ["run-x3", "run-x2"]
    assert [state["node_id"] for state in runs[0]["missing_states"]] == ["n2", "n1"]
    assert {state["verdict"]["cause"] for state in runs[0]["missing_states"]} == {names.CAUSE_NEVER_WRITTEN}


def test_health_where_config_is_not_allowed(tmp_path: Path) -> None:
    """Managed Redis often disables CONFIG: the review says what it could not check instead of guessing."""
    with RedisServer(extra_args=["--rename-command", "CONFIG", ""]) as server:
        document = invoke_json("diagnose", "--redis-health", "--redis-url", server.url(), code=0)
        summary = invoke_json("monitor", "--duration", "0", "--output-dir", str(tmp_path),
                              "--redis-url", server.url())
    assert finding_rules(document) == {"keyspace_events": "info"}
    health = document["sections"]["redis_health"]
    assert health["persistence"]["enabled"] is None
    assert health["keyspace_events"] == {"value": None, "missing": None}
    assert summary["watcher"]["enabled"] is False and "CONFIG" in summary["watcher"]["reason"]
    assert summary["ticks_ok"] == 1
