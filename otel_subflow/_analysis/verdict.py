"""Where the verdict is decided: evidence in, cause + confidence + summary out.

Pure functions of :class:`~otel_subflow._analysis.probe.Evidence`: no I/O, so every rule
is testable on its own and the CLI reuses them on evidence it gathered itself.
Order between events is the journal's order (the Redis server's clock), never an
application clock.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from otel_subflow import names
from otel_subflow._analysis.probe import Evidence
from otel_subflow._analysis.topology import failover_finding, replica_lag_finding
from otel_subflow._journal.entries import JournalEntry
from otel_subflow._journal.schema import OP_DEL, OP_EVICTED, OP_EXPIRED, OP_INIT, parse_counter_sample

EVICTING_POLICIES = frozenset({
    "allkeys-lru", "allkeys-lfu", "allkeys-random",
    "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl",
})
#: used_memory / maxmemory at or above which eviction is plausible.
NEAR_MAXMEMORY = 0.8
_TOMBSTONE_CAUSE = {OP_EXPIRED: names.CAUSE_EXPIRED, OP_EVICTED: names.CAUSE_EVICTED, OP_DEL: names.CAUSE_DELETED}


@dataclasses.dataclass
class Verdict:
    """Why a state is missing, how sure we are, and what shows it."""

    cause: str
    confidence: str
    summary: str
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)

    def event_attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            names.ATTR_MISSING_CAUSE: self.cause,
            names.ATTR_MISSING_CONFIDENCE: self.confidence,
            names.ATTR_MISSING_SUMMARY: self.summary,
        }
        for field, value in self.evidence.items():
            if value is not None:
                attrs[names.EVIDENCE_PREFIX + field] = value
        return attrs

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def unknown(reason: str, **evidence: Any) -> Verdict:
    """The verdict when the analysis could not run or could not decide."""
    return Verdict(names.CAUSE_UNKNOWN, names.CONFIDENCE_UNKNOWN,
                   f"Cause unknown: {reason}.", {"reason": reason, **evidence})


def _same_db(entry: JournalEntry, db: int) -> bool:
    raw = entry.db
    return raw is None or raw == str(db)


def _common_evidence(ev: Evidence) -> dict[str, Any]:
    out: dict[str, Any] = {
        "key_exists": ev.key_exists,
        "server_run_id": ev.server_run_id,
        "reader_db": ev.reader_db,
        "journal_entries": ev.journal_total,
    }
    if ev.reader_endpoint:
        out["reader_endpoint"] = ev.reader_endpoint
    if ev.watcher_alive is not None:
        out["watcher_alive"] = ev.watcher_alive
    if ev.tombstone_wait_ms is not None:
        out["tombstone_wait_ms"] = ev.tombstone_wait_ms
    uptime = ev.info_int("uptime_in_seconds")
    if uptime is not None:
        out["server_uptime_s"] = uptime
    if ev.info.get("maxmemory_policy"):
        out["maxmemory_policy"] = ev.info["maxmemory_policy"]
    for field in ("evicted_keys", "expired_keys", "used_memory", "maxmemory"):
        value = ev.info_int(field)
        if value is not None:
            out[field] = value
    if ev.errors:
        out["probe_errors"] = "; ".join(ev.errors)
    # What the journal could not have told: it yields to the user's data.
    if not ev.journal_dedicated and ev.info.get("maxmemory_policy") in EVICTING_POLICIES:
        out["journal_evictable"] = True
    if ev.journal_paused:
        out["journal_paused"] = True
    if ev.journal_buckets_lost:
        out["journal_buckets_lost"] = ev.journal_buckets_lost
    return out


def _journal_caveat(ev: Evidence) -> str:
    """Why the journal may lack the init, in words (appended to verdicts that rest on its absence)."""
    if ev.journal_paused:
        return " The journal is paused under memory pressure, so recent inits may be missing from it."
    if not ev.journal_dedicated and ev.info.get("maxmemory_policy") in EVICTING_POLICIES:
        return (" The journal shares this Redis, whose policy "
                f"({ev.info.get('maxmemory_policy')}) may evict its records too; give it its own Redis "
                "with OTEL_SUBFLOW_JOURNAL_URL.")
    return ""


def _last_init_and_tombstones(ev: Evidence) -> tuple[JournalEntry | None, list[JournalEntry]]:
    """The key's last journalled init, and the tombstones of the key (in the reader's db) after it."""
    inits = [e for e in ev.journal if e.op == OP_INIT and e.key == ev.key]
    last_init = inits[-1] if inits else None
    after = last_init.seq if last_init is not None else (0, 0)
    tombstones = [
        e for e in ev.journal
        if e.op in _TOMBSTONE_CAUSE and e.key == ev.key and e.seq > after and _same_db(e, ev.reader_db)
    ]
    return last_init, tombstones


def tombstone_may_be_in_flight(ev: Evidence) -> bool:
    """The key was initialised and is gone, with no tombstone after the init and no definitive
    verdict without one: a live watcher's tombstone may be a few milliseconds from the journal."""
    if ev.key_exists or not ev.journal_read:
        return False
    last_init, tombstones = _last_init_and_tombstones(ev)
    if last_init is None or tombstones:
        return False
    return decide(ev).confidence != names.CONFIDENCE_DEFINITIVE


