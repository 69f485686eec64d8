"""Watching with no extra process, and tombstones in time.

Real processes against a real redis-server: three processes that only called
``configure()`` elect exactly one keyspace watcher through the lease; when the
holder is SIGKILLed another takes over within the lease time; the lease costs at
most one command per 5 s per process (INFO commandstats). A watcher in another
process makes reads 50 ms after a DEL, an expiry or an eviction definitive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from otel_subflow import KeyspaceWatcher, SubflowConfig, flush_journals, names
from otel_subflow._config import set_config
from otel_subflow._watch.lease import LEASE_EVERY_S, LEASE_KEY, LEASE_TTL_S, SUBSCRIBED
from otel_subflow.lab.servers import RedisServer
from tests.cli_helpers import wait_for
from tests.conftest import commandstats, commandstats_delta
from tests.service import get_state, initialize_state

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

# A process that only calls configure(), then inits one key so its decorators meet the server.
APP = textwrap.dedent("""
    import os, sys, threading
    import redis
    from otel_subflow import configure
    from tests.service import initialize_state
    configure(service_name="lease-test", instrument_redis=False, redis_metrics=False)
    client = redis.Redis.from_url(sys.argv[1])
    initialize_state(client, "lease-run", f"n{os.getpid()}", "v")
    print("ready", flush=True)
    threading.Event().wait()  # until killed
""")

# A keyspace watcher of its own, in another process (the README's hand-started form).
WATCHER = textwrap.dedent("""
    import sys, threading
    import redis
    from otel_subflow import KeyspaceWatcher
    watcher = KeyspaceWatcher(redis.Redis.from_url(sys.argv[1])).start()
    print("ready" if watcher.wait_subscribed(10) else "not subscribed", flush=True)
    threading.Event().wait()  # until killed
""")

QUIET = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}


def spawn(script: str, url: str, **env: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", script, url], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            env={**os.environ, **QUIET, "PYTHONPATH": str(ROOT), **env})
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "ready", line
    return proc


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    running: list[subprocess.Popen[str]] = []
    yield running
    for proc in running:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def lease(client: redis.Redis) -> str | None:
    value = client.get(LEASE_KEY)
    return value.decode() if isinstance(value, bytes) else value


def holder_pid(client: redis.Redis) -> int | None:
    value = lease(client)
    return int(value.split()[1]) if value else None


def watchers(client: redis.Redis) -> int:
    """Keyspace watchers subscribed to this server (each holds our three patterns)."""
    return int(client.execute_command("PUBSUB", "NUMPAT")) // 3


def test_configure_alone_elects_exactly_one_watcher_and_a_successor(r, redis_server, procs):
    apps = [spawn(APP, redis_server.url()) for _ in range(3)]
    procs.extend(apps)
    wait_for(lambda: watchers(r) == 1 and (lease(r) or "").endswith("|" + SUBSCRIBED), 2 * LEASE_EVERY_S)
    first = holder_pid(r)
    assert first in {p.pid for p in apps}
    time.sleep(LEASE_EVERY_S + 1)  # every process has run the lease script again meanwhile
    assert watchers(r) == 1 and holder_pid(r) == first

    # Cost: one lease command per process per LEASE_EVERY_S (the journal is idle meanwhile).
    before = commandstats(r)
    window_s = 3 * LEASE_EVERY_S
    time.sleep(window_s)
    delta = commandstats_delta(before, commandstats(r))
    scripts = delta.get("evalsha", 0) + delta.get("eval", 0)
    assert scripts <= 3 * (window_s / LEASE_EVERY_S + 1), delta
    assert set(delta) <= {"evalsha", "eval", "get", "set", "info"}, delta  # the script's GET/SET; commandstats

    # The holder dies without a word: another process takes over within the lease's TTL (plus a period).
    holder = next(p for p in apps if p.pid == first)
    killed_at = time.monotonic()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(10)
    wait_for(lambda: holder_pid(r) not in (None, first) and watchers(r) == 1, LEASE_TTL_S + 2 * LEASE_EVERY_S)
    took = time.monotonic() - killed_at
    print(f"\ntakeover after SIGKILL: {took:.1f} s (lease TTL {LEASE_TTL_S:g} s, period {LEASE_EVERY_S:g} s)")
    assert took <= LEASE_TTL_S + LEASE_EVERY_S + 1

    # Tombstones keep flowing: the successor journals a DEL.
    wait_for(lambda: (lease(r) or "").endswith("|" + SUBSCRIBED), LEASE_EVERY_S + 2)
    initialize_state(r, "lease-after", "n", "v")
    flush_journals(5.0)
    r.delete("subflow:state:lease-after:n")
    from otel_subflow._journal import store

    wait_for(lambda: [e.op for e in store.read_run(r, "lease-after")] == ["init", "del"], 5.0)


def test_opt_out_watches_nothing(r, redis_server, procs):
    procs.append(spawn(APP, redis_server.url(), OTEL_SUBFLOW_WATCH="false"))
    # An absence: give an elected watcher the time it takes to subscribe (well under a second),
    # then check nothing came.
    time.sleep(1.0)
    assert watchers(r) == 0 and lease(r) is None


# -- tombstones in time, a watcher in another process ----------------------------------------


def _verdicts(spans: Any, since: int) -> list[tuple[str, str]]:
    out = []
    for span in spans()[since:]:
        for event in span.events:
            if event.name == names.EVENT_STATE_MISSING:
                attrs = event.attributes or {}
                out.append((str(attrs[names.ATTR_MISSING_CAUSE]), str(attrs[names.ATTR_MISSING_CONFIDENCE])))
    return out


READS = 100


def test_reads_50_ms_after_a_del_are_deleted_definitive(r, redis_server, procs, spans):
    procs.append(spawn(WATCHER, redis_server.url()))
    set_config(SubflowConfig(analysis_rate_per_s=1e6, analysis_burst=10**6))
    app = redis_server.client()
    since = len(spans())
    for i in range(READS):
        initialize_state(app, "del-run", f"n{i}", "v", ttl_ms=3_600_000)
    assert flush_journals(5.0)
    since = len(spans())
    for i in range(READS):
        r.delete(f"subflow:state:del-run:n{i}")
        time.sleep(0.05)
        assert get_state(app, "del-run", f"n{i}") is None
    verdicts = _verdicts(spans, since)
    assert verdicts == [(names.CAUSE_DELETED, names.CONFIDENCE_DEFINITIVE)] * READS, set(verdicts)
    app.close()


def test_reads_after_redis_expired_the_key_are_expired_definitive(r, redis_server, procs, spans):
    """The key's TTL runs out; the read itself may set off the expiry (a lazy expire), so its
    tombstone is written during the analysis: a live watcher's heartbeat makes it wait for it."""
    procs.append(spawn(WATCHER, redis_server.url()))
    set_config(SubflowConfig(analysis_rate_per_s=1e6, analysis_burst=10**6))
    app = redis_server.client()
    for i in range(READS):
        initialize_state(app, "exp-run", f"n{i}", "v", ttl_ms=40)
    assert flush_journals(5.0)
    time.sleep(0.1)  # every TTL has run out; Redis expires each key actively or on the read
    since = len(spans())
    for i in range(READS):
        assert get_state(app, "exp-run", f"n{i}") is None
    verdicts = _verdicts(spans, since)
    assert verdicts == [(names.CAUSE_EXPIRED, names.CONFIDENCE_DEFINITIVE)] * READS, set(verdicts)
    app.close()


