"""Fault injection with known ground truth: each scenario produces one missing state.

A :class:`Lab` runs real redis-server processes (a state server, a second
endpoint, an evicting server, a replica behind a lag proxy, and a journal
server shared by everyone, as recommended for evicting setups) and two or more
worker processes with different host identities. Each scenario has one worker
write and another read, injects its fault in between, and returns an
:class:`Injection`: the truth, what the reader's span said, and the final
verdict (a miss later answered by an init is finalised as ``get_before_init``).
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from otel_subflow import names
from otel_subflow._config import SubflowConfig
from otel_subflow._journal import store
from otel_subflow._journal.writer import Journal
from otel_subflow._watch.events import check_events_flags
from otel_subflow._watch.watcher import KeyspaceWatcher
from otel_subflow.lab.proxy import LagProxy
from otel_subflow.lab.servers import ExternalServer, RedisServer
from otel_subflow.lab.worker import GetResult, Worker


@dataclasses.dataclass
class Injection:
    """One injected failure and what otel-subflow concluded."""

    scenario: str
    truth: str
    run_id: str
    node_id: str
    writer: str
    reader: str
    result: GetResult
    final_cause: str
    final_confidence: str
    summary: str

    @property
    def correct(self) -> bool:
        return self.final_cause == self.truth

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["correct"] = self.correct
        return out


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


class Lab:
    """Servers, watchers and workers for the scenarios. Use as a context manager."""

    def __init__(
        self,
        *,
        keyspace_events: bool = True,
        workers: int = 2,
        seed: int | None = None,
        state_url: str | None = None,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.keyspace_events = keyspace_events
        self.rng = random.Random(seed)
        self.worker_count = max(2, workers)
        #: An external Redis (``--redis-url``): only the scenarios in EXTERNAL_SAFE run on it.
        self.state_url = state_url
        self.worker_env = dict(worker_env or {})
        self.servers: list[Any] = []
        self.state: RedisServer | ExternalServer
        self.watched: list[RedisServer | ExternalServer] = []
        self.journal_server: RedisServer | ExternalServer
        self.watchers: list[KeyspaceWatcher] = []
        self.workers: list[Worker] = []
        self.proxy: LagProxy | None = None

    # -- setup ---------------------------------------------------------------------

    def _server(self, **kwargs: Any) -> RedisServer:
        notify = "Exeg" if self.keyspace_events else ""
        # A replica's full sync otherwise waits 5 s for more replicas to join.
        extra = ["--repl-diskless-sync-delay", "0"]
        server = RedisServer(notify_keyspace_events=notify, extra_args=extra, **kwargs).start()
        self.servers.append(server)
        return server

    @property
    def scenarios(self) -> list[str]:
        """The scenarios this lab can run (all of them, or the external-safe ones)."""
        return [name for name in SCENARIOS if self.state_url is None or name in EXTERNAL_SAFE]

    def start(self) -> Lab:
        try:
            if self.state_url is not None:
                self._start_external(self.state_url)
            else:
                self._start_embedded()
            self.config = SubflowConfig(journal_url=self.journal_server.url())
            self.journal = Journal(redis.Redis.from_url(self.journal_server.url(), decode_responses=True),
                                   self.config, dedicated=True, label="lab-journal")
            if self.keyspace_events:
                for server in self.watched:
                    watcher = KeyspaceWatcher(server.client(), journal=self.journal, config=self.config)
                    self.watchers.append(watcher.start())
            env = {"OTEL_SUBFLOW_JOURNAL_URL": self.journal_server.url(), **self.worker_env}
            hosts = [f"worker-{chr(ord('a') + i)}" for i in range(self.worker_count)]
            self.workers = [Worker(host, env=env) for host in hosts]
            self.admin = self.state.client()
            self.journal_client = self.journal_server.client(decode_responses=True)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_embedded(self) -> None:
        self.journal_server = RedisServer(notify_keyspace_events="").start()
        self.servers.append(self.journal_server)
        self.state = self._server()
        self.other = self._server()
        self.evicting = self._server(maxmemory="4mb", maxmemory_policy="volatile-lru")
        self.proxy = LagProxy("127.0.0.1", self.state.port)  # type: ignore[union-attr]
        self.replica = self._server(replicaof=("127.0.0.1", self.proxy.port))
        wait_for(lambda: self.replica.client().info("replication").get("master_link_status") == "up", 15)
        self.watched = [self.state, self.other, self.evicting]  # type: ignore[list-item]

    def _start_external(self, url: str) -> None:
        self.state = ExternalServer(url)
        self.state.client().ping()  # fail early and clearly
        self.journal_server = self.state
        self.watched = [self.state]
        if self.keyspace_events:
            value = self.state.client().config_get("notify-keyspace-events").get("notify-keyspace-events", "")
            self.keyspace_events = check_events_flags(str(value)).ok

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for watcher in self.watchers:
            watcher.stop(2.0)
        if self.proxy is not None:
            self.proxy.close()
        for server in reversed(self.servers):
            server.cleanup()

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers -------------------------------------------------------------------

    def pair(self) -> tuple[Worker, Worker]:
        """A writer and a reader on different hosts."""
        writer, reader = self.rng.sample(self.workers, 2)
        return writer, reader

    @staticmethod
    def new_run() -> str:
        return f"run-{uuid.uuid4().hex[:10]}"

    def journal_entries(self, run_id: str) -> list[Any]:
        return store.read_run(self.journal_client, run_id)

    def wait_journal(self, run_id: str, op: str, key: str | None = None, timeout_s: float = 10.0) -> bool:
        def seen() -> bool:
            self.journal.flush(1.0)
            return any(e.op == op and (key is None or e.fields.get("key") == key)
                       for e in self.journal_entries(run_id))

        return wait_for(seen, timeout_s, 0.03)

    def settle(self, *workers: Worker) -> None:
        """Flush the workers' journals (and ours) so the journal shows everything so far."""
        for worker in workers or self.workers:
            worker.flush()
        self.journal.flush(2.0)

    def finalise(self, scenario: str, truth: str, run_id: str, node_id: str, writer: Worker,
                 reader: Worker, result: GetResult, wait_race_s: float = 0.0) -> Injection:
        """The final verdict: the span's, unless a race entry answered this miss later."""
        verdict = result.verdict or {}
        cause = str(verdict.get(names.ATTR_MISSING_CAUSE, "none"))
        confidence = str(verdict.get(names.ATTR_MISSING_CONFIDENCE, "none"))
        summary = str(verdict.get(names.ATTR_MISSING_SUMMARY, ""))

        def race() -> Any:
            return next((e for e in self.journal_entries(run_id)
                         if e.op == "race" and e.fields.get("get_span_id") == result.span_id), None)

        def settled_race() -> bool:
            self.settle(writer, reader)
            return race() is not None

        if wait_race_s > 0:
            wait_for(settled_race, wait_race_s, 0.05)
        entry = race()
        if entry is not None:
            cause, confidence = names.CAUSE_GET_BEFORE_INIT, names.CONFIDENCE_DEFINITIVE
            summary = f"The read ran before the init (race found by {entry.fields.get('detected_by')})."
        return Injection(scenario, truth, run_id, node_id, writer.host, reader.host, result,
                         cause, confidence, summary)


