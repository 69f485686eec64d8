"""The remediation rules, one per cause: each turns a :class:`~otel_subflow._analysis.remediation.Case`
into fixes whose numbers come from the verdict's evidence, the journal and the server's own figures.

Called through :func:`otel_subflow._analysis.remediation.remediate`; pure like the verdict rules.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from otel_subflow import names
from otel_subflow._analysis import remediation as r
from otel_subflow._analysis.remediation import Case, Remediation, fmt_bytes, fmt_ms, parties, where
from otel_subflow._analysis.verdict import EVICTING_POLICIES, NEAR_MAXMEMORY
from otel_subflow._journal.schema import DELETING_COMMANDS, OP_DEL, OP_EVICTED, OP_INIT, OP_MISS
from otel_subflow._watch.events import check_events_flags


def iso_ms(ms: int) -> str:
    """A server-clock time in ms as ISO 8601 UTC."""
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).isoformat(timespec="milliseconds")


# -- expired -------------------------------------------------------------------------------


def expired(case: Case) -> list[Remediation]:
    node = case.evidence.node_id
    gaps = r.init_to_read_gaps(case.entries, node)
    init = case.last_init()
    read_journalled = init is not None and any(r.order(m) > r.order(init) for m in case.of_key(OP_MISS))
    stand_in = None
    if not read_journalled and init is not None:
        since = case.said("ms_since_init")
        now = case.now_ms()
        stand_in = int(since) if since is not None else (now - init.op_ms if now is not None else None)
        if stand_in is not None:
            gaps.append(stand_in)
    if not gaps:
        return []
    stats = r.gap_stats(gaps)
    recommended = r.with_margin(stats["max_ms"])
    current_ttl = init.ttl_ms if init is not None else case.said("init_ttl_ms")
    numbers: dict[str, Any] = {"node_id": node, "init_to_read_ms": stats, "current_ttl_ms": current_ttl,
                               "recommended_ttl_ms": recommended, "margin": r.GAP_MARGIN}
    if stand_in is not None:
        numbers["unjournalled_read_ms"] = stand_in
    why = (f"Across {stats['samples']} journalled read(s) of node {node} that missed after an init, the init->read "
           f"gap was p50 {fmt_ms(stats['p50_ms'])}, p99 {fmt_ms(stats['p99_ms'])}, max {fmt_ms(stats['max_ms'])}"
           + (f" (this read was not journalled: the {fmt_ms(stand_in)} until the analysis stands in for it)"
              if stand_in is not None else "")
           + f"; the TTL was {fmt_ms(current_ttl)}. Set it to {fmt_ms(recommended)}: the longest gap x{r.GAP_MARGIN}, "
           "rounded up to two significant digits.")
    numbers.update(_ttl_cost(case, node, current_ttl, recommended))
    if numbers.get("extra_memory_bytes") is not None:
        why += (f" Cost: ~{numbers['keys_alive_at_recommended']} key(s) of this node alive at once "
                f"({numbers['node_inits_per_s']}/s x the TTL) x {fmt_bytes(numbers['bytes_per_state'])} each = "
                f"{fmt_bytes(numbers['memory_at_recommended_bytes'])}, "
                f"{fmt_bytes(numbers['extra_memory_bytes'])} more than today (at most: every state living its whole "
                "TTL).")
    else:
        why += f" Memory cost not computed: {numbers['memory_cost_unknown']}."
    return [case.fix(r.RAISE_TTL, why, recommended >= max(gaps), **numbers)]


def _ttl_cost(case: Case, node: str | None, current_ttl: int | None, recommended: int) -> dict[str, Any]:
    """What the longer TTL costs: this node's write rate (journal) x TTL x bytes per state (MEMORY USAGE)."""
    entries = case.entries
    end = case.now_ms() or (entries[-1].op_ms if entries else None)  # the window reaches the time it was read
    span_ms = end - entries[0].op_ms if entries and end is not None else 0
    inits = sum(1 for e in entries if e.op == OP_INIT and e.node_id == node)
    per_state = case.server.state_key_bytes
    if span_ms <= 0 or inits == 0:
        return {"memory_cost_unknown": "the journal's window has no write rate for this node"}
    if per_state is None:
        return {"memory_cost_unknown": "no state key was alive to weigh (MEMORY USAGE)"}
    rate = inits / (span_ms / 1000.0)
    alive = math.ceil(rate * recommended / 1000.0)
    extra = max(0.0, rate * (recommended - (current_ttl or 0)) / 1000.0) * per_state
    return {"node_inits_per_s": round(rate, 3), "window_ms": span_ms, "bytes_per_state": round(per_state, 1),
            "states_weighed": case.server.state_keys_sampled, "keys_alive_at_recommended": alive,
            "memory_at_recommended_bytes": math.ceil(alive * per_state), "extra_memory_bytes": math.ceil(extra)}


