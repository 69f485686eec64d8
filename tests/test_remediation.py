"""Remediation numbers against real redis-servers: each cause injected, each number checked against the injection."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from otel_subflow import flush_journals, names
from otel_subflow._analysis import remediation as rem
from otel_subflow._journal import store
from otel_subflow.cli._remediation import server_facts
from otel_subflow.lab.harness import Lab, wait_for
from otel_subflow.lab.scenarios import SCENARIOS
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import invoke, invoke_json
from tests.service import get_state, initialize_state


@pytest.fixture(scope="module")
def lab(redis_server: RedisServer) -> Iterator[Lab]:
    with Lab(keyspace_events=True, seed=5) as running:
        yield running


def diagnose(run_id: str, node_id: str, url: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    document = invoke_json("diagnose", "--missing-state", "--run-id", run_id, "--node-id", node_id,
                           "--redis-url", url, env=env, code=None)
    section: dict[str, Any] = document["sections"]["missing_state"]
    return section


def fix_of(section: dict[str, Any], action: str) -> dict[str, Any]:
    found = {fix["action"]: fix for fix in section["remediation"]}
    assert action in found, (section["verdict"], list(found))
    assert set(found[action]) == {"action", "cause", "why", "prevents", "numbers"}
    return found[action]


def lab_env(lab: Lab) -> dict[str, str]:
    return {"OTEL_SUBFLOW_JOURNAL_URL": lab.journal_server.url()}


def test_expired_recommends_a_ttl_from_the_measured_gaps(r: redis.Redis, redis_server: RedisServer) -> None:
    """Inits with ttl_ms=50, reads after 80, 150 and 250 ms: the gaps the journal measured, a TTL above the
    longest (x1.5), and its memory cost from MEMORY USAGE of the live state keys and the journal's write rate."""
    for i in range(4):
        initialize_state(r, "run-live", f"keep-{i}", "v" * (50 + 40 * i), ttl_ms=600_000)
    sleeps_ms = (80, 150, 250)
    for i, sleep_ms in enumerate(sleeps_ms):
        initialize_state(r, f"run-ttl{i}", "node-ttl", "x", ttl_ms=50)
        flush_journals()  # the init's record leaves before the read: its own time is what counts
        time.sleep(sleep_ms / 1000)  # the injected init-to-read gap the verdict must measure (no condition to poll)
        assert get_state(r, f"run-ttl{i}", "node-ttl") is None
        flush_journals()
    section = diagnose("run-ttl2", "node-ttl", redis_server.url())
    assert section["verdict"]["cause"] == names.CAUSE_EXPIRED
    fix = fix_of(section, rem.RAISE_TTL)
    n = fix["numbers"]

    # The gaps, measured from the journal independently of the CLI.
    entries = store.read_recent(r, 2000)
    gaps = []
    for i in range(3):
        run = [e for e in entries if e.run_id == f"run-ttl{i}"]
        init, miss = (next(e for e in run if e.op == op) for op in ("init", "miss"))
        gaps.append(miss.op_ms - init.op_ms)
    for gap, sleep_ms in zip(gaps, sleeps_ms, strict=True):
        assert sleep_ms - 5 <= gap < sleep_ms + 500, (gaps, sleeps_ms)
    assert n["init_to_read_ms"] == {"samples": 3, "p50_ms": sorted(gaps)[1], "p99_ms": max(gaps),
                                    "max_ms": max(gaps)}
    assert n["recommended_ttl_ms"] >= max(gaps) >= 245
    assert n["recommended_ttl_ms"] == rem.round_up(max(gaps) * 1.5) and n["current_ttl_ms"] == 50
    assert fix["prevents"] is True and "x1.5" in fix["why"]

    sizes = [r.memory_usage(f"subflow:state:run-live:keep-{i}") for i in range(4)]
    assert n["bytes_per_state"] == pytest.approx(sum(sizes) / 4, abs=0.1) and n["states_weighed"] == 4
    inits_per_s = 3 / (n["window_ms"] / 1000)
    assert n["node_inits_per_s"] == round(inits_per_s, 3)
    assert entries[0].op_ms + n["window_ms"] >= entries[-1].op_ms  # the window spans the whole journal read
    assert n["extra_memory_bytes"] == pytest.approx(inits_per_s * (n["recommended_ttl_ms"] - 50) / 1000
                                                    * n["bytes_per_state"], abs=1)

    human = invoke("diagnose", "--missing-state", "--run-id", "run-ttl2", "--node-id", "node-ttl",
                   "--redis-url", redis_server.url())
    text = " ".join(human.stdout.split())  # rich wraps long lines
    assert "Remediation" in text and "raise_ttl (prevents this miss): Across 3 journalled" in text


