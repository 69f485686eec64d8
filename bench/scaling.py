"""``make bench-scaling``: what one unit of each part costs, measured on real processes (docs/scaling.md).

Each subcommand starts what it measures on loopback (redis-server, the keyspace
watcher, the collector built by ``otel_subflow.stack``), drives it at fixed rates
and prints one small table; ``--json PATH`` also writes the figures and the raw
counts. Every number of docs/scaling.md comes from one of these commands:

    PYTHONPATH=. python bench/scaling.py journal     # Redis commands, CPU and bytes per 1,000 inits/s
    PYTHONPATH=. python bench/scaling.py watcher     # key events/s one keyspace watcher turns into tombstones
    PYTHONPATH=. python bench/scaling.py analysis    # one analysed miss; the rate limit under a storm
    PYTHONPATH=. python bench/scaling.py collector   # otelcol-subflow RSS and CPU per 1,000 spans/s
    PYTHONPATH=. python bench/scaling.py all         # the four, one after the other

``--quick`` scales each one down to a few seconds (tests/test_bench_scaling.py): a
smoke run, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis
from redis.keyspace_notifications import KeyNotification

from bench.overhead import (
    _WATCHER_CHILD,
    command_delta,
    commandstats,
    decorated_get_analysed,
    decorated_init,
    get_state,
    initialize_state,
    percentile,
    setup_providers,
)
from otel_subflow import KeyspaceWatcher, SubflowConfig, flush_journals, instrument_state_get
from otel_subflow._config import get_config
from otel_subflow._journal import script, store
from otel_subflow._journal.location import journal_for
from otel_subflow._journal.writer import Journal
from otel_subflow._runtime import runtime
from otel_subflow.lab.servers import RedisServer

ROOT = Path(__file__).resolve().parent.parent
STATE_BYTES = 100
NODES_PER_RUN = 8
#: The state TTL of the decorated inits: 10 minutes (retention is then twice that).
STATE_TTL_MS = 600_000


# -- reporting ----------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One figure of a table: its JSON key, what a reader sees, its value and unit."""

    key: str
    label: str
    value: float | int | str | None
    unit: str = ""
    note: str = ""

    def shown(self) -> str:
        value = self.value
        if value is None:
            return "n/a"
        if isinstance(value, float):
            text = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
        elif isinstance(value, int):
            text = f"{value:,}"
        else:
            text = value
        return f"{text} {self.unit}".strip()


@dataclasses.dataclass
class Report:
    """What one subcommand measured: its rows (the table), any sub-tables, and raw detail."""

    name: str
    rows: list[Row]
    detail: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        return {row.key: row.value for row in self.rows}


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def render(report: Report) -> str:
    out = [f"## {report.name}", "", markdown(("figure", "measured", "how"),
                                             [(r.label, r.shown(), r.note) for r in report.rows])]
    for title, table in report.tables.items():
        if table:
            header = list(table[0])
            out += ["", f"### {title}", "", markdown(header, [[_cell(t[h]) for h in header] for t in table])]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (a shared machine: the load average says how busy it was)."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kb = next((int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:")), 0)
    try:
        import hiredis  # noqa: F401 - only whether redis-py parses with it
        has_hiredis = True
    except ImportError:
        has_hiredis = False
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                                   check=False).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "ram_gib": round(total_kb / 1024 / 1024, 1),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "python": platform.python_version(),
        "hiredis": has_hiredis,
        "redis_server": redis_version,
    }


# -- shared helpers -----------------------------------------------------------------------


def paced(rate: float, seconds: float, op: Callable[[int], object], tick_s: float = 0.005) -> tuple[int, float]:
    """Call ``op(i)`` ``rate`` times a second for ``seconds``; returns (calls made, seconds taken).

    Calls are due on a fixed schedule from the start: a late tick catches up, so a slow
    moment costs accuracy of timing, not of the rate, unless the caller cannot keep up.
    """
    started = time.perf_counter()
    done = 0
    while True:
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
        due = int(rate * elapsed) + 1
        while done < due:
            op(done)
            done += 1
        wait = (done / rate) - (time.perf_counter() - started)
        if wait > 0:
            time.sleep(min(wait, tick_s))
    return done, time.perf_counter() - started


def server_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def commandstats_usec(client: redis.Redis) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, value in client.info("commandstats").items():
        if isinstance(value, dict):
            out[name.removeprefix("cmdstat_")] = int(value["usec"])
    return out


def _proc_stat(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, RSS bytes) of a process, from /proc/<pid>/stat and status."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return ticks / os.sysconf("SC_CLK_TCK"), rss


def _journal(client: redis.Redis) -> Journal:
    journal = journal_for(client, get_config())
    if journal is None:
        raise RuntimeError("the journal is disabled (OTEL_SUBFLOW_JOURNAL=false): nothing to measure")
    return journal


def retention_s(ttl_ms: int, config: SubflowConfig) -> float:
    """How long the journal keeps records when the longest state TTL it has seen is ``ttl_ms`` (write.lua)."""
    longest = config.journal_ttl_s * 1000
    return min(longest, max(script._MIN_RETENTION_MS, 2 * ttl_ms)) / 1000.0


# -- journal ------------------------------------------------------------------------------


def _init_op(client: redis.Redis, prefix: str) -> Callable[[int], None]:
    """Decorated inits of runs of NODES_PER_RUN nodes (a workflow writes its nodes' states in turn)."""
    value = "x" * STATE_BYTES

    def op(i: int) -> None:
        decorated_init(client, f"{prefix}-{i // NODES_PER_RUN}", f"n{i % NODES_PER_RUN}", value, STATE_TTL_MS)

    return op


@dataclasses.dataclass
class LoadCost:
    """What one paced load cost: Redis commands and their time, both processes' CPU, used_memory."""

    calls: int
    seconds: float
    commands: dict[str, int]
    usec: dict[str, int]
    redis_cpu_s: float
    process_cpu_s: float
    used_memory: int


def paced_window(observer: redis.Redis, rate: float, seconds: float, op: Callable[[int], object]) -> LoadCost:
    """Run ``op`` at ``rate`` for ``seconds``, the journal flushed after; INFO read just outside the load."""
    memory_before = int(observer.info("memory")["used_memory"])
    redis_cpu_before = server_cpu_s(observer)
    cpu_before = time.process_time()
    usec_before = commandstats_usec(observer)
    before = commandstats(observer)
    calls, elapsed = paced(rate, seconds, op)
    flush_journals(30.0)
    after = commandstats(observer)
    usec_after = commandstats_usec(observer)
    cpu = time.process_time() - cpu_before
    redis_cpu = server_cpu_s(observer) - redis_cpu_before
    memory = int(observer.info("memory")["used_memory"]) - memory_before
    usec = {k: v - usec_before.get(k, 0) for k, v in usec_after.items() if v != usec_before.get(k, 0)}
    return LoadCost(calls, elapsed, command_delta(before, after), usec, redis_cpu, cpu, memory)