_COUNTER_NAMES = ("evicted", "expired", "deletes")


def counters_since(ev: Evidence, init: JournalEntry) -> dict[str, int] | None:
    """How much Redis's counters rose between the init and the analysis: evicted and expired keys,
    and calls of commands that delete (``None``: no sample with the init, or the server restarted).

    The init carries the newest sample its journal took before it (``"<ms> <evicted> <expired>
    <deletes>"``); the analysis's INFO gives today's values. A counter that fell (CONFIG
    RESETSTAT) says nothing and is left out."""
    sample = parse_counter_sample(init.counters)
    now_ms, uptime = ev.server_time_ms, ev.info_int("uptime_in_seconds")
    if sample is None or now_ms is None or uptime is None:
        return None
    if (uptime + 1) * 1000 < now_ms - sample["ms"]:  # (uptime: whole seconds)
        return None  # restarted since the sample: its counters started again from zero
    current = {"evicted": ev.info_int("evicted_keys"), "expired": ev.info_int("expired_keys"),
               "deletes": ev.deletes()}
    out: dict[str, int] = {}
    for name in _COUNTER_NAMES:
        now, then = current[name], sample[name]
        if now is None or now < then:
            continue
        out[name] = now - then
    return out or None


def _decide_by_counters(key: str, since: dict[str, int], ttl_ran_out: bool, base: dict[str, Any]) -> Verdict | None:
    """What the counters alone decide: one way for a key to vanish rose and the others provably did not."""
    evicted, expired, deletes = since.get("evicted"), since.get("expired"), since.get("deletes")
    if evicted and deletes == 0 and (expired == 0 or not ttl_ran_out):
        return Verdict(
            names.CAUSE_EVICTED,
            names.CONFIDENCE_PROBABLE,
            f"No tombstone was recorded, but Redis evicted {evicted} key(s) since the init of {key} and ran "
            "no command that deletes (INFO stats and commandstats): most likely evicted.",
            base,
        )
    if deletes and evicted == 0 and (expired == 0 or not ttl_ran_out):
        return Verdict(
            names.CAUSE_DELETED,
            names.CONFIDENCE_PROBABLE,
            f"No tombstone was recorded, but {deletes} call(s) of commands that delete (DEL, UNLINK, FLUSH*, "
            f"RENAME, a past-time EXPIRE...) ran since the init of {key}, and Redis evicted nothing: most "
            "likely deleted.",
            base,
        )
    return None


#: What separates a key's parts; a prefix or suffix one side adds ends (or starts) at one of them.
KEY_SEPARATORS = frozenset(":_-./|#@")


def key_affix(written: str, read: str) -> tuple[str, str] | None:
    """How two spellings of one key differ when one is the other plus a separator-delimited prefix
    or suffix: ``("prefix", "myprefix:")`` for ``myprefix:celery-task-meta-1`` and
    ``celery-task-meta-1`` (Celery's ``global_keyprefix`` on one side only), either way round;
    ``None`` otherwise."""
    if written == read:
        return None
    longer, shorter = (written, read) if len(written) > len(read) else (read, written)
    if not shorter:
        return None
    if longer.endswith(shorter):
        extra = longer[: len(longer) - len(shorter)]
        if extra[-1] in KEY_SEPARATORS or shorter[0] in KEY_SEPARATORS:
            return "prefix", extra
    if longer.startswith(shorter):
        extra = longer[len(shorter):]
        if extra[0] in KEY_SEPARATORS or shorter[-1] in KEY_SEPARATORS:
            return "suffix", extra
    return None


def _memory_pressure(ev: Evidence) -> bool:
    maxmemory = ev.info_int("maxmemory") or 0
    used = ev.info_int("used_memory") or 0
    return (
        ev.info.get("maxmemory_policy") in EVICTING_POLICIES
        and (ev.info_int("evicted_keys") or 0) > 0
        and maxmemory > 0
        and used >= NEAR_MAXMEMORY * maxmemory
    )


