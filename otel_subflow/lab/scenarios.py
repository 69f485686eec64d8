"""The failure modes the lab injects, each with its ground truth: one missing state per scenario.

A scenario has one worker write and another read, and injects its fault in
between (:class:`Case`). Its name, the cause it produces, its description and
whether it may run on a Redis the lab did not start are declared once, with
:func:`scenario`; :data:`SCENARIOS`, :data:`EXTERNAL_SAFE` and
:data:`DESCRIPTIONS` are read from there.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

from otel_subflow import names
from otel_subflow.lab.harness import Injection, Lab, wait_for
from otel_subflow.lab.servers import RedisServer
from otel_subflow.lab.worker import GetResult


@dataclasses.dataclass(frozen=True)
class Read:
    """The read a scenario's verdict is about: the node asked for and what the reader got."""

    node: str
    result: GetResult


class Case:
    """One injection: a writer and a reader on different hosts, and a fresh run."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.writer, self.reader = lab.pair()
        self.run = lab.new_run()

    def key(self, node: str) -> str:
        return names.DEFAULT_KEY_TEMPLATE.format(run_id=self.run, node_id=node)

    def write(self, url: str, node: str, **kwargs: Any) -> None:
        """The writer's init of ``node``, its journal flushed."""
        self.writer.init(url, self.run, node, **kwargs)
        self.writer.flush()

    def read(self, url: str, node: str) -> Read:
        return Read(node, self.reader.get(url, self.run, node))