def bench_journal(quick: bool) -> Report:
    """Redis commands, Redis CPU and journal bytes per 1,000 decorated inits a second."""
    rate = 1000.0
    seconds = 3.0 if quick else 10.0
    config = get_config()
    value = "x" * STATE_BYTES
    with RedisServer() as server:
        client, observer = server.client(), server.client()
        warm = _init_op(client, "warm")
        for i in range(NODES_PER_RUN):
            warm(i)
        flush_journals(10.0)
        # The same SETs undecorated first: what Redis and the app spend without us, at the same rate.
        bare = paced_window(observer, rate, seconds, lambda i: initialize_state(
            client, f"bare-{i // NODES_PER_RUN}", f"n{i % NODES_PER_RUN}", value, STATE_TTL_MS))
        usage_before = store.read_usage(observer)
        run = paced_window(observer, rate, seconds, _init_op(client, "wf"))
        usage_after = store.read_usage(observer)
        stats = _journal(client).stats()
    delta = run.commands
    inits, elapsed = run.calls, run.seconds
    scripts = delta.get("evalsha", 0) + delta.get("eval", 0)
    app = delta.get("set", 0)
    inside = {k: v for k, v in delta.items() if k not in ("set", "evalsha", "eval")}
    added = sum(delta.values()) - app
    script_usec = run.usec.get("evalsha", 0) + run.usec.get("eval", 0)
    journal_bytes = (usage_after.measured_bytes or 0) - (usage_before.measured_bytes or 0)
    bytes_per_init = journal_bytes / inits
    per_s = inits / elapsed
    redis_cpu_ms = run.redis_cpu_s / elapsed * 1000
    bare_redis_cpu_ms = bare.redis_cpu_s / bare.seconds * 1000
    memory_delta = run.used_memory
    steady = _journal_steady_state(quick)
    budget_default = int(config.journal_budget_mb * 1024 * 1024)
    held = budget_default * steady["measured_to_budget"] / bytes_per_init
    ret_s = retention_s(STATE_TTL_MS, config)
    rows = [
        Row("inits_per_s", "decorated inits driven", per_s, "/s",
            f"paced for {elapsed:.0f} s, runs of {NODES_PER_RUN} nodes, {STATE_BYTES}-byte states, TTL 10 min"),
        Row("redis_commands_per_s", "Redis commands, all (INFO commandstats)", sum(delta.values()) / elapsed, "/s",
            "the app's SETs + the journal's script calls + the commands the script runs inside"),
        Row("app_commands_per_s", "  of which the app's SETs", app / elapsed, "/s", "undecorated, the same"),
        Row("evalsha_per_s", "  journal batches (EVALSHA)", scripts / elapsed, "/s",
            f"one per flush interval ({config.journal_flush_interval_s:g} s) or {config.journal_batch_size} records"),
        Row("records_per_batch", "  records per batch", inits / scripts if scripts else None, ""),
        Row("script_inner_commands_per_s", "  commands run inside the script", sum(inside.values()) / elapsed, "/s",
            ", ".join(f"{k} {v / elapsed:.0f}" for k, v in sorted(inside.items(), key=lambda kv: -kv[1])[:6])),
        Row("commands_per_init", "commands added per init", added / inits, "",
            "(script calls + inner commands) / inits"),
        Row("script_usec_per_init", "Redis time in the journal script per init", script_usec / inits, "µs",
            "commandstats usec of EVALSHA"),
        Row("redis_cpu_ms_per_s", "redis-server CPU, decorated", redis_cpu_ms, "ms/s",
            f"INFO cpu used_cpu_sys+user; undecorated SETs at the same rate: {bare_redis_cpu_ms:.1f} ms/s"),
        Row("journal_redis_cpu_ms_per_s", "  of which the journal (decorated - undecorated)",
            redis_cpu_ms - bare_redis_cpu_ms, "ms/s", "per 1,000 inits/s: % of one core = this / 10"),
        Row("client_cpu_us_per_init", "app process CPU added per init (span, metric, journal flusher)",
            (run.process_cpu_s / inits - bare.process_cpu_s / bare.calls) * 1e6, "µs",
            f"process_time, spans to a no-op exporter; undecorated {bare.process_cpu_s / bare.calls * 1e6:.0f} µs"),
        Row("journal_bytes_per_init", "journal bytes per init (MEMORY USAGE ... SAMPLES 0)", bytes_per_init, "B",
            f"state itself: {(memory_delta - journal_bytes) / inits:.0f} B (used_memory delta minus journal)"),
        Row("journal_estimate_bytes_per_init", "  the journal's own estimate (what the budget is enforced on)",
            (usage_after.estimated_bytes - usage_before.estimated_bytes) / inits, "B"),
        Row("journal_mb_per_hour_at_1000", "journal growth at 1,000 inits/s before any trimming",
            bytes_per_init * 1000 * 3600 / 1e6, "MB/h", "bytes per init x 3.6 M inits"),
        Row("steady_budget_bytes", "steady state, budget (2 % of maxmemory)", steady["budget_bytes"], "B",
            f"a server with maxmemory {steady['maxmemory']}; filled at full speed"),
        Row("steady_measured_bytes", "  journal bytes measured there, max over samples",
            steady["measured_max_bytes"], "B", f"min {steady['measured_min_bytes']:,} B, "
            f"{steady['buckets']} buckets, {steady['trimmed']} trimmed"),
        Row("steady_measured_to_budget", "  measured / budget", steady["measured_to_budget"], ""),
        Row("default_budget_bytes", "default budget when maxmemory is 0", budget_default, "B",
            "OTEL_SUBFLOW_JOURNAL_BUDGET_MB=16"),
        Row("default_steady_bytes", "  journal bytes at steady state under it (measured ratio)",
            int(budget_default * steady["measured_to_budget"]), "B"),
        Row("history_s_at_1000", "  history it holds at 1,000 inits/s", held / 1000.0, "s",
            f"retention by TTL would be {ret_s:.0f} s: the budget binds first"),
        Row("retention_s", "retention for 10-minute state TTLs", ret_s, "s", "twice the longest TTL, >= 10 min"),
    ]
    detail = {"commands": delta, "inits": inits, "seconds": round(elapsed, 2), "undecorated": dataclasses.asdict(bare),
              "journal_stats": dataclasses.asdict(stats), "usage_after": usage_after.as_dict(), "steady_state": steady}
    return Report("journal", rows, detail)