# -- the scenarios -------------------------------------------------------------------

def expired(lab: Lab) -> Injection:
    """A TTL that is too short: the state expires before the read."""
    writer, reader = lab.pair()
    run, node = lab.new_run(), "node-ttl"
    key = names.DEFAULT_KEY_TEMPLATE.format(run_id=run, node_id=node)
    writer.init(lab.state.url(), run, node, ttl_ms=30)
    writer.flush()
    if lab.keyspace_events:
        lab.wait_journal(run, "expired", key)
    else:
        time.sleep(0.05)
        wait_for(lambda: lab.admin.exists(key) == 0, 5)
    result = reader.get(lab.state.url(), run, node)
    return lab.finalise("ttl_too_short", names.CAUSE_EXPIRED, run, node, writer, reader, result)


def evicted(lab: Lab) -> Injection:
    """Memory pressure under volatile-lru: filler keys push the state out."""
    writer, reader = lab.pair()
    run, node = lab.new_run(), "node-mem"
    key = names.DEFAULT_KEY_TEMPLATE.format(run_id=run, node_id=node)
    writer.init(lab.evicting.url(), run, node, data="s" * 512, ttl_ms=600_000)
    writer.flush()
    filler = lab.evicting.client()
    payload = b"f" * 16_384
    for batch in range(400):
        pipe = filler.pipeline(transaction=False)
        for _ in range(20):
            pipe.set(f"filler:{uuid.uuid4().hex}", payload, ex=600)
        pipe.execute()
        if not filler.exists(key):
            break
        if batch % 10 == 0:
            filler.get("warm")  # keep the clock moving; the state key stays least recently used
    filler.close()
    if lab.keyspace_events:
        lab.wait_journal(run, "evicted", key)
    result = reader.get(lab.evicting.url(), run, node)
    return lab.finalise("memory_pressure", names.CAUSE_EVICTED, run, node, writer, reader, result)


