"""The lab's harness: the servers, watchers and workers the scenarios run on, and what each concluded.

A :class:`Lab` runs real redis-server processes (a state server, a second
endpoint, an evicting server, a replica behind a lag proxy, and a journal
server shared by everyone, as recommended for evicting setups) and two or more
worker processes with different host identities. A scenario
(:mod:`otel_subflow.lab.scenarios`) injects its fault with them and gets back an
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