def test_evicted_recommends_maxmemory_above_used_memory(lab: Lab) -> None:
    """volatile-lru at 4 MB: used and max memory, the policy, and a maxmemory above what is used."""
    injection = SCENARIOS["memory_pressure"](lab)
    lab.settle()
    info = lab.evicting.client().info()
    section = diagnose(injection.run_id, injection.node_id, lab.evicting.url(), lab_env(lab))
    assert section["verdict"]["cause"] == names.CAUSE_EVICTED
    fix = fix_of(section, rem.RAISE_MAXMEMORY)
    n = fix["numbers"]
    assert n["maxmemory_bytes"] == 4 * 2**20 and n["maxmemory_policy"] == "volatile-lru"
    assert n["evicted_keys_total"] >= info["evicted_keys"] > 0
    assert n["used_memory_bytes"] == pytest.approx(info["used_memory"], rel=0.05)
    assert n["recommended_maxmemory_bytes"] >= info["used_memory"] and n["recommended_maxmemory_bytes"] > 4 * 2**20
    assert n["recommended_maxmemory_bytes"] == rem.mib_up((n["used_memory_bytes"] + n["evicted_bytes_estimate"])
                                                          * rem.MEMORY_HEADROOM)
    assert n["evicted_bytes_estimate"] == pytest.approx(n["evicted_keys_total"] * n["avg_key_bytes"], rel=1e-5)
    assert n["avg_key_bytes"] == pytest.approx(info["used_memory"] / info["db0"]["keys"], rel=0.05)
    assert n["eviction_rate_per_s"] > 0
    assert fix_of(section, rem.OWN_NOEVICTION_REDIS)["prevents"] is True
    volatile = fix_of(section, rem.VOLATILE_TTL_POLICY)["numbers"]
    assert volatile["state_ttl_ms"] == 600_000 and 0 < volatile["state_ttl_left_ms"] <= 600_000


@pytest.mark.parametrize("scenario", ["wrong_db", "wrong_server"])
def test_wrong_endpoint_names_who_wrote_and_read_where(lab: Lab, scenario: str) -> None:
    injection = SCENARIOS[scenario](lab)
    lab.settle()
    section = diagnose(injection.run_id, injection.node_id, lab.state.url(), lab_env(lab))
    assert section["verdict"]["cause"] == names.CAUSE_WRONG_ENDPOINT
    n = fix_of(section, rem.ALIGN_ENDPOINT)["numbers"]
    written_to = lab.other if scenario == "wrong_server" else lab.state
    assert n["writers"] == [{"host": injection.writer, "endpoint": f"127.0.0.1:{written_to.port}",
                             "db": 1 if scenario == "wrong_db" else 0, "server_run_id": written_to.run_id()}]
    assert n["readers"] == [{"host": injection.reader, "endpoint": f"127.0.0.1:{lab.state.port}", "db": 0,
                             "server_run_id": lab.state.run_id()}]


def test_key_mismatch_gives_both_spellings_and_their_hosts(lab: Lab) -> None:
    injection = SCENARIOS["key_mismatch"](lab)
    lab.settle()
    written = next(e.key for e in lab.journal_entries(injection.run_id) if e.op == "init")
    section = diagnose(injection.run_id, injection.node_id, lab.state.url(), lab_env(lab))
    n = fix_of(section, rem.ALIGN_KEY_SPELLING)["numbers"]
    assert n == {"written_key": written, "read_key": f"subflow:state:{injection.run_id}:{injection.node_id}",
                 "written_by": [injection.writer], "read_by": [injection.reader]}
    assert written != n["read_key"]


