"""Evidence without a watcher: Redis's counters, sampled on the journal's flush, decide.

A real redis-server with keyspace events off (no tombstone can exist): a DEL gives
``deleted`` and an eviction ``evicted``, both ``probable``, from the counters an init carries and the ones the
analysis reads. The sampling costs no command of its own: one INFO per second at
most, inside the journal's script call.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
import redis

from otel_subflow import SubflowConfig, flush_journals, names
from otel_subflow._config import set_config
from otel_subflow._journal import schema, store
from otel_subflow.lab.servers import RedisServer
from tests.conftest import commandstats, commandstats_delta
from tests.service import get_state, initialize_state

UNLIMITED = SubflowConfig(analysis_rate_per_s=1e6, analysis_burst=10**6)


def _verdict(spans: Any) -> dict[str, Any]:
    (span,) = [s for s in spans() if s.name == names.SPAN_STATE_GET][-1:]
    (event,) = [e for e in span.events if e.name == names.EVENT_STATE_MISSING]
    return dict(event.attributes or {})


def _warm(client: redis.Redis) -> None:
    """A first flush: it takes the counters sample that the next inits carry."""
    initialize_state(client, "warm-run", "n", "v", ttl_ms=3_600_000)
    assert flush_journals(5.0)


def test_events_off_a_del_is_deleted_from_the_counters(r, spans):
    set_config(UNLIMITED)
    with RedisServer(notify_keyspace_events="") as server:
        app = server.client()
        _warm(app)
        initialize_state(app, "ctr-run", "gone", "v", ttl_ms=3_600_000)
        assert flush_journals(5.0)
        (init,) = [e for e in store.read_run(app, "ctr-run") if e.op == "init"]
        sample = schema.parse_counter_sample(init.counters)  # the sample rode on the init
        assert sample is not None and list(sample) == list(schema.COUNTER_SAMPLE[:4])
        app.delete("subflow:state:ctr-run:gone")
        assert get_state(app, "ctr-run", "gone") is None
        app.close()
    attrs = _verdict(spans)
    assert (attrs[names.ATTR_MISSING_CAUSE], attrs[names.ATTR_MISSING_CONFIDENCE]) == (
        names.CAUSE_DELETED, names.CONFIDENCE_PROBABLE), {k: v for k, v in attrs.items() if "summary" not in k}
    assert attrs[names.EVIDENCE_PREFIX + "deletes_since_init"] == 1
    assert attrs[names.EVIDENCE_PREFIX + "evicted_since_init"] == 0


def test_events_off_an_eviction_is_evicted_from_the_counters(r, spans):
    """volatile-ttl evicts the states (the shortest TTLs: ballast has none, the journal's buckets live
    longer) while the memory pressure pauses the journal; the counters, not the pressure, decide."""
    # A budget whose quarter (what a paused journal keeps) holds the run: the default 2 % of 4 MB would not.
    set_config(dataclasses.replace(UNLIMITED, journal_budget_pct=25.0))
    with RedisServer(notify_keyspace_events="", maxmemory="4mb", maxmemory_policy="volatile-ttl") as server:
        app = server.client()
        _warm(app)
        keys = 40
        for i in range(keys):
            initialize_state(app, "ev-run", f"n{i}", "v" * 100, ttl_ms=60_000)
        assert flush_journals(5.0)
        pipe = app.pipeline(transaction=False)
        n = 0
        while int(app.info("memory")["used_memory"]) < 3.5 * 2**20:
            for _ in range(200):
                pipe.set(f"ballast:{n}", "b" * 200)
                n += 1
            pipe.execute()
        while app.exists(*[f"subflow:state:ev-run:n{i}" for i in range(keys)]) > keys // 2:
            try:
                app.set(f"ballast:{n}", "b" * 200)
            except redis.exceptions.OutOfMemoryError:
                break  # nothing with a TTL left to evict
            n += 1
        missing = [i for i in range(keys) if not app.exists(f"subflow:state:ev-run:n{i}")]
        since = len(spans())
        for i in missing:
            assert get_state(app, "ev-run", f"n{i}") is None
        app.close()
    verdicts = [
        (str(e.attributes[names.ATTR_MISSING_CAUSE]), str(e.attributes[names.ATTR_MISSING_CONFIDENCE]))
        for s in spans()[since:] for e in s.events if e.name == names.EVENT_STATE_MISSING and e.attributes
    ]
    assert missing and verdicts == [(names.CAUSE_EVICTED, names.CONFIDENCE_PROBABLE)] * len(missing), set(verdicts)


@pytest.mark.parametrize("flushes", [20])
def test_sampling_adds_no_command(r, redis_server, flushes):
    """The sample is one INFO inside the journal's script, at most once a second: no command of its own
    per flush (INFO commandstats counts the script's inner calls: INFO <= 1 per second)."""
    app = redis_server.client()
    _warm(app)
    before = commandstats(r)
    started = time.monotonic()
    for i in range(flushes):
        initialize_state(app, "cost-run", f"n{i}", "v", ttl_ms=3_600_000)
        assert flush_journals(5.0)
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    delta = commandstats_delta(before, commandstats(r))
    app.close()
    assert delta.get("evalsha", 0) + delta.get("eval", 0) == flushes, delta
    assert delta.get("info", 0) <= elapsed + 1, (delta, elapsed)