def _journal_steady_state(quick: bool) -> dict[str, Any]:
    """Fill a journal past its budget at full speed; sample MEMORY USAGE while the script trims."""
    maxmemory = "64mb" if quick else "256mb"
    runtime.reset()  # a journal writer of its own for the new server
    with RedisServer(maxmemory=maxmemory) as server:
        client, observer = server.client(), server.client()
        op = _init_op(client, "fill")
        journal = _journal(client)
        i = 0
        samples: list[int] = []
        deadline = time.monotonic() + (15.0 if quick else 40.0)
        while time.monotonic() < deadline:
            for _ in range(2000):
                op(i)
                i += 1
            stats = journal.stats()
            if stats.buckets_trimmed >= 2:
                flush_journals(10.0)
                usage = store.read_usage(observer)
                if usage.measured_bytes is not None:
                    samples.append(usage.measured_bytes)
                if len(samples) >= 6:
                    break
        flush_journals(10.0)
        stats = journal.stats()
    runtime.reset()
    if not samples:
        raise RuntimeError(f"the journal never trimmed in time ({i} inits, {stats})")
    return {
        "maxmemory": maxmemory, "inits": i, "budget_bytes": stats.budget_bytes,
        "measured_max_bytes": max(samples), "measured_min_bytes": min(samples),
        "measured_to_budget": round(max(samples) / stats.budget_bytes, 3),
        "estimated_bytes": stats.bytes_used, "buckets": stats.buckets, "trimmed": stats.buckets_trimmed,
        "dropped": stats.dropped,
    }


# -- watcher ------------------------------------------------------------------------------

#: One tick of generated key events, run inside Redis so the generator costs the client almost
#: nothing: ``n`` state keys written and deleted (``del`` events) or written with a 1 ms TTL
#: (``expired`` events, published when Redis's expiry cycle removes them).
_GENERATE = """
local n, prefix, first, px = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
for i = first, first + n - 1 do
  local key = prefix .. math.floor(i / 8) .. ':n' .. (i % 8)
  if px == '' then
    redis.call('SET', key, 'v')
    redis.call('DEL', key)
  else
    redis.call('SET', key, 'v', 'PX', px)
  end
end
return n
"""


def generate_events(url: str, conn: Connection) -> None:
    """Child process: for each ``(rate, seconds, event, prefix)`` received, that many key events a
    second in 5 ms ticks; sends back ``(events, seconds)``. ``None`` ends it."""
    client = redis.Redis.from_url(url)
    generate = client.register_script(_GENERATE)
    tick = 0.005
    while True:
        job = conn.recv()
        if job is None:
            break
        rate, seconds, event, prefix = job
        px = "" if event == "del" else "1"
        sent = 0
        started = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
            due = int(rate * min(seconds, elapsed + tick))
            if due > sent:
                generate(args=[due - sent, prefix, sent, px])
                sent = due
            wait = tick - (time.perf_counter() - started - elapsed)
            if wait > 0:
                time.sleep(wait)
        conn.send((sent, time.perf_counter() - started))
    client.close()


class TimedWatcher(KeyspaceWatcher):
    """The package's watcher, noting when it handled each probe key (our lag samples)."""

    probe_prefix = "subflow:state:probe-"

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.handled_at: dict[str, float] = {}

    def handle(self, notification: KeyNotification) -> None:
        super().handle(notification)
        key = notification.key
        if key.startswith(self.probe_prefix):
            self.handled_at[key] = time.perf_counter()


def _watcher_omem(client: redis.Redis) -> int:
    """Bytes queued in Redis for the pattern subscriber (its output buffer): the backlog not yet read."""
    largest = 0
    for entry in client.client_list(_type="pubsub"):
        largest = max(largest, int(entry.get("omem", 0)))
    return largest


def _watcher_step(generator: Connection, watcher: TimedWatcher, observer: redis.Redis, rate: float,
                  seconds: float, event: str, step: int, drain_s: float) -> dict[str, Any]:
    """One rate: offer it for ``seconds``, probe the lag meanwhile, then wait for the backlog to clear."""
    journal = watcher.journal
    assert journal is not None
    counts_before = store.read_counts(observer)
    stats = dataclasses.replace(watcher.stats)
    redis_cpu_before = server_cpu_s(observer)
    usec_before = commandstats_usec(observer)
    scripts_before = commandstats(observer)
    dropped_before = journal.stats().dropped
    cpu_before = time.process_time()
    generator.send((rate, seconds, event, f"subflow:state:gen{step}-"))
    # Probes: a state key deleted every 50 ms from here; its lag runs from just before the DEL to
    # the watcher's handling of its event, behind whatever backlog the load built up.
    sent_at: dict[str, float] = {}
    omem_max = 0
    while not generator.poll(0.05):
        key = f"{TimedWatcher.probe_prefix}{step}:n{len(sent_at)}"
        observer.set(key, "v")
        sent_at[key] = time.perf_counter()
        observer.delete(key)
        omem_max = max(omem_max, _watcher_omem(observer))
    generated, gen_seconds = generator.recv()
    step_end = time.perf_counter()
    cpu_at_end = time.process_time()
    redis_cpu = server_cpu_s(observer) - redis_cpu_before
    scripts = command_delta(scripts_before, commandstats(observer))
    usec = commandstats_usec(observer)
    script_usec = sum(usec.get(k, 0) - usec_before.get(k, 0) for k in ("evalsha", "eval"))
    expected = generated + len(sent_at)
    handled_at_end = watcher.stats.events - stats.events
    # The backlog when the load stopped, and how long it took to clear (waited for in full, so
    # that the next step starts clean; the journal's own trims add a few ignored events).
    progress, progress_at = -1, step_end
    while watcher.stats.events - stats.events < expected and time.perf_counter() - step_end < drain_s:
        handled = watcher.stats.events
        if handled != progress:
            progress, progress_at = handled, time.perf_counter()
        elif time.perf_counter() - progress_at > 1.0:
            break  # nothing more is coming: the rest was lost on the way
        time.sleep(0.01)
    drained_s = time.perf_counter() - step_end
    flush_journals(30.0)
    counts = store.read_counts(observer)
    # The step's events and the probes' (del) events; a gap record says the watcher lost its subscription.
    journalled = sum(counts.get(op, 0) - counts_before.get(op, 0) for op in {event, "del"})
    gaps = counts.get("watcher_gap", 0) - counts_before.get("watcher_gap", 0)
    lags = [(watcher.handled_at[k] - t) * 1000 for k, t in sent_at.items() if k in watcher.handled_at]
    return {
        "event": event, "offered_per_s": int(rate), "generated_per_s": round(generated / gen_seconds),
        "handled_per_s": round(min(handled_at_end, expected) / gen_seconds),
        "backlog_at_end": max(0, expected - handled_at_end), "drain_s": round(drained_s, 2),
        "lag_p50_ms": round(statistics.median(lags), 2) if lags else None,
        "lag_p99_ms": round(percentile(lags, 99), 2) if lags else None,
        "omem_max_kb": round(omem_max / 1024),
        "tombstones": journalled, "lost": max(0, expected - journalled),
        "journal_dropped": journal.stats().dropped - dropped_before,
        "reconnects": watcher.stats.reconnects - stats.reconnects, "gaps_journalled": gaps,
        "cpu_cores": round((cpu_at_end - cpu_before) / gen_seconds, 3),
        "journal_scripts_per_s": round((scripts.get("evalsha", 0) + scripts.get("eval", 0)) / gen_seconds),
        "redis_cpu_cores": round(redis_cpu / gen_seconds, 3),
        "journal_script_ms_per_s": round(script_usec / gen_seconds / 1000, 1),
    }


