"""The journal: batched off the hot path, bounded in memory, every loss counted, safe at exit and across fork."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import redis

from otel_subflow import SubflowConfig, flush_journals
from otel_subflow._config import get_config, set_config
from otel_subflow._journal import schema, store
from otel_subflow._journal.location import journal_for
from otel_subflow.lab.process import free_port
from otel_subflow.lab.servers import RedisServer
from tests.conftest import commandstats, commandstats_delta
from tests.service import get_state, initialize_state


def _nodes(client: redis.Redis, run_id: str, op: str = "init") -> list[str]:
    return [e.fields["node_id"] for e in store.read_run(client, run_id) if e.op == op]


def test_thousand_inits_cost_one_script_call_per_flush(r, redis_server):
    """1,000 inits at default settings: <= 20 flushes, each exactly one EVALSHA/EVAL, and every record readable."""
    app = redis_server.client()
    initialize_state(app, "warm", "n", "v")
    flush_journals()
    journal = journal_for(app, get_config())
    assert journal is not None
    stats0 = journal.stats()
    before = commandstats(r)
    for i in range(1000):
        initialize_state(app, "run-j", f"n{i}", "v")
    assert flush_journals(10.0)
    stats = journal.stats()
    delta = commandstats_delta(before, commandstats(r))
    flushes = stats.flushes - stats0.flushes
    assert 1 <= flushes <= 20, flushes
    assert delta.get("evalsha", 0) + delta.get("eval", 0) == flushes, delta
    assert delta["set"] == 1000 and "xadd" not in delta
    assert stats.written - stats0.written == 1000
    assert stats.queued - stats0.queued == 1000
    assert stats.dropped == 0
    assert _nodes(r, "run-j") == [f"n{i}" for i in range(1000)]
    app.close()


def test_full_queue_drops_oldest_and_counts(r, redis_server):
    """A small queue with a long flush interval: the oldest records are dropped and counted by reason."""
    set_config(SubflowConfig(journal_queue_size=10, journal_batch_size=1000, journal_flush_interval_s=30))
    app = redis_server.client()
    for i in range(25):
        initialize_state(app, "run-drop", f"n{i}", "v")
    journal = journal_for(app, get_config())
    assert journal is not None
    assert journal.stats().dropped_by_reason == {"queue_full": 15}
    assert flush_journals() is False  # records were lost since the last flush: flush says so
    assert _nodes(r, "run-drop") == [f"n{i}" for i in range(15, 25)]  # the newest ten survive
    assert flush_journals() is True  # nothing lost since
    app.close()


def test_redis_down_counts_dropped_batches_and_resumes(r):
    """A journal whose Redis is down drops and counts; when Redis is back it writes again."""
    port = free_port()
    set_config(SubflowConfig(journal_url=f"redis://127.0.0.1:{port}/0", journal_flush_interval_s=0.05))
    for i in range(5):
        initialize_state(r, "run-down", f"n{i}", "v")  # the state server is up: calls succeed
    journal = journal_for(r, get_config())
    assert journal is not None
    assert journal.flush(3.0) is False  # the batch could not be written: flush says so
    assert journal.stats().dropped_by_reason == {"connection": 5}
    assert journal.stats().failed_flushes >= 1
    with RedisServer(port=port) as back:
        initialize_state(r, "run-down", "after", "v")
        assert journal.flush(10.0)
        assert _nodes(back.client(), "run-down") == ["after"]


def test_refused_script_is_counted_remembered_and_not_retried(redis_server, r):
    """An ACL user without EVAL: records dropped as 'noperm', flush False, and the script is not asked again."""
    r.execute_command("ACL", "SETUSER", "app", "on", ">app-pw", "~*", "+@all", "-@scripting")
    r.execute_command("ACL", "LOG", "RESET")
    app = redis.Redis(port=redis_server.port, username="app", password="app-pw")
    set_config(SubflowConfig(journal_flush_interval_s=0.05))
    try:
        for i in range(5):
            assert initialize_state(app, "run-acl", f"n{i}", "v") is True
        assert flush_journals(3.0) is False
        for i in range(5, 10):
            initialize_state(app, "run-acl", f"n{i}", "v")
        flush_journals(3.0)
        journal = journal_for(app, get_config())
        assert journal is not None
        assert journal.stats().dropped_by_reason == {"noperm": 10}
        denials = [e for e in r.execute_command("ACL", "LOG") if b"eval" in bytes(str(e), "utf-8")]
        assert len(r.execute_command("ACL", "LOG")) == 1, denials  # asked once, then remembered
        assert app.get("subflow:state:run-acl:n9") == b"v"  # the user's data is untouched
    finally:
        r.execute_command("ACL", "DELUSER", "app")
        app.close()


def test_oom_reply_under_noeviction_is_counted(r):
    """A full noeviction server refuses the script with OOM: the records are dropped as 'oom', never raised."""
    with RedisServer(maxmemory="2mb", maxmemory_policy="noeviction") as full:
        client = full.client()
        payload = "x" * 10_000
        try:
            for i in range(10_000):
                client.set(f"filler:{i}", payload)
        except redis.exceptions.OutOfMemoryError:
            pass
        set_config(SubflowConfig(journal_url=full.url(), journal_flush_interval_s=0.05))
        for i in range(3):
            initialize_state(r, "run-oom", f"n{i}", "v")
        assert flush_journals(3.0) is False
        journal = journal_for(r, get_config())
        assert journal is not None
        assert journal.stats().dropped_by_reason == {"oom": 3}


def test_near_maxmemory_the_journal_pauses_and_gives_memory_back(r):
    """Over the pressure threshold the script writes nothing and deletes its old buckets; below it, it resumes."""
    with RedisServer(maxmemory="4mb", maxmemory_policy="allkeys-lru") as server:
        client = server.client()
        set_config(SubflowConfig(journal_flush_interval_s=0.05, journal_budget_pct=50))
        for i in range(200):
            initialize_state(client, f"run-p{i}", "n", "v" * 100)
        assert flush_journals(3.0)
        before = store.read_usage(client)
        assert before.buckets >= 1
        chunk, n = "b" * 32 * 1024, 0
        while int(client.info("memory")["used_memory"]) < 0.92 * 4 * 1024 * 1024:  # over the 90 % threshold
            client.set(f"ballast:{n}", chunk)
            n += 1
        time.sleep(1.1)  # the next write re-reads INFO memory (at most once a second)
        initialize_state(client, "run-during", "n", "v")
        assert flush_journals(3.0) is False
        journal = journal_for(client, get_config())
        assert journal is not None
        stats = journal.stats()
        assert stats.paused and stats.dropped_by_reason.get("memory_pressure") == 1
        assert store.read_usage(client).estimated_bytes <= before.estimated_bytes
        assert client.exists(*[f"ballast:{i}" for i in range(n)]) == n  # our pause: no eviction of user data
        client.delete(*[f"ballast:{i}" for i in range(n)])
        time.sleep(1.1)
        initialize_state(client, "run-after", "n", "v")
        assert flush_journals(3.0)
        assert _nodes(client, "run-after") == ["n"]
        assert not journal.stats().paused


def test_budget_is_enforced_by_trimming_the_oldest_runs(r, redis_server):
    """A 256 KB budget and 20,000 inits: the journal stays within it, keeps the newest runs, trims the oldest."""
    set_config(SubflowConfig(journal_budget_mb=0.25))
    app = redis_server.client()
    for i in range(20_000):
        initialize_state(app, f"run-b{i}", "n", "v")
    assert flush_journals(20.0)
    usage = store.read_usage(r)
    budget = int(0.25 * 1024 * 1024)
    assert usage.estimated_bytes <= budget
    assert usage.measured_bytes is not None and usage.measured_bytes <= budget * 1.25, usage
    assert _nodes(r, "run-b19999") == ["n"]
    assert _nodes(r, "run-b0") == []
    journal = journal_for(app, get_config())
    assert journal is not None and journal.stats().buckets_trimmed > 0
    app.close()


def test_measured_usage_weighs_every_field(r):
    """One 100 kB field among 300 small ones: the measured size counts it once, not 0 or 60 times.

    Redis's default MEMORY USAGE weighs 5 fields and extrapolates, which either misses the large
    field or multiplies it; a bucket's global copy is exactly such a field.
    """
    bucket = "1796185651636"
    key = schema.bucket_key(bucket)
    r.zadd(schema.INDEX_KEY, {bucket: int(bucket)})
    r.hset(key, mapping={f"run-{i}": "x" * 20 for i in range(300)})
    r.hset(key, schema.GLOBAL_FIELD, "g" * 100_000)
    usage = store.read_usage(r)
    assert usage.measured_bytes is not None
    assert 100_000 + 300 * 20 <= usage.measured_bytes <= 150_000, usage


def test_retention_follows_the_state_ttls(r, redis_server):
    """Buckets live about twice the longest state TTL seen (at least ten minutes), not seven days."""
    app = redis_server.client()
    initialize_state(app, "run-t", "n", "v", ttl_ms=3_600_000)
    assert flush_journals()
    (bucket,) = r.zrange(schema.INDEX_KEY, 0, -1)
    ttl_ms = r.pttl(schema.bucket_key(bucket.decode()))
    assert 2 * 3_600_000 <= ttl_ms <= 2 * 3_600_000 * (1 + 1 / 16) + 1000, ttl_ms
    app.close()


@pytest.mark.parametrize("run_id", ["_global", "*", "run-[1]", "{subflow:journal}:idx", "r:x", "a\x1fb\x1ec",
                                    "\\1", "x" * 256])
def test_odd_run_ids_touch_no_other_records(r, redis_server, run_id):
    """No run id can address the index, a bucket's own fields or another run's records."""
    app = redis_server.client()
    for i in range(3):
        initialize_state(app, "run-other", f"n{i}", "v")
    assert flush_journals()
    others = [(e.op, e.fields.get("node_id"), e.fields.get("key")) for e in store.read_run(r, "run-other")]
    recent_before = len(store.read_recent(r, 100))
    initialize_state(app, run_id, "n", "v")
    assert get_state(app, run_id, "missing") is None
    assert flush_journals()
    assert [(e.op, e.fields.get("node_id"), e.fields.get("key")) for e in store.read_run(r, "run-other")] == others
    mine = store.read_run(r, run_id)
    assert [(e.op, e.fields["run_id"], e.fields.get("key")) for e in mine] == [
        ("init", run_id, f"subflow:state:{run_id}:n"), ("miss", run_id, f"subflow:state:{run_id}:missing")]
    assert len(store.read_recent(r, 100)) == recent_before + 2
    assert r.type(schema.INDEX_KEY) == b"zset"
    app.close()


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60, cwd=os.getcwd())


def test_records_are_flushed_at_exit(redis_server, r):
    """A process that exits right after its inits still writes them (atexit flush)."""
    code = f"""
        import redis
        from otel_subflow.lab.service import initialize_state
        client = redis.Redis(port={redis_server.port})
        for i in range(50):
            initialize_state(client, "run-exit", f"n{{i}}", "v")
    """
    done = _run(code, {"OTEL_SUBFLOW_JOURNAL_FLUSH_INTERVAL": "60", "OTEL_SUBFLOW_JOURNAL_BATCH_SIZE": "100000"})
    assert done.returncode == 0, done.stderr
    assert len(_nodes(r, "run-exit")) == 50


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_fork_child_writes_its_own_records_and_nothing_twice(redis_server, r):
    """After fork the child journals its own inits; the parent's queued ones are written once."""
    code = f"""
        import os, redis
        from otel_subflow import flush_journals
        from otel_subflow.lab.service import initialize_state
        client = redis.Redis(port={redis_server.port})
        for i in range(10):
            initialize_state(client, "run-fork", f"parent-{{i}}", "v")
        pid = os.fork()
        if pid == 0:
            child = redis.Redis(port={redis_server.port})
            for i in range(7):
                initialize_state(child, "run-fork", f"child-{{i}}", "v")
            flush_journals(5)
            os._exit(0)
        os.waitpid(pid, 0)
        flush_journals(5)
    """
    done = _run(code, {"OTEL_SUBFLOW_JOURNAL_FLUSH_INTERVAL": "60", "OTEL_SUBFLOW_JOURNAL_BATCH_SIZE": "100000"})
    assert done.returncode == 0, done.stderr
    entries = store.read_run(r, "run-fork")
    nodes = [e.fields["node_id"] for e in entries]
    assert sorted(nodes) == sorted([f"parent-{i}" for i in range(10)] + [f"child-{i}" for i in range(7)])
    assert len({e.fields["pid"] for e in entries}) == 2


def test_decorated_call_never_waits_on_the_journal(r, redis_server):
    """With the journal's Redis paused (CLIENT PAUSE on a separate journal server) inits stay fast."""
    with RedisServer() as journal_server:
        set_config(SubflowConfig(journal_url=journal_server.url(), journal_flush_interval_s=0.01))
        initialize_state(r, "run-w", "warm", "v")
        flush_journals()
        journal_server.client().execute_command("CLIENT", "PAUSE", "700", "ALL")  # < the 1 s journal timeout

        started = time.perf_counter()
        for i in range(20):
            initialize_state(r, "run-w", f"n{i}", "v")
        elapsed = time.perf_counter() - started
        assert elapsed < 0.5, elapsed  # twenty SETs to an unpaused server; the journal waits alone
        assert flush_journals(10.0)
        assert len(_nodes(journal_server.client(), "run-w")) == 21
