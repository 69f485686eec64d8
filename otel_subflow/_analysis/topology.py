"""Who serves a key now, and who did: the replication and cluster topology as evidence, and the
``failover`` rule and a cluster's ``replica_lag`` (pure, like :mod:`verdict`'s, which asks them).

Sources: ``CLUSTER NODES`` of the reader's node (a cluster), ``INFO replication`` of the reader
(``master_replid2``: it was promoted; ``slaveN``: its replicas). Sentinel's own view is not needed:
after a failover Sentinel makes the old master a replica of the new one, which ``INFO`` lists.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from otel_subflow import names

if TYPE_CHECKING:
    from otel_subflow._analysis.probe import Evidence
    from otel_subflow._journal.entries import JournalEntry


#: ``slave0``, ``slave1``, ...: a master's replicas in INFO replication (``ip=...,port=...,state=...``).
REPLICA_LINE = re.compile(r"slave\d+")


def replicas_of(info: Mapping[str, str]) -> list[str]:
    """``host:port`` of each replica INFO replication lists."""
    out = []
    for name, value in info.items():
        if REPLICA_LINE.fullmatch(name):
            fields = dict(part.partition("=")[::2] for part in value.split(","))
            if fields.get("ip") and fields.get("port"):
                out.append(f"{fields['ip']}:{fields['port']}")
    return out


@dataclasses.dataclass(frozen=True)
class ClusterNodeView:
    """One line of ``CLUSTER NODES``: what the reader's node knows of another."""

    node_id: str
    address: str  # host:port
    flags: frozenset[str]
    master_id: str | None  # the master a replica follows
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    def serves(self, slot: int) -> bool:
        return any(low <= slot <= high for low, high in self.slots)


def parse_cluster_nodes(text: Any) -> list[ClusterNodeView]:
    """``CLUSTER NODES``: ``<id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link> <slots>...``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    nodes = []
    for line in str(text).splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        slots: list[tuple[int, int]] = []
        for item in parts[8:]:
            if item.startswith("["):
                continue  # a slot being migrated or imported
            low, _, high = item.partition("-")
            if low.isdigit():
                slots.append((int(low), int(high) if high.isdigit() else int(low)))
        nodes.append(ClusterNodeView(parts[0], parts[1].split("@", 1)[0], frozenset(parts[2].split(",")),
                                     None if parts[3] == "-" else parts[3], tuple(slots)))
    return nodes


def failover_finding(ev: Evidence, init_endpoint: str | None, base: dict[str, Any]) -> tuple[str, str] | None:
    """``(confidence, summary)`` of a ``failover`` verdict (its evidence added to ``base``), or ``None``:
    the init's master failed before replicating it, and a replica promoted since serves the key.

    Definitive where the topology proves it: the cluster marks the init's node failed, or it follows
    the reader's node now, or no longer serves the key's slot the reader serves; or (Sentinel,
    replication) the init's server is a replica of the reader's, which was promoted. A reader promoted
    at some point (``master_replid2``) with no such link is probable."""
    if init_endpoint is None or ev.info.get("role") != "master":
        return None
    replid2 = ev.info.get("master_replid2", "")
    promoted = bool(replid2) and set(replid2) != {"0"}
    proof = None
    if ev.cluster_nodes is not None and ev.key_slot is not None:
        me = next((n for n in ev.cluster_nodes if "myself" in n.flags), None)
        was = next((n for n in ev.cluster_nodes if n.address == init_endpoint), None)
        if me is not None and was is not None and me.serves(ev.key_slot):
            if "fail" in was.flags or "fail?" in was.flags:
                proof = f"the cluster marks {init_endpoint} as failed"
            elif not was.is_master and was.master_id == me.node_id:
                proof = f"{init_endpoint} is now a replica of this node"
            elif not was.serves(ev.key_slot):
                proof = f"{init_endpoint} no longer serves slot {ev.key_slot}, which this node serves now"
            base["cluster_init_node_flags"] = ",".join(sorted(was.flags))
        base["key_slot"] = ev.key_slot
    elif promoted and init_endpoint in replicas_of(ev.info):
        proof = f"{init_endpoint} is now a replica of this server"
    if proof is None and not promoted:
        return None
    base.update({"init_endpoint": init_endpoint, "reader_promoted": promoted,
                 "second_repl_offset": ev.info_int("second_repl_offset")})
    if proof is not None:
        return (names.CONFIDENCE_DEFINITIVE,
                f"The init wrote {ev.key} to the master at {init_endpoint}, which failed over before "
                f"replicating it: {proof}, and {ev.reader_endpoint} answers for the key without it.")
    return (names.CONFIDENCE_PROBABLE,
            f"The init wrote {ev.key} to {init_endpoint}; this reader's server {ev.reader_endpoint} was "
            "promoted from replica (master_replid2) and does not have it: most likely lost in a failover.")



def replica_lag_finding(ev: Evidence, last_init: JournalEntry | None, base: dict[str, Any]) -> str | None:
    """The summary of a definitive ``replica_lag`` on a cluster (its evidence added to ``base``), or ``None``:
    the cluster client reads from replicas, the key is on its master now, and its init came before the
    read started, so the replica that served the read had not received it."""
    if not ev.reads_replicas or ev.read_age_ms is None or ev.server_time_ms is None or last_init is None:
        return None
    read_at = ev.server_time_ms - ev.read_age_ms
    if last_init.op_ms >= read_at:
        return None  # the init may have come after the read: get_before_init
    base.update({"reads_replicas": True, "ms_init_before_read": round(read_at - last_init.op_ms, 1)})
    return (f"The cluster client reads from replicas; {ev.key} was written {read_at - last_init.op_ms:.0f} ms "
            "before the read and is on its master, so the replica that served the read had not received it.")
