"""The CLI's timeline shows each operation at its own server time, not its journal flush's."""

from __future__ import annotations

from otel_subflow._journal.entries import JournalEntry
from otel_subflow.cli._timeline import timeline_rows


def test_rows_use_operation_times_not_flush_times():
    """An init with a 50 ms TTL and its expiry, both written by the same flush 120 ms after the init:
    the rows are 50 ms apart, in the order the operations happened."""
    flush_ms = 1_800_000_000_120
    init = JournalEntry(flush_ms, 0, {"op": "init", "lag_ms": "120", "key": "k", "ttl_ms": "50"})
    expiry = JournalEntry(flush_ms, 1, {"op": "expired", "lag_ms": "70", "key": "k"})
    late_miss = JournalEntry(flush_ms + 5, 0, {"op": "miss", "lag_ms": "0", "key": "k"})
    rows = timeline_rows([expiry, late_miss, init])
    assert [r["op"] for r in rows] == ["init", "expired", "miss"]
    assert [r["offset_ms"] for r in rows] == [0, 50, 125]