# -- evicted -------------------------------------------------------------------------------


def evicted(case: Case) -> list[Remediation]:
    server = case.server
    used = server.info_int("used_memory") or case.said("used_memory")
    maxmemory = server.info_int("maxmemory") or case.said("maxmemory")
    policy = server.info.get("maxmemory_policy") or case.said("maxmemory_policy")
    evicted_total = server.info_int("evicted_keys")
    base: dict[str, Any] = {"used_memory_bytes": used, "maxmemory_bytes": maxmemory, "maxmemory_policy": policy,
                            "evicted_keys_total": evicted_total}
    base.update(_eviction_rate(case))
    keys = server.total_keys()
    per_key = used / keys if used and keys else None
    count = base.get("evicted_since_init", evicted_total)
    evicted_bytes = count * per_key if count is not None and per_key is not None else None
    base.update({"avg_key_bytes": round(per_key, 1) if per_key else None,
                 "evicted_bytes_estimate": math.ceil(evicted_bytes) if evicted_bytes is not None else None})
    out: list[Remediation] = []
    if used is not None and evicted_bytes is not None:
        target = r.mib_up((used + evicted_bytes) * r.MEMORY_HEADROOM)
        since = "since the init" if "evicted_since_init" in base else "since the server started"
        out.append(case.fix(
            r.RAISE_MAXMEMORY,
            f"Redis uses {fmt_bytes(used)} of maxmemory {fmt_bytes(maxmemory)} ({policy}) and evicted {count} "
            f"key(s) {since} ({base['eviction_rate_per_s']}/s), ~{fmt_bytes(evicted_bytes)} at "
            f"{fmt_bytes(per_key)} per key (used memory / keys). Raise maxmemory to {fmt_bytes(target)}: used + "
            f"evicted (an estimate), x{r.MEMORY_HEADROOM:g} so the server stays under {NEAR_MAXMEMORY:.0%} full, "
            "rounded up to a MiB.",
            True, recommended_maxmemory_bytes=target, **base))
    out.append(_own_redis(case))
    volatile = _volatile_ttl(case, policy)
    if volatile is not None:
        out.append(volatile)
    return out


def _own_redis(case: Case) -> Remediation:
    """A Redis of its own under noeviction, sized from the state keys weighed now (when any is alive)."""
    server = case.server
    why = ("Keep the state on a Redis of its own with maxmemory-policy noeviction: it never evicts (a full server "
           "refuses writes with OOM errors instead of losing state silently).")
    per_state, count = server.state_key_bytes, server.state_keys_seen
    if per_state is None or not count:
        return case.fix(r.OWN_NOEVICTION_REDIS, why + " Size it from MEMORY USAGE of the state keys: none was alive "
                        "to weigh now.", True, state_keys=count, bytes_per_state=None, recommended_maxmemory_bytes=None)
    state_bytes = count * per_state
    size = r.mib_up(state_bytes * r.MEMORY_HEADROOM)
    bound = "" if server.state_keys_complete else "at least "
    return case.fix(
        r.OWN_NOEVICTION_REDIS,
        why + f" The state takes {bound}{count} key(s) x {fmt_bytes(per_state)} (MEMORY USAGE of "
        f"{server.state_keys_sampled}) = {fmt_bytes(state_bytes)} now: give it {fmt_bytes(size)} "
        f"(x{r.MEMORY_HEADROOM:g}, rounded up to a MiB).",
        True, state_keys=count, state_keys_complete=server.state_keys_complete, bytes_per_state=round(per_state, 1),
        state_bytes=math.ceil(state_bytes), recommended_maxmemory_bytes=size)


