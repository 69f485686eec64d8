"""The journal: batched off the hot path, bounded, counted, safe at exit and across fork."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from otel_subflow import SubflowConfig, flush_journals
from otel_subflow._config import set_config
from otel_subflow._journal import journal_for, run_stream_key
from otel_subflow.lab.servers import RedisServer, free_port
from tests.conftest import commandstats, commandstats_delta
from tests.service import initialize_state


def test_thousand_inits_cost_at_most_twenty_flushes_and_exact_xadds(r, redis_server):
    """1,000 inits at default settings: <= 20 flush round trips; XADDs == stream entries written."""
    app = redis_server.client()
    initialize_state(app, "warm", "n", "v")
    flush_journals()
    journal = journal_for(app, SubflowConfig())
    assert journal is not None
    stats0 = journal.stats()
    before = commandstats(r)
    for i in range(1000):
        initialize_state(app, "run-j", f"n{i}", "v")
    assert flush_journals(10.0)
    stats = journal.stats()
    delta = commandstats_delta(before, commandstats(r))
    flushes = stats.flushes - stats0.flushes
    written = stats.written - stats0.written
    assert 1 <= flushes <= 20, flushes
    assert delta["xadd"] == written == 2000  # each record: its run's stream + the global one
    assert stats.queued - stats0.queued == 1000
    assert stats.dropped == 0
    assert r.xlen(run_stream_key("run-j")) == 1000
    assert 0 < r.ttl(run_stream_key("run-j")) <= SubflowConfig().journal_ttl_s
    app.close()


def test_full_queue_drops_oldest_and_counts(r, redis_server):
    """A small queue with a long flush interval: the oldest records are dropped and counted."""
    set_config(SubflowConfig(journal_queue_size=10, journal_batch_size=1000, journal_flush_interval_s=30))
    app = redis_server.client()
    for i in range(25):
        initialize_state(app, "run-drop", f"n{i}", "v")
    journal = journal_for(app, SubflowConfig())
    assert journal is not None
    assert journal.stats().dropped == 15
    flush_journals()
    nodes = [f[b"node_id"].decode() for _, f in r.xrange(run_stream_key("run-drop"))]
    assert nodes == [f"n{i}" for i in range(15, 25)]  # the newest ten survive
    app.close()


def test_redis_down_counts_dropped_batches_and_resumes(r):
    """A journal whose Redis is down drops and counts; when Redis is back it writes again."""
    port = free_port()
    set_config(SubflowConfig(journal_url=f"redis://127.0.0.1:{port}/0", journal_flush_interval_s=0.05))
    for i in range(5):
        initialize_state(r, "run-down", f"n{i}", "v")  # the state server is up: calls succeed
    journal = journal_for(r, SubflowConfig(journal_url=f"redis://127.0.0.1:{port}/0"))
    assert journal is not None
    assert journal.flush(3.0) is False  # the batch could not be written: flush says so
    assert journal.stats().dropped == 5
    assert journal.stats().failed_flushes >= 1
    with RedisServer(port=port) as back:
        initialize_state(r, "run-down", "after", "v")
        assert journal.flush(10.0)
        assert back.client().xlen(run_stream_key("run-down")) == 1


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
    assert r.xlen(run_stream_key("run-exit")) == 50


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
    nodes = [f[b"node_id"].decode() for _, f in r.xrange(run_stream_key("run-fork"))]
    assert sorted(nodes) == sorted([f"parent-{i}" for i in range(10)] + [f"child-{i}" for i in range(7)])
    hosts_pids = {f[b"pid"] for _, f in r.xrange(run_stream_key("run-fork"))}
    assert len(hosts_pids) == 2


def test_decorated_call_never_waits_on_the_journal(r, redis_server):
    """With the journal's Redis paused (CLIENT PAUSE on a separate journal server) inits stay fast."""
    with RedisServer() as journal_server:
        set_config(SubflowConfig(journal_url=journal_server.url(), journal_flush_interval_s=0.01))
        initialize_state(r, "run-w", "warm", "v")
        flush_journals()
        journal_server.client().execute_command("CLIENT", "PAUSE", "700", "ALL")  # < the 1 s journal timeout
        import time

        started = time.perf_counter()
        for i in range(20):
            initialize_state(r, "run-w", f"n{i}", "v")
        elapsed = time.perf_counter() - started
        assert elapsed < 0.5, elapsed  # twenty SETs to an unpaused server; the journal waits alone
        assert flush_journals(10.0)
        assert journal_server.client().xlen(run_stream_key("run-w")) == 21