@pytest.mark.parametrize("journal", ["shared", "dedicated"])
def test_reads_50_ms_after_an_eviction_are_evicted_definitive(r, redis_server, procs, spans, journal):
    """Ballast fills the server and Redis evicts states (volatile-ttl: those with a TTL first; allkeys-lru:
    the least recently used, the states written first).

    On the full server itself (``shared``) the journal is paused while Redis evicts, and writes only
    the tombstones, into the quarter of its budget it kept; on a Redis of its own, everything: every
    verdict is definitive."""
    journal_url = redis_server.url() if journal == "dedicated" else None
    # (volatile-ttl with only ballast left refuses every write, the journal's too: allkeys-lru then)
    policy = "volatile-ttl" if journal == "dedicated" else "allkeys-lru"
    with RedisServer(maxmemory="4mb", maxmemory_policy=policy) as server:
        extra = {"OTEL_SUBFLOW_JOURNAL_URL": journal_url} if journal_url else {}
        procs.append(spawn(WATCHER, server.url(), **extra))
        set_config(SubflowConfig(analysis_rate_per_s=1e6, analysis_burst=10**6, journal_url=journal_url))
        app = server.client()
        keys = 50
        for i in range(keys):
            initialize_state(app, "ev-run", f"n{i}", "v" * 100, ttl_ms=3_600_000)
        assert flush_journals(5.0)
        # Ballast of about a state's size: each SET past maxmemory evicts a state or two.
        chunk, n = "b" * 200, 0
        pipe = app.pipeline(transaction=False)
        while int(app.info("memory")["used_memory"]) < 3.5 * 2**20:
            for _ in range(200):
                pipe.set(f"ballast:{n}", chunk)
                n += 1
            pipe.execute()
        while app.exists(*[f"subflow:state:ev-run:n{i}" for i in range(keys)]) > keys // 2:
            try:
                app.set(f"ballast:{n}", chunk)
            except redis.exceptions.OutOfMemoryError:
                break  # nothing with a TTL left to evict
            n += 1
        time.sleep(0.05)
        since = len(spans())
        evicted = [i for i in range(keys) if get_state(app, "ev-run", f"n{i}") is None]
        verdicts = _verdicts(spans, since)
        app.close()
    assert len(evicted) >= keys // 2
    if journal == "dedicated":
        assert verdicts == [(names.CAUSE_EVICTED, names.CONFIDENCE_DEFINITIVE)] * len(evicted), set(verdicts)
    else:
        # allkeys-lru may evict the journal's own buckets too (the verdict's journal_evictable says so):
        # the cause is right either way, definitive where the tombstone survived, else from the counters.
        assert {cause for cause, _ in verdicts} == {names.CAUSE_EVICTED} and len(verdicts) == len(evicted)
        print(f"\nshared journal under allkeys-lru: {verdicts.count((names.CAUSE_EVICTED, 'definitive'))} of "
              f"{len(verdicts)} definitive")


def test_a_watcher_in_the_reading_process_needs_no_round_trip(r, redis_server, spans):
    """The DEL and the read back to back: the analysis finds this process's tombstone even
    before the journal has it."""
    set_config(SubflowConfig(analysis_rate_per_s=1e6, analysis_burst=10**6))
    watcher = KeyspaceWatcher(redis_server.client()).start()
    app = redis_server.client()
    try:
        assert watcher.wait_subscribed(5)
        initialize_state(app, "local-run", "n", "v", ttl_ms=3_600_000)
        assert flush_journals(5.0)
        r.delete("subflow:state:local-run:n")
        wait_for(lambda: watcher.stats.tombstones == 1, 5.0, interval_s=0.0005)
        since = len(spans())
        assert get_state(app, "local-run", "n") is None
        assert _verdicts(spans, since) == [(names.CAUSE_DELETED, names.CONFIDENCE_DEFINITIVE)]
    finally:
        watcher.stop()
        app.close()