def _eviction_rate(case: Case) -> dict[str, Any]:
    """Evictions over this incident: since the init's counters sample when the journal took one, else since start."""
    server, init = case.server, case.last_init()
    now, total = server.time_ms, server.info_int("evicted_keys")
    raw = (init.counters or "").split() if init is not None else []
    if len(raw) == 4 and raw[0].isdigit() and raw[1].isdigit() and now is not None and total is not None:
        window = max(1, now - int(raw[0]))
        since = max(0, total - int(raw[1]))
        return {"evicted_since_init": since, "eviction_window_ms": window,
                "eviction_rate_per_s": round(since / (window / 1000.0), 3)}
    uptime = server.info_int("uptime_in_seconds")
    if total is None or uptime is None:
        return {"eviction_rate_per_s": None}
    window_s = max(1, uptime)  # (whole seconds: 0 is "under a second")
    return {"eviction_window_ms": window_s * 1000, "eviction_rate_per_s": round(total / window_s, 3)}


def _volatile_ttl(case: Case, policy: Any) -> Remediation | None:
    """volatile-ttl evicts the keys closest to expiry first: would the state have outlived the others?"""
    init = case.last_init()
    ttl = init.ttl_ms if init is not None else None
    if policy not in EVICTING_POLICIES or policy == "volatile-ttl" or init is None or not ttl or ttl <= 0:
        return None
    gone = case.said("ms_init_to_tombstone") or case.said("ms_since_init")
    if gone is None:  # from the journal: the eviction's tombstone, else the read that missed
        after = [e for e in case.of_key(OP_EVICTED) + case.of_key(OP_MISS) if r.order(e) > r.order(init)]
        gone = min((e.op_ms for e in after), default=None)
        gone = gone - init.op_ms if gone is not None else None
    avg_ttl = case.server.keyspace(case.evidence.reader_db).get("avg_ttl")
    if gone is None or not avg_ttl:
        return None
    left = max(0, ttl - int(gone))
    prevents = left > avg_ttl
    outcome = "most likely have outlived them" if prevents else "still be among the first to go"
    return case.fix(
        r.VOLATILE_TTL_POLICY,
        f"Under volatile-ttl Redis evicts the keys with a TTL closest to expiry first (among a sample). The state had "
        f"{fmt_ms(left)} of its {fmt_ms(ttl)} TTL left when it went; keys with a TTL in db "
        f"{case.evidence.reader_db} have {fmt_ms(avg_ttl)} left on average: it would {outcome}.",
        prevents, state_ttl_left_ms=left, state_ttl_ms=ttl, db_avg_ttl_ms=avg_ttl, maxmemory_policy=policy)


# -- where, and what spelling ------------------------------------------------------------


def wrong_endpoint(case: Case) -> list[Remediation]:
    writers = parties(case.of_key(OP_INIT))
    readers = parties(case.of_key(OP_MISS))
    if not readers:
        readers = [{"host": None, "endpoint": case.evidence.reader_endpoint or case.said("reader_endpoint"),
                    "db": case.evidence.reader_db, "server_run_id": case.said("server_run_id")}]
    run_inits: dict[str, int] = {}
    for e in case.entries:
        if e.op == OP_INIT and e.run_id == case.evidence.run_id:
            at = f"{e.endpoint or '?'} db {e.db or '?'}"
            run_inits[at] = run_inits.get(at, 0) + 1
    common = max(run_inits.items(), key=lambda kv: kv[1]) if run_inits else None
    why = (f"The init went {', '.join(where(w) for w in writers) or '?'}; the read went "
           f"{', '.join(where(p) for p in readers)}. Point every worker of the run at the same endpoint and db"
           + (f" ({common[1]} of the run's {sum(run_inits.values())} journalled inits used {common[0]})" if common
              else "") + ".")
    out = [case.fix(r.ALIGN_ENDPOINT, why, True, writers=writers, readers=readers, run_inits_by_endpoint=run_inits)]
    failover = _failover(case, writers)
    if failover is not None:
        out.append(failover)
    return out