def decide(ev: Evidence) -> Verdict:
    """The verdict for one missing state."""
    base = _common_evidence(ev)
    key = ev.key

    if ev.is_replica:
        base["role"] = "replica"
        if ev.master_endpoint:
            base["master_endpoint"] = ev.master_endpoint
        base["master_link_status"] = ev.info.get("master_link_status")
        if ev.master_has_key or ev.key_exists:
            base["master_has_key"] = bool(ev.master_has_key)
            where = "exists on its master" if ev.master_has_key else "has reached the replica since"
            return Verdict(names.CAUSE_REPLICA_LAG, names.CONFIDENCE_DEFINITIVE,
                           f"The read went to a replica that had not yet received {key}; the key {where}.", base)

    if ev.key_exists:
        base["pttl_ms"] = ev.pttl_ms
        lag = replica_lag_finding(ev, _last_init_and_tombstones(ev)[0], base)
        if lag is not None:
            return Verdict(names.CAUSE_REPLICA_LAG, names.CONFIDENCE_DEFINITIVE, lag, base)
        return Verdict(names.CAUSE_GET_BEFORE_INIT, names.CONFIDENCE_DEFINITIVE,
                       f"The read ran before the init: {key} exists now (PTTL {ev.pttl_ms} ms).", base)

    entries = ev.journal
    last_init, tombstones = _last_init_and_tombstones(ev)
    if tombstones:
        stone = tombstones[-1]
        cause = _TOMBSTONE_CAUSE[stone.op]
        base.update({"tombstone_op": stone.op, "tombstone_stream_id": stone.stream_id})
        if last_init is not None:
            base["init_stream_id"] = last_init.stream_id
            base["ms_init_to_tombstone"] = stone.op_ms - last_init.op_ms
        words = {OP_EXPIRED: "expired (its TTL ran out)", OP_EVICTED: "was evicted under memory pressure",
                 OP_DEL: "was deleted (DEL, UNLINK or a past-time EXPIRE)"}[stone.op]
        return Verdict(cause, names.CONFIDENCE_DEFINITIVE,
                       f"The state {key} {words}; the keyspace watcher saw it at journal id {stone.stream_id}.", base)

    if last_init is not None:
        return _decide_after_init(ev, last_init, base)

    # No init of this key was journalled.
    same_node = [
        e for e in entries
        if e.op == OP_INIT and ev.node_id is not None and e.node_id == ev.node_id
        and e.key != key
    ]
    # The same key with a prefix or suffix on one side only (a global key prefix), unless both sides
    # name their node and the nodes differ: "step" and "step-2" are two nodes, not two spellings.
    affixed = [(e.key, extra) for e in entries if e.op == OP_INIT and e.key
               and not (ev.node_id and e.node_id and e.node_id != ev.node_id)
               and (extra := key_affix(e.key, key)) is not None]
    if ev.near_keys or affixed or same_node:
        if ev.near_keys:
            other = ev.near_keys[0]
        elif affixed:
            other, (where, text) = affixed[-1]
            base.update({"read_key": key, "written_key": other, "key_affix": where, "key_affix_text": text})
        else:
            other = same_node[-1].key or ""
        base["near_key"] = other
        base["scan_complete"] = ev.scan_complete
        how = ""
        if affixed and not ev.near_keys:
            side = "writer's" if len(other) > len(key) else "reader's"
            how = f" (a {where} {text!r} on the {side} side only)"
        return Verdict(names.CAUSE_KEY_MISMATCH, names.CONFIDENCE_DEFINITIVE,
                       f"The reader asked for {key} but the state was written as {other}{how}.", base)

    run_journal_missing = ev.journal_read and ev.journal_total == 0
    base["run_journal_missing"] = run_journal_missing
    current = ev.server_run_id
    if run_journal_missing and ev.cached_server_run_id and current and ev.cached_server_run_id != current:
        base["previous_server_run_id"] = ev.cached_server_run_id
        return Verdict(
            names.CAUSE_SERVER_RESTART,
            names.CONFIDENCE_PROBABLE,
            "The Redis server restarted (run_id changed) and the run's journal went with it; "
            "the state was most likely lost in the restart.",
            base,
        )
    if ev.flush_calls():
        base["flush_calls"] = ev.flush_calls()
    if run_journal_missing and _memory_pressure(ev):
        return Verdict(names.CAUSE_EVICTED, names.CONFIDENCE_PROBABLE, "The server is evicting near maxmemory "
                       "and the run's journal is gone too: most likely evicted.", base)
    if not ev.journal_read:
        return unknown("the run's journal could not be read", **base)
    return Verdict(
        names.CAUSE_NEVER_WRITTEN,
        names.CONFIDENCE_PROBABLE,
        f"No init of {key} was journalled"
        + (" (other nodes of the run were)" if ev.journal_total else " and the run has no journal at all")
        + "; an init still in flight would show up later as a race." + _journal_caveat(ev),
        base,
    )


