"""What the journal costs the user's data on a small Redis: the same workload, decorated and not.

20 MB maxmemory, 10,000 runs x 5 nodes, 100-byte values with a 1 h TTL, at the
default settings (the journal in db 0 of the state server, its default budget).
Each policy gets a fresh server per variant. The figures are printed (``-s``)
and the issue's bounds asserted:

- ``allkeys-lru`` / ``volatile-lru``: states lost decorated <= undecorated + 1 % of the states;
- ``noeviction``: OOM errors in the user's own SETs decorated <= undecorated + 1 %;
- ``allkeys-lru`` at 15 MB, where the states alone fill ~88 % of it: the same bound.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from otel_subflow import flush_journals, instrument_state_init
from otel_subflow._config import get_config
from otel_subflow._journal import store
from otel_subflow._journal.location import journal_for
from otel_subflow._runtime import runtime
from otel_subflow.lab.servers import RedisServer

MAXMEMORY_MB = 20
RUNS, NODES = 10_000, 5
STATES = RUNS * NODES
VALUE = "v" * 100
TTL_MS = 3_600_000
SLACK = STATES // 100  # the 1 %

pytestmark = pytest.mark.slow


def initialize_state(redis: redis.Redis, run_id: str, node_id: str, data: str, ttl_ms: int = TTL_MS) -> bool:
    return bool(redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms))


# A provider of our own: 50,000 spans are not kept in the test session's in-memory exporter.
decorated_init = instrument_state_init(tracer_provider=TracerProvider(), meter_provider=MeterProvider())(
    initialize_state)


@dataclasses.dataclass
class Outcome:
    lost: int
    oom_errors: int
    used_memory: int
    evicted_keys: int
    journal_bytes: int
    journal_measured: int
    journal_budget: int


def run_workload(policy: str, maxmemory_mb: int, decorated: bool) -> Outcome:
    init = decorated_init if decorated else initialize_state
    runtime.reset()
    with RedisServer(maxmemory=f"{maxmemory_mb}mb", maxmemory_policy=policy) as server:
        client = server.client()
        oom = 0
        for run in range(RUNS):
            for node in range(NODES):
                try:
                    init(client, f"run-{run}", f"n{node}", VALUE)
                except redis.exceptions.OutOfMemoryError:
                    oom += 1
        flush_journals(30.0)
        pipe = client.pipeline(transaction=False)
        for run in range(RUNS):
            pipe.exists(*(f"subflow:state:run-{run}:n{node}" for node in range(NODES)))
        kept = sum(int(n) for n in pipe.execute())
        info: dict[str, Any] = client.info()
        usage = store.read_usage(client)
        journal = journal_for(client, get_config()) if decorated else None
        budget = journal.stats().budget_bytes if journal is not None else 0
        client.close()
    runtime.reset()
    return Outcome(STATES - kept - oom, oom, int(info["used_memory"]), int(info["evicted_keys"]),
                   usage.estimated_bytes, usage.measured_bytes or 0, budget)


@pytest.mark.parametrize(("policy", "maxmemory_mb"), [
    ("allkeys-lru", MAXMEMORY_MB), ("volatile-lru", MAXMEMORY_MB), ("noeviction", MAXMEMORY_MB),
    # Tight: the states alone fill ~88 % of it, so the journal must yield (pause, trim) to keep them.
    ("allkeys-lru", 15),
])
def test_the_journal_costs_no_state_on_a_small_redis(policy, maxmemory_mb):
    plain = run_workload(policy, maxmemory_mb, decorated=False)
    ours = run_workload(policy, maxmemory_mb, decorated=True)
    print(f"\n{policy}: {STATES} states, {maxmemory_mb} MB maxmemory\n"
          f"  undecorated: lost {plain.lost}, OOM {plain.oom_errors}, used {plain.used_memory / 1e6:.1f} MB, "
          f"evicted {plain.evicted_keys}\n"
          f"  decorated:   lost {ours.lost}, OOM {ours.oom_errors}, used {ours.used_memory / 1e6:.1f} MB, "
          f"evicted {ours.evicted_keys}, journal {ours.journal_bytes / 1e3:.0f} kB "
          f"(MEMORY USAGE {ours.journal_measured / 1e3:.0f} kB; "
          f"budget {ours.journal_budget / 1e3:.0f} kB)")
    # The workload fills a good part of the server: otherwise the comparison would say nothing.
    assert plain.used_memory >= 0.4 * maxmemory_mb * 2**20, plain
    assert ours.lost <= plain.lost + SLACK, (plain, ours)
    assert ours.oom_errors <= plain.oom_errors + SLACK, (plain, ours)
    assert 0 < ours.journal_bytes <= ours.journal_budget, ours