def key_mismatch(case: Case) -> list[Remediation]:
    written = case.said("near_key")
    if not written:
        return []
    writers = sorted({e.host or "?" for e in case.of_key(OP_INIT, written)})
    readers = sorted({e.host or "?" for e in case.of_key(OP_MISS)})
    return [case.fix(
        r.ALIGN_KEY_SPELLING,
        f"Written as {written!r} (by {', '.join(writers) or 'a host the journal does not name'}), read as "
        f"{case.key!r} (by {', '.join(readers) or 'a host the journal does not name'}): build the key in one shared "
        "function (or normalise the node id) on both sides.",
        True, written_key=written, read_key=case.key, written_by=writers, read_by=readers)]


def get_before_init(case: Case) -> list[Remediation]:
    misses, inits = case.of_key(OP_MISS), case.of_key(OP_INIT)
    first_miss = next((m for m in misses if not any(r.order(i) < r.order(m) for i in inits)), None)
    init = next((i for i in inits if first_miss is not None and r.order(i) > r.order(first_miss)), None)
    gap = init.op_ms - first_miss.op_ms if init is not None and first_miss is not None else None
    node_gaps = r.read_to_init_gaps(case.entries, case.evidence.node_id)
    stats = r.gap_stats(node_gaps)
    window = r.with_margin(stats["max_ms"]) if stats["max_ms"] is not None else None
    who = (f" ({first_miss.host} read, {init.host} initialised)" if first_miss is not None and init is not None
           else "")
    why = (f"The read ran {fmt_ms(gap)} before the init{who}. Dispatch the node only after initialize_state has "
           "returned (await it before enqueueing the reader).")
    if window is not None:
        why += (f" Across {stats['samples']} such read(s) of node {case.evidence.node_id} the read->init gap was "
                f"p50 {fmt_ms(stats['p50_ms'])}, max {fmt_ms(stats['max_ms'])}; a reader that cannot wait for the init "
                f"would have to retry for {fmt_ms(window)} (max x{r.GAP_MARGIN}, rounded up).")
    return [case.fix(r.AWAIT_INIT_BEFORE_DISPATCH, why, True, read_to_init_ms=gap,
                     reader=first_miss.host if first_miss else None, writer=init.host if init else None,
                     node_read_to_init_ms=stats, retry_window_ms=window)]


# -- restarts and failovers ------------------------------------------------------------------


def _persistence(case: Case) -> tuple[dict[str, Any], str]:
    """The persistence settings found on the server, and how they were found."""
    server = case.server
    if server.config:
        return {name: server.config.get(name) for name in ("appendonly", "appendfsync", "save")}, "CONFIG GET"
    found = {name: server.info_int(name) for name in ("aof_enabled", "rdb_changes_since_last_save",
                                                       "rdb_last_save_time")}
    return found, f"INFO persistence (CONFIG GET {server.config_refused or 'not read'}: save points unknown)"


