"""The miss analysis: its cost in round trips and commands, its rate limit, its failures, its SCAN."""

from __future__ import annotations

import redis

from otel_subflow import SubflowConfig, flush_journals, instrument_state_get, names
from otel_subflow._analysis.limits import TokenBucket
from otel_subflow._analysis.probe import glob_escape, near_identical, run_scan_pattern
from otel_subflow._config import set_config
from tests.conftest import commandstats, commandstats_delta
from tests.service import get_state, initialize_state


def _event(spans, index=-1):
    gets = [s for s in spans() if s.name == names.SPAN_STATE_GET]
    return next(e for e in gets[index].events if e.name == names.EVENT_STATE_MISSING).attributes


class PipelineCounter:
    """Counts pipeline round trips (execute calls) of any redis-py pipeline, calling through."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = redis.client.Pipeline.execute
        counter = self

        def execute(pipe, *args, **kwargs):
            counter.count += 1
            return original(pipe, *args, **kwargs)

        monkeypatch.setattr(redis.client.Pipeline, "execute", execute)


def test_analysed_miss_costs_one_round_trip_and_exact_commands(r, redis_server, monkeypatch, spans):
    """Journal in db 0 of the same server: one pipeline of plain reads, no script, no write."""
    app = redis_server.client()
    initialize_state(app, "run-a", "other", "v")
    get_state(app, "run-a", "other")  # warm the pool's ids
    flush_journals()
    get_state(app, "run-a", "warm-miss")  # and the analysis connection, its bucket list and writers (once)
    flush_journals()
    counter = PipelineCounter(monkeypatch)
    before = commandstats(r)
    assert get_state(app, "run-a", "gone") is None
    delta = commandstats_delta(before, commandstats(r))
    assert counter.count == 1
    # ZRANGE: the journal's buckets; HMGET: its status; HGET: the run's records in the one bucket
    # GET: the app's, and the keyspace watchers' heartbeat (db 0 only)
    assert delta == {"get": 2, "pttl": 1, "info": 1, "scan": 1, "zrange": 1, "hmget": 1, "hget": 1}, delta
    assert _event(spans)[names.ATTR_MISSING_CAUSE] == names.CAUSE_NEVER_WRITTEN
    app.close()


def test_journal_elsewhere_costs_two_round_trips(r, redis_server, monkeypatch, spans):
    """A reader on db 2 (journal in db 0): exactly two round trips."""
    app = redis_server.client(db=2)
    get_state(app, "run-b", "warm")
    get_state(app, "run-b", "warm-miss")
    flush_journals()
    get_state(app, "run-b", "warm-miss-2")  # the bucket list and the writer are known from now on
    flush_journals()
    counter = PipelineCounter(monkeypatch)
    get_state(app, "run-b", "gone")
    assert counter.count == 2
    app.close()


def test_analysis_makes_no_spans_of_its_own(r, spans):
    """The analysis runs with instrumentation suppressed: one span per decorated get, nothing else."""
    get_state(r, "run-c", "n")
    assert [s.name for s in spans()] == [names.SPAN_STATE_GET]


def test_failure_storm_is_rate_limited(r, redis_server):
    """10,000 misses in a burst give at most burst + rate x elapsed analyses (PTTLs counted)."""
    set_config(SubflowConfig(analysis_rate_per_s=20.0, analysis_burst=40))
    import time

    app = redis_server.client()

    @instrument_state_get()
    def load(redis, run_id, node_id):
        return None  # a miss without touching Redis: only the analysis talks to it

    load(app, "warm", "n")
    before = commandstats(r)
    started = time.monotonic()
    for i in range(10_000):
        load(app, "storm", f"n{i}")
    elapsed = time.monotonic() - started
    analyses = commandstats_delta(before, commandstats(r)).get("pttl", 0)
    ceiling = 39 + 20.0 * elapsed + 1  # the warm-up took one token
    assert 0 < analyses <= ceiling, (analyses, elapsed)
    app.close()


def test_rate_limited_miss_says_unknown_and_why(r, spans):
    """Once the bucket is empty the verdict is unknown, and the evidence says rate-limited."""
    set_config(SubflowConfig(analysis_rate_per_s=0.001, analysis_burst=1))
    get_state(r, "run-d", "a")
    get_state(r, "run-d", "b")
    event = _event(spans)
    assert event[names.ATTR_MISSING_CAUSE] == names.CAUSE_UNKNOWN
    assert event["subflow.evidence.reason"] == "analysis rate-limited"


def test_analysis_timeout_says_unknown_and_why(r, redis_server, spans):
    """A paused server: the analysis gives up at its timeout and says so."""
    set_config(SubflowConfig(analysis_timeout_s=0.05))
    pauser = redis_server.client()

    @instrument_state_get()
    def load(redis, run_id, node_id):
        pauser.execute_command("CLIENT", "PAUSE", "400", "ALL")
        return None

    import time

    started = time.perf_counter()
    load(r, "run-e", "n")
    elapsed = time.perf_counter() - started
    event = _event(spans)
    assert event[names.ATTR_MISSING_CAUSE] == names.CAUSE_UNKNOWN, [(k, v) for k, v in event.items() if "evidence" in k]
    assert "TimeoutError" in event["subflow.evidence.reason"]
    assert elapsed < 0.3  # bounded by the 50 ms analysis timeout, not the 400 ms pause
    pauser.execute_command("CLIENT", "UNPAUSE")
    pauser.close()


def test_glob_characters_in_ids_never_match_another_runs_keys(r, spans):
    """Run ids with * ? [ ] \\: the SCAN pattern is escaped and other runs' keys are not evidence."""
    for other in ("runXab", "run-ab", "run\\ab", "runab"):
        r.set(f"subflow:state:{other}:node-1", "v")
    for run_id in ("run*ab", "run?ab", "run[x]ab", "run\\*"):
        get_state(r, run_id, "node-1")
        event = _event(spans)
        assert event[names.ATTR_MISSING_CAUSE] != names.CAUSE_KEY_MISMATCH, (run_id, event)
        assert "subflow.evidence.near_key" not in event


def test_near_identical_keys_of_the_same_run_are_found(r, spans):
    """Case, zero padding, separators and spaces: found by the bounded SCAN."""
    for written, read in (("Node-1", "node-1"), ("node-01", "node-1"), ("node_1", "node-1"), (" node-1", "node-1")):
        r.set(f"subflow:state:run-k:{written}", "v")
        get_state(r, "run-k", read)
        event = _event(spans)
        assert event[names.ATTR_MISSING_CAUSE] == names.CAUSE_KEY_MISMATCH, (written, event)
        assert event["subflow.evidence.near_key"] == f"subflow:state:run-k:{written}"
        r.delete(f"subflow:state:run-k:{written}")


def test_pattern_helpers():
    """glob_escape escapes every glob character; the run pattern is case-insensitive."""
    assert glob_escape("a*b?c[d]e\\f^g-h") == "a\\*b\\?c\\[d\\]e\\\\f\\^g\\-h"
    assert run_scan_pattern("Ab*") == "*[aA][bB]\\**"
    assert near_identical("subflow:state:r:node-1", "subflow:state:r:Node-01")
    assert not near_identical("subflow:state:r:node-1", "subflow:state:r:node-11")
    assert not near_identical("subflow:state:r:node-1", "subflow:state:r:node-1")


def test_token_bucket_refills_at_its_rate():
    """The bucket gives its burst, then one token per 1/rate seconds."""
    bucket = TokenBucket(rate=1000.0, burst=3)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    bucket.updated -= 0.002  # two milliseconds later
    assert bucket.take() and bucket.take()
    assert bucket.denied == 1
