"""The journal's records as read: :class:`JournalEntry`, parsed from the stored values (layout: ``schema.py``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from otel_subflow import names
from otel_subflow._journal.schema import (
    EXTRA_FIELDS,
    OP_RACE,
    OPS_BY_CODE,
    RS,
    US,
    Writer,
    expand_key,
    unescape,
    unpack_ids,
)


@dataclasses.dataclass
class JournalEntry:
    """One journal record, ordered by the server time it reached the journal.

    ``arrival_ms`` is the journal server's clock when the record was written;
    ``op_ms`` the server-clock time of the operation itself (arrival less the time
    the record waited in its writer's queue). ``fields`` are the record's values by
    name (``host``, ``node_id``, ``key``, ``trace_id``, ``ttl_ms``, ``cause`` ...).
    """

    arrival_ms: int
    position: int
    fields: dict[str, str]

    @property
    def stream_id(self) -> str:
        """A sortable id: ``<arrival ms>-<position>``."""
        return f"{self.arrival_ms}-{self.position}"

    @property
    def ms(self) -> int:
        return self.arrival_ms

    @property
    def op_ms(self) -> int:
        lag = self.fields.get("lag_ms", "0")
        return self.arrival_ms - (int(lag) if lag.isdigit() else 0)

    @property
    def seq(self) -> tuple[int, int]:
        return self.arrival_ms, self.position

    @property
    def op(self) -> str:
        return self.fields.get("op", "")

    # The record's values by name (``None`` when the record has none): read them here, not by string.

    @property
    def key(self) -> str | None:
        return self.fields.get("key")

    @property
    def run_id(self) -> str | None:
        return self.fields.get("run_id")

    @property
    def node_id(self) -> str | None:
        return self.fields.get("node_id")

    @property
    def host(self) -> str | None:
        return self.fields.get("host")

    @property
    def pid(self) -> str | None:
        return self.fields.get("pid")

    @property
    def trace_id(self) -> str | None:
        return self.fields.get("trace_id")

    @property
    def span_id(self) -> str | None:
        return self.fields.get("span_id")

    @property
    def db(self) -> str | None:
        return self.fields.get("db")

    @property
    def endpoint(self) -> str | None:
        return self.fields.get("endpoint")

    @property
    def server_run_id(self) -> str | None:
        return self.fields.get("server_run_id")

    @property
    def cause(self) -> str | None:
        return self.fields.get("cause")

    @property
    def confidence(self) -> str | None:
        return self.fields.get("confidence")

    @property
    def counters(self) -> str | None:
        return self.fields.get("counters")

    @property
    def source(self) -> str | None:
        return self.fields.get("source")

    @property
    def ttl_ms(self) -> int | None:
        raw = self.fields.get("ttl_ms")
        return int(raw) if raw and raw.lstrip("-").isdigit() else None


def parse_records(value: str, bucket_start: int, run_id: str | None, writers: Mapping[str, Writer | None],
                  *, with_run: bool = False, position: int = 0) -> list[JournalEntry]:
    """The records of one stored value (a run field, or the global field with ``with_run``)."""
    entries: list[JournalEntry] = []
    for raw in value.split(RS):
        if not raw:
            continue
        parts = raw.split(US)
        if with_run:
            if len(parts) < 2:
                continue
            record_run: str | None = unescape(parts.pop(1))
        else:
            record_run = run_id
        entry = _parse_one(parts, bucket_start, record_run, writers, position)
        if entry is not None:
            entries.append(entry)
            position += 1
    return entries


def _parse_one(parts: list[str], bucket_start: int, run_id: str | None, writers: Mapping[str, Writer | None],
               position: int) -> JournalEntry | None:
    if len(parts) < 8:
        return None
    offset, lag, code, node, ckey, writer_id, ttl, ids = parts[:8]
    op = OPS_BY_CODE.get(code)
    if op is None:
        return None
    try:
        arrival = bucket_start + int(offset)
    except ValueError:
        return None
    node_id = unescape(node) if node else None
    fields: dict[str, str] = {"op": op, "lag_ms": lag}
    if op == OP_RACE:  # a race is a read before the init, by definition
        fields["cause"], fields["confidence"] = names.CAUSE_GET_BEFORE_INIT, names.CONFIDENCE_DEFINITIVE
    if run_id is not None:
        fields["run_id"] = run_id
    if node_id is not None:
        fields["node_id"] = node_id
    if ckey:
        fields["key"] = expand_key(ckey, run_id, node_id)
    writer = writers.get(writer_id)
    if writer is not None:
        fields.update(writer.fields())
    elif writer_id:
        fields["writer"] = writer_id
    if ttl:
        fields["ttl_ms"] = ttl
    trace_id, span_id = unpack_ids(ids)
    if trace_id:
        fields["trace_id"], fields["span_id"] = trace_id, span_id
    for name, raw in zip(EXTRA_FIELDS[op], parts[8:], strict=False):
        value = unescape(raw)
        if name.endswith("_ids"):
            role = name[: -len("_ids")]
            t, s = unpack_ids(value)
            if t:
                fields[f"{role}_trace_id"], fields[f"{role}_span_id"] = t, s
        elif value:
            fields[name] = value
    return JournalEntry(arrival, position, fields)


def writer_ids_in(value: str, *, with_run: bool = False) -> set[str]:
    """The writer ids a stored value refers to (to fetch the ones not known yet)."""
    at = 6 if with_run else 5
    out: set[str] = set()
    for raw in value.split(RS):
        parts = raw.split(US, at + 1)
        if len(parts) > at and parts[at]:
            out.add(parts[at])
    return out