def server_restart(case: Case) -> list[Remediation]:
    server, init = case.server, case.last_init()
    settings, source = _persistence(case)
    now, uptime = server.time_ms, server.info_int("uptime_in_seconds")
    same_run = server.info.get("run_id") in (None, case.said("server_run_id"))
    before = None
    if init is not None and now is not None and uptime is not None and same_run:
        before = now - uptime * 1000 - init.op_ms
    numbers: dict[str, Any] = {"init_to_restart_ms": before, "init_to_restart_resolution_ms": 1000,
                               "persistence_source": source, **settings}
    if before is not None:
        when = f"The init was written {fmt_ms(before)} (+-1 s: INFO uptime is whole seconds) before the restart"
    elif init is None:
        when = "No init of the state was journalled, so its age at the restart is unknown"
    else:
        when = "The restart's time is unknown (the server restarted again since, or INFO was not read)"
    aof_on = settings.get("appendonly") == "yes" or settings.get("aof_enabled") == 1
    out = []
    if aof_on:
        out.append(case.fix(
            r.ENABLE_AOF, f"{when}; AOF is on ({source}) yet the state was lost: check that the restart kept its "
            "data dir and appendfsync.", None, **numbers))
    else:
        # A graceful restart (SHUTDOWN, SIGTERM) writes the AOF out; a crash loses up to a second under everysec.
        old_enough = before is not None and before > r.EVERYSEC_LOSS_MS
        tail = ("so it would have been kept even after a crash" if old_enough else
                "so after a crash only appendfsync always would have kept it; a graceful restart keeps it either way"
                if before is not None else "")
        out.append(case.fix(
            r.ENABLE_AOF, f"{when}; AOF is off ({source}). CONFIG SET appendonly yes: a graceful restart then keeps "
            f"every acknowledged write, and a crash under appendfsync everysec loses at most "
            f"~{fmt_ms(r.EVERYSEC_LOSS_MS)} of the latest{', ' + tail if tail else ''}.",
            True if old_enough else None, **numbers))
    save = settings.get("save")
    if not save:
        out.append(case.fix(
            r.RDB_SAVE_POINTS, f"RDB save points are {'off' if save == '' else 'unknown'} ({source}): with save "
            "points a graceful SHUTDOWN writes a snapshot, but a crash still loses every write since the last one.",
            None, **numbers))
    return out


def _failover(case: Case, writers: list[dict[str, Any]]) -> Remediation | None:
    """A reader's server promoted from replica (INFO replication second_repl_offset): the write missed the failover."""
    server = case.server
    offset = server.info_int("second_repl_offset")
    if server.info.get("role") != "master" or offset is None or offset < 0:
        return None
    min_replicas = server.config.get("min-replicas-to-write")
    replicas = server.info_int("connected_slaves")
    return case.fix(
        r.REPLICATE_AND_WAIT,
        f"The reader's server was promoted from replica (INFO replication second_repl_offset={offset}); the init went "
        f"to {', '.join(str(w['endpoint']) for w in writers) or 'the old master'} and had not reached it. Make each "
        f"init wait for a replica: WAIT 1 <timeout ms> after the write, or min-replicas-to-write 1 (now "
        f"{min_replicas if min_replicas is not None else 'unknown: ' + (server.config_refused or 'not read')}; "
        f"{replicas if replicas is not None else '?'} replica(s) connected now).",
        True, second_repl_offset=offset, min_replicas_to_write=min_replicas, connected_replicas=replicas)


def failover(case: Case) -> list[Remediation]:
    """A write lost in a failover: each init must wait for a replica before it counts as done."""
    promoted = _failover(case, parties(case.of_key(OP_INIT)))
    return [promoted] if promoted is not None else [case.fix(
        r.REPLICATE_AND_WAIT, f"The init went to {case.said('init_endpoint') or 'the old master'}, which failed over "
        "before a replica had it. Make each init wait for a replica: WAIT 1 <timeout ms> after the write, or "
        "min-replicas-to-write 1.", True, init_endpoint=case.said("init_endpoint"))]


def _deleting_calls(case: Case) -> dict[str, int]:
    """Calls since start of each command that deletes keys (INFO commandstats), those with any."""
    return {c: n for c in DELETING_COMMANDS if (n := case.server.calls(c) or 0)}


# -- the rest ------------------------------------------------------------------------------