#: The tombstone is meant to be readable within ~20 ms of the event (the analysis waits that long once).
LAG_TARGET_MS = 20.0


def _script_call_usec(journal: Journal, observer: redis.Redis, calls: int, tag: str) -> float:
    """Redis time of one write-script call carrying one tombstone (commandstats usec / calls)."""
    usec_before = commandstats_usec(observer)
    before = commandstats(observer)
    for i in range(calls):
        journal.record_tombstone("del", f"cost-{tag}-{i}", "n", f"subflow:state:cost-{tag}-{i}:n", db=0)
        journal.flush(5.0)
    delta = command_delta(before, commandstats(observer))
    usec = commandstats_usec(observer)
    made = delta.get("evalsha", 0) + delta.get("eval", 0)
    return sum(usec.get(k, 0) - usec_before.get(k, 0) for k in ("evalsha", "eval")) / max(1, made)


def _marginal_cpu(low: dict[str, Any], high: dict[str, Any] | None) -> float | None:
    """CPU per 1,000 events/s between two steps (what the probes and the loop cost at any rate cancels out)."""
    if high is None or high["generated_per_s"] <= low["generated_per_s"]:
        return None
    slope = (high["cpu_cores"] - low["cpu_cores"]) * 1000 / (high["generated_per_s"] - low["generated_per_s"])
    return round(float(slope), 3)


def bench_watcher(quick: bool) -> Report:
    """Key events a second one keyspace watcher turns into tombstones, and what happens above that."""
    seconds = 1.0 if quick else 4.0
    drain_s = 10.0 if quick else 30.0
    rates = (500.0, 2000.0) if quick else (1000.0, 2500.0, 5000.0, 10000.0, 20000.0, 40000.0)
    expired = () if quick else (2500.0, 10000.0)
    runtime.reset()
    steps: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    with RedisServer() as server:
        observer = server.client()
        generator, child = ctx.Pipe()
        proc = ctx.Process(target=generate_events, args=(server.url(), child), daemon=True)
        proc.start()
        child.close()
        watcher = TimedWatcher(server.client())
        watcher.start()
        try:
            if not watcher.wait_subscribed(10):
                raise RuntimeError(f"the watcher did not subscribe: {watcher.status.describe()}")
            journal = watcher.journal
            assert journal is not None
            call_usec_fresh = _script_call_usec(journal, observer, 50, "fresh")
            for rate in rates:
                steps.append(_watcher_step(generator, watcher, observer, rate, seconds, "del", len(steps), drain_s))
                if steps[-1]["handled_per_s"] < 0.8 * steps[-1]["generated_per_s"]:
                    break  # saturated: higher rates only build a longer backlog
            for rate in expired:
                steps.append(_watcher_step(generator, watcher, observer, rate, seconds, "expired", len(steps),
                                           drain_s))
            if not quick:
                # Above the ceiling the backlog waits in Redis's output buffer for the subscriber; past
                # client-output-buffer-limit pubsub (default 32mb hard, 8mb for 60 s) Redis disconnects it.
                # A small limit shows what follows in seconds instead of a minute.
                observer.config_set("client-output-buffer-limit", "pubsub 1mb 512kb 1")
                steps.append(_watcher_step(generator, watcher, observer, rates[-1], seconds, "del", len(steps),
                                           drain_s) | {"event": "del, pubsub limit 1mb"})
            # The bucket's capped copy of every run's records (the global field, 64 kB) is now full.
            call_usec_full = _script_call_usec(journal, observer, 50, "full")
        finally:
            generator.send(None)
            proc.join(10)
            watcher.stop()
    runtime.reset()
    dels = [s for s in steps if s["event"] == "del"]
    kept = [s for s in dels if s["lost"] == 0 and s["lag_p99_ms"] is not None and s["lag_p99_ms"] <= LAG_TARGET_MS]
    sustained = max(kept, key=lambda s: s["generated_per_s"]) if kept else None
    top = max(dels, key=lambda s: s["handled_per_s"])
    low = steps[0]
    normal = [s for s in steps if "limit" not in s["event"]]
    overload = next((s for s in steps if "limit" in s["event"]), None)
    rows = [
        Row("sustained_events_per_s", f"highest del rate kept up with (nothing lost, lag p99 <= {LAG_TARGET_MS} ms)",
            sustained["generated_per_s"] if sustained else None, "/s",
            f"steps of {seconds:g} s; the generator runs inside Redis (one EVAL per 5 ms)"),
        Row("max_handled_per_s", "most events handled per second in any step", top["handled_per_s"], "/s",
            f"with {top['generated_per_s']:,}/s offered"),
        Row("lag_p50_ms_low", f"lag DEL -> watcher at {low['generated_per_s']:,}/s, p50", low["lag_p50_ms"], "ms",
            "probe keys deleted every 50 ms during the step"),
        Row("lag_p99_ms_low", "  p99", low["lag_p99_ms"], "ms"),
        Row("cpu_cores_per_1000", "watcher process CPU per 1,000 events/s (watcher thread + journal flusher)",
            _marginal_cpu(low, sustained), "cores",
            f"slope between {low['generated_per_s']:,}/s and the highest step kept up with"),
        Row("journal_scripts_per_s_low", "journal script calls per second at the lowest step",
            low["journal_scripts_per_s"], "/s", "tombstones are flushed within ~3 ms, not every 200 ms"),
        Row("journal_script_ms_per_s_low", "  Redis time in those script calls", low["journal_script_ms_per_s"],
            "ms/s", "commandstats usec of EVALSHA"),
        Row("script_usec_per_call_fresh", "  Redis time of one script call, fresh bucket", call_usec_fresh, "µs",
            "one tombstone per call, 50 calls"),
        Row("script_usec_per_call_full", "  the same once the bucket's 64 kB global copy is full", call_usec_full,
            "µs", "the copy is read, extended, cut and written back by every call"),
        Row("redis_cpu_cores_low", "redis-server CPU at the lowest step", low["redis_cpu_cores"], "cores",
            "the generator's SET+DEL and the events' publishing included"),
        Row("lost_normal", "events not journalled, every step with the default buffer limit",
            sum(s["lost"] for s in normal), "", "the journal's per-op counters vs events generated (+ probes)"),
        Row("overload_lost", "events lost at the top rate with a 1 MB pubsub buffer limit",
            overload["lost"] if overload else None, "", "Redis disconnects the watcher; it resubscribes"),
        Row("overload_gaps", "  watcher_gap records journalled meanwhile", overload["gaps_journalled"] if overload
            else None, "", f"reconnects: {overload['reconnects'] if overload else 'n/a'}"),
    ]
    return Report("watcher", rows, {"steps": steps, "seconds_per_step": seconds}, {"steps": steps})