def deleted(lab: Lab) -> Injection:
    """A cleanup job deletes the state too early (DEL from another client)."""
    writer, reader = lab.pair()
    run, node = lab.new_run(), "node-del"
    key = names.DEFAULT_KEY_TEMPLATE.format(run_id=run, node_id=node)
    writer.init(lab.state.url(), run, node)
    writer.flush()
    lab.admin.delete(key)
    if lab.keyspace_events:
        lab.wait_journal(run, "del", key)
    result = reader.get(lab.state.url(), run, node)
    return lab.finalise("early_cleanup", names.CAUSE_DELETED, run, node, writer, reader, result)


FLUSH_DB = 3


def flushed(lab: Lab) -> Injection:
    """Someone runs FLUSHDB on the state db (no key events are published for it)."""
    writer, reader = lab.pair()
    run, node = lab.new_run(), "node-flush"
    writer.init(lab.state.url(FLUSH_DB), run, node)
    writer.flush()
    flusher = lab.state.client(FLUSH_DB)
    flusher.flushdb()
    flusher.close()
    result = reader.get(lab.state.url(FLUSH_DB), run, node)
    return lab.finalise("flushdb", names.CAUSE_DELETED, run, node, writer, reader, result)


def race(lab: Lab) -> Injection:
    """A cross-worker race: the reader runs before the writer's init."""
    writer, reader = lab.pair()
    run, node = lab.new_run(), "node-race"
    result = reader.get(lab.state.url(), run, node)
    if lab.rng.random() < 0.5:
        reader.flush()  # the miss marker lands first: the init's flush finds it
    writer.init(lab.state.url(), run, node)
    return lab.finalise("cross_worker_race", names.CAUSE_GET_BEFORE_INIT, run, node, writer, reader, result,
                        wait_race_s=10.0)


WRONG_DB = 1


def wrong_db(lab: Lab) -> Injection:
    """A worker configured with the wrong db writes where the reader does not look."""
    writer, reader = lab.pair()
    run, node = lab.new_run(), "node-db"
    writer.init(lab.state.url(WRONG_DB), run, node)
    writer.flush()
    result = reader.get(lab.state.url(0), run, node)
    return lab.finalise("wrong_db", names.CAUSE_WRONG_ENDPOINT, run, node, writer, reader, result)


def wrong_server(lab: Lab) -> Injection:
    """A worker pointed at another Redis server."""
    writer, reader = lab.pair()
    run, node = lab.new_run(), "node-endpoint"
    writer.init(lab.other.url(), run, node)
    writer.flush()
    result = reader.get(lab.state.url(), run, node)
    return lab.finalise("wrong_server", names.CAUSE_WRONG_ENDPOINT, run, node, writer, reader, result)


