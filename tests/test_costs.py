"""Exact Redis costs of the instrumentation, counted with INFO commandstats."""

from __future__ import annotations

from otel_subflow import SubflowConfig, flush_journals
from otel_subflow._config import set_config
from tests.conftest import commandstats, commandstats_delta
from tests.service import get_state, initialize_state

#: What the journal's write script may call (commandstats counts calls made inside scripts).
SCRIPT_COMMANDS = {"time", "hmget", "zrange", "hget", "hset", "hsetnx", "hincrby", "zadd", "pexpire", "info",
                   "unlink", "zrem", "hdel"}


def test_hits_cost_exactly_one_get_each_and_ids_are_fetched_once(r, redis_server):
    """On warm connections N decorated gets are N GETs; CLIENT and INFO do not grow with N."""
    app = redis_server.client()
    initialize_state(app, "run-c", "n", "v")
    get_state(app, "run-c", "n")  # warm: the pool's ids are fetched here, once
    flush_journals()
    observer = redis_server.client()
    for n in (10, 200):
        before = commandstats(observer)
        for _ in range(n):
            assert get_state(app, "run-c", "n") == b"v"
        delta = commandstats_delta(before, commandstats(observer))
        assert delta == {"get": n}, delta
    app.close()
    observer.close()


def test_first_call_of_a_pool_fetches_ids_in_one_round_trip(r, redis_server):
    """A new pool: one CLIENT ID and one INFO, then never again."""
    observer = redis_server.client()
    before = commandstats(observer)
    app = redis_server.client()
    for _ in range(5):
        app.set("k", 1)
        initialize_state(app, "run-d", "n", "v")
    delta = commandstats_delta(before, commandstats(observer))
    assert delta.get("client|id") == 1, delta
    assert delta.get("info") == 1, delta
    assert delta.get("set") == 10, delta
    app.close()
    observer.close()


def test_init_adds_no_synchronous_round_trip(r, redis_server):
    """Inits issue only the app's SETs; the journal writes come later, from the flusher."""
    set_config(SubflowConfig(journal_flush_interval_s=30.0, journal_batch_size=10_000))
    app = redis_server.client()
    initialize_state(app, "run-e", "warm", "v")
    flush_journals()
    observer = redis_server.client()
    before = commandstats(observer)
    for i in range(50):
        initialize_state(app, "run-e", f"n{i}", "v")
    assert commandstats_delta(before, commandstats(observer)) == {"set": 50}
    flush_journals()
    delta = commandstats_delta(before, commandstats(observer))
    assert delta.pop("set") == 50
    # One script call for the batch; what it runs inside is counted too, and does not grow with
    # the records of one run: one HGET + HSET of the run's field, one of the global copy.
    assert delta.pop("evalsha", 0) + delta.pop("eval", 0) == 1, delta
    assert delta.get("hset", 0) <= 4 and delta.get("hget", 0) <= 4, delta
    assert set(delta) <= SCRIPT_COMMANDS, delta
    app.close()
    observer.close()