def test_get_before_init_measures_the_read_to_init_gap(lab: Lab) -> None:
    """A read, 300 ms, then another host's init: the gap is the injected delay (give or take scheduling)."""
    reader, writer = lab.workers[0], lab.workers[1]
    run = f"run-{uuid.uuid4().hex[:8]}"
    assert reader.get(lab.state.url(), run, "node-late").value is None
    reader.flush()
    time.sleep(0.3)  # the injected read-to-init gap the remediation must measure (no condition to poll)
    writer.init(lab.state.url(), run, "node-late")
    lab.settle()
    section = diagnose(run, "node-late", lab.state.url(), lab_env(lab))
    assert section["verdict"]["cause"] == names.CAUSE_GET_BEFORE_INIT
    fix = fix_of(section, rem.AWAIT_INIT_BEFORE_DISPATCH)
    n = fix["numbers"]
    entries = lab.journal_entries(run)
    miss, init = (next(e for e in entries if e.op == op) for op in ("miss", "init"))
    assert n["read_to_init_ms"] == init.op_ms - miss.op_ms
    assert 295 <= n["read_to_init_ms"] < 800
    assert (n["reader"], n["writer"]) == (reader.host, writer.host)
    assert n["retry_window_ms"] >= n["read_to_init_ms"]
    assert "await" in fix["why"]


def test_server_restart_gives_the_persistence_settings_and_the_init_age(lab: Lab) -> None:
    """An init 2.5 s before a restart without persistence: AOF (even everysec) would have kept it."""
    reader, writer = lab.workers[0], lab.workers[1]
    run = f"run-{uuid.uuid4().hex[:8]}"
    url = lab.state.url()
    writer.init(url, run, "warm-up")
    reader.get(url, run, "warm-up")  # the reader knows the server's run_id from before
    writer.init(url, run, "node-restart")
    writer.flush()
    time.sleep(2.5)  # the injected init age before the restart (no condition to poll)
    restart_ms = int(time.time() * 1000)  # loopback: the server's clock is this machine's
    lab.state.restart()
    for watcher in lab.watchers:
        watcher.wait_subscribed(10)
    assert reader.get(url, run, "node-restart").value is None
    lab.settle()
    wait_for(lambda: lab.replica.client().info("replication").get("master_link_status") == "up", 15)
    section = diagnose(run, "node-restart", url, lab_env(lab))
    assert section["verdict"]["cause"] == names.CAUSE_SERVER_RESTART
    fix = fix_of(section, rem.ENABLE_AOF)
    n = fix["numbers"]
    init = next(e for e in lab.journal_entries(run) if e.op == "init" and e.node_id == "node-restart")
    assert abs(n["init_to_restart_ms"] - (restart_ms - init.op_ms)) <= 1_100  # INFO uptime: whole seconds
    assert (n["appendonly"], n["save"], n["persistence_source"]) == ("no", "", "CONFIG GET")
    assert fix["prevents"] is True
    assert fix_of(section, rem.RDB_SAVE_POINTS)["prevents"] is None


def test_config_refused_by_an_acl_or_renamed_is_named_never_raised(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    user = f"remedy-{uuid.uuid4().hex[:6]}"
    admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-config"])
    try:
        with contextlib.closing(redis.Redis(host=redis_server.host, port=redis_server.port, username=user,
                                            password="pw", decode_responses=True)) as client:
            refused = server_facts(client, names.DEFAULT_KEY_TEMPLATE)
    finally:
        admin.acl_deluser(user)
    assert refused.config == {} and refused.config_refused == "refused to this user (ACL)"
    assert refused.info_int("aof_enabled") == 0  # INFO persistence is still read
    with RedisServer(extra_args=["--rename-command", "CONFIG", ""]) as server, \
            contextlib.closing(server.client(decode_responses=True)) as client:
        renamed = server_facts(client, names.DEFAULT_KEY_TEMPLATE)
    assert renamed.config == {} and renamed.config_refused is not None
    assert renamed.config_refused.startswith("not available (") and "renamed or disabled" in renamed.config_refused