def restart(lab: Lab) -> Injection:
    """Redis restarts without persistence between the init and the read."""
    writer, reader = lab.pair()
    run, node = lab.new_run(), "node-restart"
    writer.init(lab.state.url(), run, "warm-up")
    writer.flush()
    reader.get(lab.state.url(), run, "warm-up")  # a hit: the reader has a connection from before
    writer.init(lab.state.url(), run, node)
    writer.flush()
    assert isinstance(lab.state, RedisServer), "restarts need the lab's own server"
    lab.state.restart()
    if lab.keyspace_events:
        for watcher in lab.watchers:
            watcher.wait_subscribed(10)
    result = reader.get(lab.state.url(), run, node)
    injection = lab.finalise("redis_restart", names.CAUSE_SERVER_RESTART, run, node, writer, reader, result)
    wait_for(lambda: lab.replica.client().info("replication").get("master_link_status") == "up", 15)
    return injection


def replica_lag(lab: Lab) -> Injection:
    """The reader uses a replica that has not yet received the write."""
    assert lab.proxy is not None
    writer, reader = lab.pair()
    run, node = lab.new_run(), "node-replica"
    lab.proxy.hold()
    try:
        writer.init(lab.state.url(), run, node)
        writer.flush()
        result = reader.get(lab.replica.url(), run, node)
    finally:
        lab.proxy.release()
    return lab.finalise("replica_lag", names.CAUSE_REPLICA_LAG, run, node, writer, reader, result)


def key_mismatch(lab: Lab) -> Injection:
    """Writer and reader build the key differently (case, zero padding, spaces)."""
    writer, reader = lab.pair()
    run = lab.new_run()
    written, read = lab.rng.choice([("Node-7", "node-7"), ("node-07", "node-7"), ("node-7 ", "node-7")])
    writer.init(lab.state.url(), run, written)
    writer.flush()
    result = reader.get(lab.state.url(), run, read)
    return lab.finalise("key_mismatch", names.CAUSE_KEY_MISMATCH, run, read, writer, reader, result)


def never_written(lab: Lab) -> Injection:
    """The reader asks for a node the workflow never initialised."""
    writer, reader = lab.pair()
    run = lab.new_run()
    writer.init(lab.state.url(), run, "node-1")
    writer.flush()
    result = reader.get(lab.state.url(), run, "node-2")
    return lab.finalise("never_written", names.CAUSE_NEVER_WRITTEN, run, "node-2", writer, reader, result)


SCENARIOS: dict[str, Callable[[Lab], Injection]] = {
    "ttl_too_short": expired,
    "memory_pressure": evicted,
    "early_cleanup": deleted,
    "flushdb": flushed,
    "cross_worker_race": race,
    "wrong_db": wrong_db,
    "wrong_server": wrong_server,
    "redis_restart": restart,
    "replica_lag": replica_lag,
    "key_mismatch": key_mismatch,
    "never_written": never_written,
}

#: Scenarios that run on a Redis the lab did not start: no restart, flush, eviction,
#: replica or second server is needed.
EXTERNAL_SAFE = frozenset({
    "ttl_too_short", "early_cleanup", "cross_worker_race", "wrong_db", "key_mismatch", "never_written",
})

DESCRIPTIONS: dict[str, str] = {
    "ttl_too_short": "a TTL shorter than the workflow step: the state expires before it is read",
    "memory_pressure": "maxmemory with volatile-lru: filler keys push the state out",
    "early_cleanup": "a cleanup job deletes the state before the reader gets to it",
    "flushdb": "someone runs FLUSHDB on the state database",
    "cross_worker_race": "a worker reads the state before another worker's init lands",
    "wrong_db": "a worker configured with the wrong db index writes where no one reads",
    "wrong_server": "a worker pointed at another Redis server",
    "redis_restart": "Redis restarts without persistence between the write and the read",
    "replica_lag": "the reader uses a replica that has not received the write yet",
    "key_mismatch": "writer and reader build the key differently (case, padding, spaces)",
    "never_written": "the reader asks for a node the workflow never initialised",
}