Inject = Callable[[Case], Read]


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A failure mode: calling it with a lab injects the fault and returns the :class:`Injection`."""

    name: str
    truth: str
    description: str
    inject: Inject
    #: Runs on a Redis the lab did not start (no restart, flush, eviction, replica or second server).
    external_safe: bool = False
    #: How long a race entry may take to answer the miss (only a race is answered later).
    wait_race_s: float = 0.0

    def __call__(self, lab: Lab) -> Injection:
        case = Case(lab)
        read = self.inject(case)
        return lab.finalise(self.name, self.truth, case.run, read.node, case.writer, case.reader, read.result,
                            wait_race_s=self.wait_race_s)


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, truth: str, description: str, *, external_safe: bool = False,
             wait_race_s: float = 0.0) -> Callable[[Inject], Inject]:
    """Register the decorated injection as the scenario ``name`` that produces the cause ``truth``."""

    def register(inject: Inject) -> Inject:
        SCENARIOS[name] = Scenario(name, truth, description, inject, external_safe, wait_race_s)
        return inject

    return register


@scenario("ttl_too_short", names.CAUSE_EXPIRED,
          "a TTL shorter than the workflow step: the state expires before it is read", external_safe=True)
def expired(case: Case) -> Read:
    lab, node = case.lab, "node-ttl"
    case.write(lab.state.url(), node, ttl_ms=30)
    if lab.keyspace_events:
        lab.wait_journal(case.run, "expired", case.key(node))
    else:
        time.sleep(0.05)
        wait_for(lambda: lab.admin.exists(case.key(node)) == 0, 5)
    return case.read(lab.state.url(), node)


@scenario("memory_pressure", names.CAUSE_EVICTED, "maxmemory with volatile-lru: filler keys push the state out")
def evicted(case: Case) -> Read:
    lab, node = case.lab, "node-mem"
    case.write(lab.evicting.url(), node, data="s" * 512, ttl_ms=600_000)
    filler = lab.evicting.client()
    payload = b"f" * 16_384
    for batch in range(400):
        pipe = filler.pipeline(transaction=False)
        for _ in range(20):
            pipe.set(f"filler:{uuid.uuid4().hex}", payload, ex=600)
        pipe.execute()
        if not filler.exists(case.key(node)):
            break
        if batch % 10 == 0:
            filler.get("warm")  # keep the clock moving; the state key stays least recently used
    filler.close()
    if lab.keyspace_events:
        lab.wait_journal(case.run, "evicted", case.key(node))
    return case.read(lab.evicting.url(), node)


@scenario("early_cleanup", names.CAUSE_DELETED, "a cleanup job deletes the state before the reader gets to it",
          external_safe=True)
def deleted(case: Case) -> Read:
    lab, node = case.lab, "node-del"
    case.write(lab.state.url(), node)
    lab.admin.delete(case.key(node))  # from another client than the writer's
    if lab.keyspace_events:
        lab.wait_journal(case.run, "del", case.key(node))
    return case.read(lab.state.url(), node)


FLUSH_DB = 3


@scenario("flushdb", names.CAUSE_DELETED, "someone runs FLUSHDB on the state database")
def flushed(case: Case) -> Read:
    # No key events are published for a FLUSHDB.
    lab, node = case.lab, "node-flush"
    case.write(lab.state.url(FLUSH_DB), node)
    flusher = lab.state.client(FLUSH_DB)
    flusher.flushdb()
    flusher.close()
    return case.read(lab.state.url(FLUSH_DB), node)


@scenario("cross_worker_race", names.CAUSE_GET_BEFORE_INIT,
          "a worker reads the state before another worker's init lands", external_safe=True, wait_race_s=10.0)
def race(case: Case) -> Read:
    lab, node = case.lab, "node-race"
    read = case.read(lab.state.url(), node)
    if lab.rng.random() < 0.5:
        case.reader.flush()  # the miss marker lands first: the init's flush finds it
    case.writer.init(lab.state.url(), case.run, node)
    return read


WRONG_DB = 1


@scenario("wrong_db", names.CAUSE_WRONG_ENDPOINT,
          "a worker configured with the wrong db index writes where no one reads", external_safe=True)
def wrong_db(case: Case) -> Read:
    lab, node = case.lab, "node-db"
    case.write(lab.state.url(WRONG_DB), node)
    return case.read(lab.state.url(0), node)


@scenario("wrong_server", names.CAUSE_WRONG_ENDPOINT, "a worker pointed at another Redis server")
def wrong_server(case: Case) -> Read:
    lab, node = case.lab, "node-endpoint"
    case.write(lab.other.url(), node)
    return case.read(lab.state.url(), node)


@scenario("redis_restart", names.CAUSE_SERVER_RESTART,
          "Redis restarts without persistence between the write and the read")
def restart(case: Case) -> Read:
    lab, node = case.lab, "node-restart"
    if not isinstance(lab.state, RedisServer):
        raise RuntimeError("redis_restart needs the lab's own server")
    case.write(lab.state.url(), "warm-up")
    case.read(lab.state.url(), "warm-up")  # a hit: the reader has a connection from before
    case.write(lab.state.url(), node)
    lab.state.restart()
    if lab.keyspace_events:
        for watcher in lab.watchers:
            watcher.wait_subscribed(10)
    read = case.read(lab.state.url(), node)
    wait_for(lambda: lab.replica.client().info("replication").get("master_link_status") == "up", 15)
    return read


@scenario("replica_lag", names.CAUSE_REPLICA_LAG, "the reader uses a replica that has not received the write yet")
def replica_lag(case: Case) -> Read:
    lab, node = case.lab, "node-replica"
    if lab.proxy is None:
        raise RuntimeError("replica_lag needs the lab's own replica")
    lab.proxy.hold()
    try:
        case.write(lab.state.url(), node)
        return case.read(lab.replica.url(), node)
    finally:
        lab.proxy.release()


@scenario("key_mismatch", names.CAUSE_KEY_MISMATCH,
          "writer and reader build the key differently (case, padding, spaces)", external_safe=True)
def key_mismatch(case: Case) -> Read:
    lab = case.lab
    written, read = lab.rng.choice([("Node-7", "node-7"), ("node-07", "node-7"), ("node-7 ", "node-7")])
    case.write(lab.state.url(), written)
    return case.read(lab.state.url(), read)


@scenario("never_written", names.CAUSE_NEVER_WRITTEN, "the reader asks for a node the workflow never initialised",
          external_safe=True)
def never_written(case: Case) -> Read:
    lab = case.lab
    case.write(lab.state.url(), "node-1")
    return case.read(lab.state.url(), "node-2")


#: Scenarios that run on a Redis the lab did not start.
EXTERNAL_SAFE = frozenset(name for name, s in SCENARIOS.items() if s.external_safe)

DESCRIPTIONS: dict[str, str] = {name: s.description for name, s in SCENARIOS.items()}