# -- analysis -----------------------------------------------------------------------------


class PipelineLog:
    """The pipelines this thread sends (the analysis runs in the caller's thread): round trips and commands."""

    def __init__(self) -> None:
        self.round_trips = 0
        self.commands: dict[str, int] = {}

    @classmethod
    @contextlib.contextmanager
    def patched(cls) -> Iterator[PipelineLog]:
        log = cls()
        original = redis.client.Pipeline.execute
        caller = threading.current_thread()

        def execute(pipe: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is caller:
                log.round_trips += 1
                for command_args, _options in pipe.command_stack:
                    name = str(command_args[0]).lower()
                    log.commands[name] = log.commands.get(name, 0) + 1
            return original(pipe, *args, **kwargs)

        redis.client.Pipeline.execute = execute  # type: ignore[method-assign,assignment]
        try:
            yield log
        finally:
            redis.client.Pipeline.execute = original  # type: ignore[method-assign]


def _misses(client: redis.Redis, calls: int, target: Callable[[int], tuple[str, str]],
            before_each: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Alternate an undecorated miss and an analysed one of the same key; their latencies, the analysis's pipelines."""
    bare: list[float] = []
    analysed: list[float] = []
    with PipelineLog.patched() as log:
        for i in range(calls):
            run, node = target(i)
            if before_each is not None:
                before_each(i)
            started = time.perf_counter()
            get_state(client, run, node)
            bare.append(time.perf_counter() - started)
            trips = log.round_trips
            started = time.perf_counter()
            decorated_get_analysed(client, run, node)
            analysed.append(time.perf_counter() - started)
            if log.round_trips == trips:
                raise RuntimeError("a miss was not analysed")
            if i % 100 == 99:
                flush_journals(10.0)
    flush_journals(10.0)
    return {
        "calls": calls, "round_trips_per_miss": log.round_trips / calls,
        "commands_per_miss": {k: v / calls for k, v in sorted(log.commands.items())},
        "p50_ms": percentile(analysed, 50) * 1e3, "p99_ms": percentile(analysed, 99) * 1e3,
        "bare_p50_ms": percentile(bare, 50) * 1e3,
    }


def bench_analysis(quick: bool) -> Report:
    """One analysed miss (round trips, commands, Redis time, latency) and the rate limit above it."""
    calls = 200 if quick else 2000
    fresh_calls = 20 if quick else 200
    storm = 1000 if quick else 10_000
    paced_s = 1.0 if quick else 5.0
    runtime.reset()
    with RedisServer() as server:
        client, observer = server.client(), server.client()
        runs = [f"an-{n}" for n in range(max(1, calls // 4))]
        init = _init_op(client, "an")
        for i in range(len(runs) * NODES_PER_RUN):
            init(i)
        flush_journals(30.0)
        decorated_get_analysed(client, runs[0], "warm")  # the pool's ids, the bucket list, the writer: once
        flush_journals(10.0)
        usec_before = commandstats_usec(observer)
        before = commandstats(observer)
        typical = _misses(client, calls, lambda i: (runs[i % len(runs)], f"missing-{i}"))
        delta = command_delta(before, commandstats(observer))
        usec_after = commandstats_usec(observer)
        redis_usec = sum(usec_after.get(k, 0) - usec_before.get(k, 0) for k in usec_after)
        analysis_commands = sum(typical["commands_per_miss"].values())
        redis_per_miss = (sum(delta.values()) - 2 * calls) / calls  # less the app's two GETs (bare + decorated)
        # A state deleted just before the read, a watcher live in another process: the analysis finds no
        # tombstone yet, sees the heartbeat, waits once (20 ms) and reads the journal again.
        child = subprocess.Popen([sys.executable, "-c", _WATCHER_CHILD, server.url()], stdout=subprocess.PIPE,
                                 text=True)
        try:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("the watcher child did not subscribe")

            def delete_first(i: int) -> None:
                decorated_init(client, f"gone-{i}", "n", "v", STATE_TTL_MS)
                flush_journals(5.0)
                client.delete(f"subflow:state:gone-{i}:n")

            fresh = _misses(client, fresh_calls, lambda i: (f"gone-{i}", "n"), delete_first)
        finally:
            child.kill()
            child.wait(10)
        limited = _rate_limit(client, observer, storm, paced_s)
    runtime.reset()
    default = SubflowConfig()
    rows = [
        Row("round_trips_per_miss", "round trips per analysed miss (journal in db 0 of the same server)",
            typical["round_trips_per_miss"], "", "redis-py pipelines sent by the caller's thread"),
        Row("analysis_commands_per_miss", "commands the analysis sends per miss", analysis_commands, "",
            ", ".join(f"{k} {v:g}" for k, v in typical["commands_per_miss"].items())),
        Row("redis_commands_per_miss", "Redis commands per analysed miss, all (commandstats)", redis_per_miss, "",
            "the analysis + the journal's write of its miss record (script calls and inner commands)"),
        Row("redis_usec_per_miss", "Redis time per analysed miss (commandstats usec)",
            redis_usec / calls, "µs", "all commands, the app's two GETs included"),
        Row("miss_p50_ms", "analysed miss, p50", typical["p50_ms"], "ms",
            f"undecorated miss p50 {typical['bare_p50_ms']:.3f} ms; run with {NODES_PER_RUN} journalled inits"),
        Row("miss_p99_ms", "analysed miss, p99", typical["p99_ms"], "ms"),
        Row("fresh_round_trips_per_miss", "state deleted just before the read, watcher live: round trips",
            fresh["round_trips_per_miss"], "", "the tombstone wait: one more read after 20 ms when needed"),
        Row("fresh_p50_ms", "  p50", fresh["p50_ms"], "ms"),
        Row("fresh_p99_ms", "  p99", fresh["p99_ms"], "ms"),
        Row("rate_limit", "rate limit per process (default)", f"{default.analysis_rate_per_s:g}/s, burst "
            f"{default.analysis_burst}", "", "OTEL_SUBFLOW_ANALYSIS_RATE / OTEL_SUBFLOW_ANALYSIS_BURST"),
        Row("storm_misses", "storm: misses as fast as the caller can", limited["storm_misses"], "",
            f"in {limited['storm_seconds']:.2f} s"),
        Row("storm_analysed", "  analysed (PTTLs in commandstats)", limited["storm_analysed"], "",
            f"ceiling burst + rate x time = {limited['storm_ceiling']:.0f}"),
        Row("storm_suppressed", "  suppressed (the token bucket's denials)", limited["storm_suppressed"], ""),
        Row("storm_suppressed_journalled", "  suppressed, as counted in the journal (misses_suppressed)",
            limited["storm_suppressed_journal"], "", "one record per flush carries the count"),
        Row("storm_redis_commands_per_miss", "  Redis commands added per miss in the storm",
            limited["storm_commands_added_per_miss"], "", "all commands less the app's GETs, / misses"),
        Row("suppressed_added_us", "a suppressed miss: p50 added to the undecorated miss",
            limited["suppressed_added_us"], "µs", "span, event, metric; no Redis command"),
        Row("paced_analysed_per_s", f"{limited['paced_rate']:.0f} misses/s for {paced_s:g} s after the storm: "
            "analysed per second", limited["paced_analysed_per_s"], "/s", "the bucket refills at the rate"),
    ]
    detail = {"typical": typical, "fresh_deleted": fresh, "commands": delta, "rate_limit": limited}
    return Report("analysis", rows, detail)


def _rate_limit(client: redis.Redis, observer: redis.Redis, storm: int, paced_s: float) -> dict[str, Any]:
    """A failure storm, then a steady excess, under the default rate limit."""
    default_get = instrument_state_get(config=SubflowConfig())(get_state)
    default_get(client, "storm-warm", "n")
    flush_journals(10.0)
    journal = _journal(client)
    bucket = runtime.rate_limit
    assert bucket is not None
    denied_before = bucket.denied
    server_before = store.read_counts(observer).get("misses_suppressed", 0)
    stats_before = journal.stats().misses_suppressed
    before = commandstats(observer)
    started = time.perf_counter()
    for i in range(storm):
        default_get(client, "storm", f"m{i}")
    seconds = time.perf_counter() - started
    suppressed = bucket.denied - denied_before
    flush_journals(10.0)
    delta = command_delta(before, commandstats(observer))
    analysed = delta.get("pttl", 0)
    suppressed_server = store.read_counts(observer).get("misses_suppressed", 0) - server_before
    suppressed_stats = journal.stats().misses_suppressed - stats_before
    default = SubflowConfig()
    # A steady excess: the bucket is empty after the storm and refills at the rate.
    paced_rate = 100.0
    bare: list[float] = []
    decorated: list[float] = []
    pttl_before = commandstats(observer).get("pttl", 0)

    def miss(i: int) -> None:
        started = time.perf_counter()
        get_state(client, "paced", f"b{i}")
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        default_get(client, "paced", f"m{i}")
        decorated.append(time.perf_counter() - started)

    _done, paced_seconds = paced(paced_rate, paced_s, miss)
    paced_analysed = commandstats(observer).get("pttl", 0) - pttl_before
    flush_journals(10.0)
    return {
        "storm_misses": storm, "storm_seconds": round(seconds, 3), "storm_analysed": analysed,
        "storm_ceiling": default.analysis_burst + default.analysis_rate_per_s * seconds + 1,
        "storm_suppressed": suppressed,
        "storm_suppressed_stats": suppressed_stats,
        "storm_suppressed_journal": suppressed_server,
        "storm_commands": delta,
        "storm_commands_added_per_miss": round((sum(delta.values()) - storm) / storm, 4),
        "paced_rate": paced_rate, "paced_analysed_per_s": round(paced_analysed / paced_seconds, 2),
        "suppressed_added_us": round((percentile(decorated, 50) - percentile(bare, 50)) * 1e6, 1),
    }


# -- collector ----------------------------------------------------------------------------

SPANS_PER_TRACE = 4
#: One trace in this many holds a missing-state verdict (kept by tail sampling, as errors are).
MISS_EVERY = 100


def emit_trace(tracer: Any, n: int) -> None:
    """One request of an instrumented service: a server span, a state read (with its Redis span), an init."""
    from opentelemetry.trace import SpanKind, Status, StatusCode

    from otel_subflow import names

    run, node = f"run-{n // 8:08d}", f"node-{n % 8}"
    key = f"subflow:state:{run}:{node}"
    conn = {names.ATTR_DB_SYSTEM_NAME: "redis", names.ATTR_DB_NAMESPACE: "0",
            names.ATTR_SERVER_ADDRESS: "10.0.3.17", names.ATTR_SERVER_PORT: 6379,
            names.ATTR_REDIS_CLIENT_ID: 4711, names.ATTR_REDIS_SERVER_RUN_ID: "8c2f0b7e4a9d41c6b3e5f7a8d9c0b1e2f3a4"}
    ids = {names.ATTR_RUN_ID: run, names.ATTR_NODE_ID: node}
    with tracer.start_as_current_span("POST /workflows/{id}/step", kind=SpanKind.SERVER,
                                      attributes={"http.request.method": "POST", "http.route": "/workflows/{id}/step",
                                                  "http.response.status_code": 200, **ids}):
        missing = n % MISS_EVERY == 0
        with tracer.start_as_current_span(names.SPAN_STATE_GET, kind=SpanKind.INTERNAL,
                                          attributes={**ids, names.ATTR_STATE_KEY: key, **conn}) as get:
            with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT,
                                              attributes={"db.system.name": "redis", "db.operation.name": "GET",
                                                          "server.address": "10.0.3.17", "server.port": 6379, **ids}):
                pass
            if missing:
                get.add_event(names.EVENT_STATE_MISSING, {
                    names.ATTR_MISSING_CAUSE: names.CAUSE_EXPIRED, names.ATTR_MISSING_CONFIDENCE: "definitive",
                    names.ATTR_MISSING_SUMMARY: "the state expired 1.2 s before the read (TTL 600000 ms)"})
                get.set_status(Status(StatusCode.ERROR, "state missing: expired"))
            get.set_attribute(names.ATTR_STATE_OUTCOME, names.OUTCOME_MISS if missing else names.OUTCOME_HIT)
        with tracer.start_as_current_span(names.SPAN_STATE_INIT, kind=SpanKind.INTERNAL,
                                          attributes={**ids, names.ATTR_STATE_KEY: key, **conn,
                                                      names.ATTR_STATE_TTL_MS: 600_000}) as init:
            init.set_attribute(names.ATTR_STATE_OUTCOME, names.OUTCOME_CREATED)


def _tracer_provider(exporter: Any, batch: bool) -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({
        "service.name": "scaling-bench", "service.instance.id": "bench-1", "host.name": "app-host-17"}))
    processor = (BatchSpanProcessor(exporter, max_queue_size=200_000, max_export_batch_size=512,
                                    schedule_delay_millis=200) if batch else SimpleSpanProcessor(exporter))
    provider.add_span_processor(processor)
    return provider


def generate_spans(endpoint: str, conn: Connection) -> None:
    """Child process: an OTLP/gRPC exporter; for each ``(spans/s, seconds)`` received, that load; ``None`` ends."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = _tracer_provider(OTLPSpanExporter(endpoint=endpoint, insecure=True), batch=True)
    tracer = provider.get_tracer("scaling-bench")
    n = 0
    while True:
        job = conn.recv()
        if job is None:
            break
        rate, seconds = job

        def one(_i: int) -> None:
            nonlocal n
            emit_trace(tracer, n)
            n += 1

        traces, elapsed = paced(rate / SPANS_PER_TRACE, seconds, one)
        provider.force_flush(30_000)
        conn.send((traces * SPANS_PER_TRACE, elapsed))
    provider.shutdown()


def otlp_bytes_per_span() -> float:
    """Protobuf size of our spans as the OTLP exporter sends them (uncompressed), per span."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = _tracer_provider(exporter, batch=False)
    tracer = provider.get_tracer("scaling-bench")
    for n in range(512 // SPANS_PER_TRACE):
        emit_trace(tracer, n)
    spans = exporter.get_finished_spans()
    size = int(encode_spans(spans).ByteSize())
    provider.shutdown()
    return size / len(spans)


def _scrape(url: str) -> dict[str, float]:
    """A Prometheus text page: each series (``name{labels}``) and its value."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                out[series] = float(value)
    return out


def _total(page: dict[str, float], name: str, having: str = "") -> float:
    """The sum of a metric's series (with or without the ``_total`` suffix), those holding ``having`` only."""
    return sum(value for series, value in page.items()
               if series.split("{")[0] in (name, name + "_total") and having in series)


@contextlib.contextmanager
def per_host_agent(otelcol: Path, config_dir: Path, gateway: str, workdir: Path) -> Iterator[tuple[int, str]]:
    """``collector/agent.yaml`` as a local process routing to ``gateway``: (its pid, its OTLP/gRPC endpoint)."""
    from otel_subflow.lab.process import free_port
    from otel_subflow.stack._common import LOOPBACK, http_ok

    grpc, health = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | {
        "OTEL_SUBFLOW_GATEWAYS": f"[{gateway}]",
        "OTEL_SUBFLOW_LISTEN_HOST": LOOPBACK,
        "OTEL_SUBFLOW_OTLP_GRPC_PORT": str(grpc),
        "OTEL_SUBFLOW_OTLP_HTTP_PORT": str(free_port()),
        "OTEL_SUBFLOW_HEALTH_PORT": str(health),
        "OTEL_SUBFLOW_TELEMETRY_PORT": str(free_port()),
    }
    log_path = workdir / "agent.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([str(otelcol), "--config", str(config_dir / "agent.yaml")], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30.0
        while not http_ok(f"http://{LOOPBACK}:{health}/"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield proc.pid, f"http://{LOOPBACK}:{grpc}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def bench_collector(quick: bool) -> Report:
    """otelcol-subflow with the bundled otelcol.yaml as a local process: RSS and CPU per 1,000 spans/s."""
    from otel_subflow.stack import LocalStack, StackPorts

    seconds = 3.0 if quick else 12.0
    rates = (500.0,) if quick else (2000.0, 4000.0, 8000.0)
    decision_wait = "1s" if quick else "10s"  # the bundled default is 10s
    ctx = multiprocessing.get_context("spawn")
    per_span = otlp_bytes_per_span()
    steps: list[dict[str, Any]] = []
    with RedisServer() as server:
        stack = LocalStack(ports=StackPorts.free(), components=("jaeger", "collector"),
                           redis_endpoint=f"{server.host}:{server.port}", decision_wait=decision_wait)
        # Two tiers, as on a fleet: the app's SDK -> the per-host agent (collector/agent.yaml, routing
        # by trace id) -> the gateway (collector/otelcol.yaml: tail sampling, span metrics) -> Jaeger.
        with stack, per_host_agent(stack.binaries.otelcol, stack.config_dir,
                                   f"127.0.0.1:{stack.ports.otlp_grpc}", stack.workdir) as (agent_pid, agent_url):
            telemetry = f"http://127.0.0.1:{stack.ports.collector_telemetry}/metrics"
            pids = {name: stack.pid(name) for name in ("collector", "jaeger")} | {"agent": agent_pid}
            if None in pids.values():
                raise RuntimeError(f"the stack is not running: {pids}")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=generate_spans, args=(agent_url, child), daemon=True)
            proc.start()
            child.close()
            try:
                time.sleep(1.0 if quick else 3.0)  # settle after start-up
                steps.append(_collector_step(parent, pids, telemetry, 0.0, 2.0 if quick else 5.0))
                for rate in rates:
                    steps.append(_collector_step(parent, pids, telemetry, rate, seconds))
            finally:
                parent.send(None)
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
    idle = steps[0]
    loaded = steps[1:]
    cpu_per_1000 = statistics.median(s["collector_cpu_cores"] / (s["accepted_per_s"] / 1000)
                                     for s in loaded if s["accepted_per_s"])
    agent_per_1000 = statistics.median(s["agent_cpu_cores"] / (s["accepted_per_s"] / 1000)
                                       for s in loaded if s["accepted_per_s"])
    top = loaded[-1]
    rss_growth = (top["collector_rss_mb"] - idle["collector_rss_mb"])
    held = top["traces_held"] * SPANS_PER_TRACE
    heap_growth = top["heap_mb"] - idle["heap_mb"]
    rows = [
        Row("collector_idle_rss_mb", "gateway collector (otelcol.yaml) RSS, idle (redis receiver on)",
            idle["collector_rss_mb"], "MB",
            "/proc/<pid>/status VmRSS"),
        Row("collector_cpu_cores_per_1000", "gateway collector CPU per 1,000 spans/s", cpu_per_1000, "cores",
            "median over the steps; /proc/<pid>/stat utime+stime"),
        Row("collector_rss_mb_top", f"collector RSS at {top['accepted_per_s']:,.0f} spans/s", top["collector_rss_mb"],
            "MB", f"after {seconds:g} s (decision_wait {decision_wait})"),
        Row("collector_rss_mb_per_1000", "  RSS growth per 1,000 spans/s",
            rss_growth / (top["accepted_per_s"] / 1000) if top["accepted_per_s"] else None, "MB"),
        Row("held_bytes_per_span", "  RSS growth per span held by tail_sampling",
            rss_growth * 1e6 / held if held else None, "B", f"spans held: {held:,.0f} "
            f"({top['traces_held']:,} traces on memory x {SPANS_PER_TRACE})"),
        Row("heap_bytes_per_span", "  Go heap in use per span held", heap_growth * 1e6 / held if held else None, "B",
            "otelcol_process_runtime_heap_alloc_bytes, idle subtracted"),
        Row("sampled_share", "traces kept by tail_sampling", top["sampled_share"], "",
            f"errors + missing-state traces (1 in {MISS_EVERY}) + 10 % of the rest"),
        Row("dropped_too_early", "traces dropped before their decision (num_traces full)",
            sum(s["dropped_too_early"] for s in loaded), ""),
        Row("otlp_bytes_per_span", "OTLP protobuf bytes per span (uncompressed)", per_span, "B",
            f"{SPANS_PER_TRACE}-span traces shaped like an instrumented service's"),
        Row("agent_cpu_cores_per_1000", "per-host agent (agent.yaml) CPU per 1,000 spans/s", agent_per_1000, "cores",
            "load_balancing by trace id to one gateway; median over the steps"),
        Row("agent_rss_mb_idle", "  agent RSS, idle", idle["agent_rss_mb"], "MB"),
        Row("agent_rss_mb_top", f"  agent RSS at {top['accepted_per_s']:,.0f} spans/s", top["agent_rss_mb"], "MB"),
        Row("jaeger_rss_mb_top", "Jaeger (memory store) RSS at the top step", top["jaeger_rss_mb"], "MB",
            "grows with stored traces up to JAEGER_MAX_TRACES"),
        Row("jaeger_cpu_cores_top", "Jaeger CPU at the top step", top["jaeger_cpu_cores"], "cores"),
    ]
    return Report("collector", rows, {"steps": steps, "decision_wait": decision_wait}, {"steps": steps})


def _collector_step(generator: Connection, pids: dict[str, int | None], telemetry: str, rate: float,
                    seconds: float) -> dict[str, Any]:
    """One load: CPU over the step (from the first span sent to the last one flushed, plus 0.3 s for the
    collector to process it), RSS at its end and its peak; spans counted by the collector itself."""
    before = {name: _proc_stat(pid) for name, pid in pids.items() if pid is not None}
    page = _scrape(telemetry)
    started = time.perf_counter()
    rss_peak = 0
    collector = pids["collector"] or 0
    sent = 0
    if rate:
        generator.send((rate, seconds))
        while not generator.poll(0.25):
            rss_peak = max(rss_peak, _proc_stat(collector)[1])
        sent = generator.recv()[0]
    else:
        while time.perf_counter() - started < seconds:
            rss_peak = max(rss_peak, _proc_stat(collector)[1])
            time.sleep(0.25)
    time.sleep(0.3)
    elapsed = time.perf_counter() - started
    after = {name: _proc_stat(pid) for name, pid in pids.items() if pid is not None}
    page_after = _scrape(telemetry)

    def counted(name: str, having: str = "") -> float:
        return _total(page_after, name, having) - _total(page, name, having)

    accepted = counted("otelcol_receiver_accepted_spans")
    decided = counted("otelcol_processor_tail_sampling_global_count_traces_sampled")
    held_traces = _total(page_after, "otelcol_processor_tail_sampling_sampling_traces_on_memory")
    return {
        "offered_spans_per_s": int(rate), "sent": sent, "accepted_per_s": round(accepted / elapsed),
        "refused": int(counted("otelcol_receiver_refused_spans")),
        "exported_per_s": round(counted("otelcol_exporter_sent_spans") / elapsed),
        "sampled_share": round(counted("otelcol_processor_tail_sampling_global_count_traces_sampled",
                                       'sampled="true"') / decided, 3) if decided else None,
        "traces_held": int(held_traces),
        "dropped_too_early": int(counted("otelcol_processor_tail_sampling_sampling_trace_dropped_too_early")),
        "heap_mb": round(_total(page_after, "otelcol_process_runtime_heap_alloc_bytes") / 1e6, 1),
        "collector_cpu_cores": round((after["collector"][0] - before["collector"][0]) / elapsed, 3),
        "collector_rss_mb": round(after["collector"][1] / 1e6, 1),
        "collector_rss_peak_mb": round(max(rss_peak, after["collector"][1]) / 1e6, 1),
        "agent_cpu_cores": round((after["agent"][0] - before["agent"][0]) / elapsed, 3),
        "agent_rss_mb": round(after["agent"][1] / 1e6, 1),
        "jaeger_cpu_cores": round((after["jaeger"][0] - before["jaeger"][0]) / elapsed, 3),
        "jaeger_rss_mb": round(after["jaeger"][1] / 1e6, 1),
    }


# -- main -----------------------------------------------------------------------------------

BENCHES: dict[str, Callable[[bool], Report]] = {
    "journal": bench_journal,
    "watcher": bench_watcher,
    "analysis": bench_analysis,
    "collector": bench_collector,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{journal,watcher,analysis,collector,all}")
    for name, fn in [*BENCHES.items(), ("all", None)]:
        doc = (fn.__doc__ or "").splitlines()[0] if fn is not None else "the four, one after the other"
        one = sub.add_parser(name, help=doc, description=doc)
        one.add_argument("--quick", action="store_true", help="a few seconds: a smoke test, not a measurement")
        one.add_argument("--json", type=Path, help="also write the figures and raw counts here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_providers()
    names_ = list(BENCHES) if args.bench == "all" else [args.bench]
    host = machine()
    print(f"{host['nproc']} cores, {host['ram_gib']} GiB RAM, load {' '.join(host['loadavg_at_start'])}; "
          f"python {host['python']}, hiredis {'yes' if host['hiredis'] else 'no'}, {host['redis_server']}\n")
    document: dict[str, Any] = {"machine": host, "quick": args.quick, "benches": {}}
    for name in names_:
        started = time.perf_counter()
        report = BENCHES[name](args.quick)
        elapsed = time.perf_counter() - started
        print(render(report))
        print(f"\n({name}{' --quick' if args.quick else ''}: {elapsed:.0f} s)\n")
        document["benches"][name] = {
            "command": f"PYTHONPATH=. python bench/scaling.py {name}" + (" --quick" if args.quick else ""),
            "seconds": round(elapsed, 1), "figures": report.figures(),
            "rows": [dataclasses.asdict(r) for r in report.rows], "detail": report.detail,
        }
    document["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
