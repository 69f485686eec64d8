"""The journal: what happened to each run's state, in the Redis server's order.

- ``schema``: key names, operations and the packed record layout (the one home of each);
- ``store``: the write script, and the reads the analysis and the CLI make;
- ``writer``: the in-process queue and background flusher;
- ``races``: read-before-init races, in process and across processes;
- ``location``: where the journal lives, the registry of journals, their metrics.
"""

from otel_subflow._journal.location import (
    JOURNAL_DB,
    all_journals,
    flush_journals,
    journal_for,
    journal_target,
    reset_journals,
)
from otel_subflow._journal.schema import (
    OP_DEL,
    OP_EVICTED,
    OP_EXPIRED,
    OP_GAP,
    OP_INIT,
    OP_MISS,
    OP_RACE,
    OP_SUPPRESSED,
    TOMBSTONE_OPS,
    JournalEntry,
)
from otel_subflow._journal.writer import RACE_CANDIDATE_CAUSES, Journal, JournalStats

__all__ = [
    "JOURNAL_DB",
    "OP_DEL",
    "OP_EVICTED",
    "OP_EXPIRED",
    "OP_GAP",
    "OP_INIT",
    "OP_MISS",
    "OP_RACE",
    "OP_SUPPRESSED",
    "RACE_CANDIDATE_CAUSES",
    "TOMBSTONE_OPS",
    "Journal",
    "JournalEntry",
    "JournalStats",
    "all_journals",
    "flush_journals",
    "journal_for",
    "journal_target",
    "reset_journals",
]