def deleted(case: Case) -> list[Remediation]:
    init = case.last_init()
    stone = next((e for e in reversed(case.entries) if e.key == case.key and e.op == OP_DEL), None)
    after = stone.op_ms - init.op_ms if stone is not None and init is not None else case.said("ms_init_to_tombstone")
    read = next((m for m in case.of_key(OP_MISS) if init is not None and r.order(m) > r.order(init)), None)
    within = read.op_ms - init.op_ms if read is not None and init is not None else case.said("ms_since_init")
    ttl = init.ttl_ms if init is not None else None
    left = ttl - after if ttl is not None and after is not None and ttl > 0 else None
    flushes = case.said("flush_calls")
    family = "FLUSHDB/FLUSHALL" if flushes and stone is None else "DEL/UNLINK (keyspace event del)"
    calls = _deleting_calls(case)
    when = (f"{fmt_ms(after)} after its init" + (f", with {fmt_ms(left)} of its TTL left" if left else "")
            + (f", at {iso_ms(stone.op_ms)} (server time)" if stone is not None else "") if after is not None
            else f"within {fmt_ms(within)} of its init (no keyspace event says when)")
    counted = ", ".join(f"{command} {n}" for command, n in calls.items()) or "none counted"
    why = (f"Deleted by {family} {when}. Calls since start of commands that delete: {counted}"
           + (f"; deletes since the init: {case.said('deletes_since_init')}" if case.said("deletes_since_init")
              else "") + ". Find the caller at that time (ACL LOG, the cleanup job's schedule) and limit cleanups "
           "to runs that have finished.")
    return [case.fix(r.FIND_DELETER, why, None, command_family=family, init_to_delete_ms=after,
                     deleted_within_ms=within, ttl_left_ms=left, deleted_at_ms=stone.op_ms if stone else None,
                     deleting_calls=calls, flush_calls=flushes)]


def never_written(case: Case) -> list[Remediation]:
    run = case.evidence.run_id
    inits = [e for e in case.entries if e.op == OP_INIT and e.run_id == run]
    nodes = sorted({e.node_id or "?" for e in inits})
    hosts = sorted({e.host or "?" for e in inits})
    readers = sorted({e.host or "?" for e in case.of_key(OP_MISS)})
    return [case.fix(
        r.INITIALISE_NODE,
        f"No init of {case.key} was journalled; the run has {len(inits)} init(s) of node(s) {nodes or '-'} by "
        f"{hosts or '-'}, and {readers or 'a reader'} asked for node {case.evidence.node_id}. Initialise that node "
        "before dispatching its reader, or fix the node id the reader asks for.",
        None, run_inits=len(inits), nodes_initialised=nodes, init_hosts=hosts, read_by=readers)]


def replica_lag(case: Case) -> list[Remediation]:
    init = case.last_init()
    miss = next((m for m in case.of_key(OP_MISS) if init is not None and r.order(m) > r.order(init)), None)
    gap = miss.op_ms - init.op_ms if miss is not None and init is not None else None
    master = case.said("master_endpoint") or case.evidence.master_endpoint
    return [case.fix(
        r.READ_FROM_MASTER,
        f"The read went to the replica {case.evidence.reader_endpoint or case.said('reader_endpoint')} "
        f"{fmt_ms(gap)} after the init, before the write reached it (link {case.said('master_link_status')}). Read the "
        f"state from the master {master or '?'}, or WAIT 1 <timeout ms> after the init.",
        True, init_to_read_ms=gap, master_endpoint=master, reader_endpoint=case.evidence.reader_endpoint)]


def unknown(case: Case) -> list[Remediation]:
    value = case.server.config.get("notify-keyspace-events")
    if value is None:
        return []
    check = check_events_flags(value)
    if check.ok:
        return []
    return [case.fix(
        r.ENABLE_KEYSPACE_EVENTS,
        f"notify-keyspace-events is {value!r}, lacking {check.missing!r}: no tombstones are recorded, so expiries, "
        "evictions and deletes cannot be told apart. Add the flags (CONFIG SET, or OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS"
        "=true) and run a keyspace watcher.",
        None, notify_keyspace_events=value, missing_flags=check.missing)]


RULES: dict[str, r.Rule] = {
    names.CAUSE_EXPIRED: expired,
    names.CAUSE_EVICTED: evicted,
    names.CAUSE_WRONG_ENDPOINT: wrong_endpoint,
    names.CAUSE_KEY_MISMATCH: key_mismatch,
    names.CAUSE_GET_BEFORE_INIT: get_before_init,
    names.CAUSE_SERVER_RESTART: server_restart,
    names.CAUSE_DELETED: deleted,
    names.CAUSE_NEVER_WRITTEN: never_written,
    names.CAUSE_REPLICA_LAG: replica_lag,
    names.CAUSE_FAILOVER: failover,
    names.CAUSE_UNKNOWN: unknown,
}