def _decide_after_init(ev: Evidence, init: JournalEntry, base: dict[str, Any]) -> Verdict:
    key = ev.key
    init_run = init.server_run_id
    init_db = init.db
    now_ms = ev.server_time_ms
    base.update({
        "init_stream_id": init.stream_id,
        "init_host": init.host,
        "init_server_run_id": init_run,
        "init_db": int(init_db) if init_db and init_db.isdigit() else None,
    })
    since_init = now_ms - init.op_ms if now_ms is not None else None
    if since_init is not None:
        base["ms_since_init"] = since_init
    current = ev.server_run_id

    if init_run and current and init_run != current:
        uptime = ev.info_int("uptime_in_seconds")
        base["server_uptime_s"] = uptime
        init_endpoint = init.endpoint
        if init_endpoint is not None:
            base["init_endpoint"] = init_endpoint
        # The same address now answers with another server process: a restart. Also
        # when this reader itself saw the init's server before (its cached run_id).
        same_address = init_endpoint is not None and init_endpoint == ev.reader_endpoint
        failover = None if same_address else failover_finding(ev, init_endpoint, base)
        if failover is not None:
            return Verdict(names.CAUSE_FAILOVER, *failover, base)
        if same_address or ev.cached_server_run_id == init_run:
            return Verdict(
                names.CAUSE_SERVER_RESTART,
                names.CONFIDENCE_DEFINITIVE,
                f"The Redis server at {ev.reader_endpoint} restarted after the init (run_id {init_run[:8]} -> "
                f"{current[:8]}, up {uptime} s) without persisting {key}.",
                base,
            )
        # uptime has a resolution of 1 s: only call the reader's server "up since before
        # the init" with a second to spare.
        up_before_init = uptime is not None and since_init is not None and uptime * 1000 > since_init + 1000
        return Verdict(
            names.CAUSE_WRONG_ENDPOINT,
            names.CONFIDENCE_DEFINITIVE if up_before_init else names.CONFIDENCE_PROBABLE,
            f"The init wrote {key} to another Redis server ({init_endpoint or 'run_id ' + init_run[:8]}) "
            f"than the one this reader uses ({ev.reader_endpoint or 'run_id ' + current[:8]}).",
            base,
        )
    if init_db is not None and init_db != str(ev.reader_db):
        return Verdict(names.CAUSE_WRONG_ENDPOINT, names.CONFIDENCE_DEFINITIVE,
                       f"The init wrote {key} to db {init_db}; this reader uses db {ev.reader_db}.", base)

    ttl = init.ttl_ms
    if ttl is not None:
        base["init_ttl_ms"] = ttl
    ttl_ran_out = ttl is not None and ttl > 0 and since_init is not None and since_init >= ttl
    since = counters_since(ev, init)
    if since is not None:
        base.update({f"{name}_since_init": delta for name, delta in since.items()})
        by_counters = _decide_by_counters(key, since, ttl_ran_out, base)
        if by_counters is not None:
            return by_counters
    if ttl_ran_out and (since is None or since.get("expired") != 0):
        return Verdict(
            names.CAUSE_EXPIRED,
            names.CONFIDENCE_PROBABLE,
            f"The state {key} was written with a TTL of {ttl} ms, {since_init} ms ago (server time): "
            "it expired. No expired event was seen (keyspace events off or watcher down).",
            base,
        )
    if _memory_pressure(ev) and (since is None or since.get("evicted") != 0):
        return Verdict(
            names.CAUSE_EVICTED,
            names.CONFIDENCE_PROBABLE,
            f"The TTL of {key} has not run out, and the server evicts under "
            f"{ev.info.get('maxmemory_policy')} near maxmemory: most likely evicted.",
            base,
        )
    if ev.flush_calls() > 0 and ev.run_keys_seen == 0 and ev.scan_complete:
        base["flush_calls"] = ev.flush_calls()
        return Verdict(
            names.CAUSE_DELETED,
            names.CONFIDENCE_PROBABLE,
            f"{key} and every other key of the run are gone before their TTL, and the server has run "
            "FLUSHDB/FLUSHALL: most likely wiped by a flush.",
            base,
        )
    return unknown(
        "the init was journalled and its TTL has not run out, but no expired/evicted/del event "
        "was recorded (is the keyspace watcher running with notify-keyspace-events Exeg?)",
        **base,
    )
