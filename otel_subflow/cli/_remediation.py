"""Remediations for the CLI: the server's figures and the journal's window gathered, the fixes rendered.

The computation is pure and lives beside the verdict (``_analysis/remediation.py``); this module
does the I/O it needs, bounded and never raising: one INFO, CONFIG GET (refused by many ACLs and
managed Redis: then the fixes say so and use INFO), MEMORY USAGE of a bounded sample of state keys,
and the journal's recent window. ``diagnose --missing-state`` and the demo's report both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
from rich.console import Console
from rich.padding import Padding
from rich.text import Text

from otel_subflow import names
from otel_subflow._analysis.probe import Evidence
from otel_subflow._analysis.remediation import CONFIG_NAMES, ServerFacts, remediate
from otel_subflow._analysis.verdict import Verdict
from otel_subflow._journal import store
from otel_subflow._journal.entries import JournalEntry
from otel_subflow._redis.permissions import refusal_reason
from otel_subflow.cli._memory import scan_state_keys, template_pattern

if TYPE_CHECKING:
    from otel_subflow.lab.harness import Injection, Lab

#: INFO sections the fixes read (memory and evictions, persistence, replication, keys, deleting commands).
INFO_SECTIONS = ("server", "memory", "stats", "persistence", "replication", "keyspace", "commandstats")
#: State keys weighed with MEMORY USAGE, at most.
STATE_SAMPLE = 200
#: Records of the journal's recent window read for gaps and write rates (the export reads as many).
WINDOW_ENTRIES = 2000


def _refusal(exc: redis.RedisError) -> str:
    """Why CONFIG GET gave nothing, in words (the fixes quote it)."""
    reason = refusal_reason(exc)
    if reason is not None and reason.startswith("NOPERM"):
        return "refused to this user (ACL)"
    if reason is not None:
        return f"not available ({reason}: renamed or disabled on this server)"
    return "failed (" + (str(exc).splitlines() or [type(exc).__name__])[0][:120] + ")"


def server_facts(client: redis.Redis, key_template: str) -> ServerFacts:
    """What the state server says of itself; whatever it refuses is left out and named, never raised."""
    try:
        info: dict[str, Any] = dict(client.execute_command("INFO", *INFO_SECTIONS))  # type: ignore[no-untyped-call]
    except redis.RedisError:
        info = {}
    config: dict[str, str] = {}
    refused: str | None = None
    for name in CONFIG_NAMES:
        try:
            value = client.config_get(name).get(name)
        except redis.RedisError as exc:
            refused = _refusal(exc)
            config = {}
            break
        if value is not None:
            config[name] = str(value)
    try:
        keys = scan_state_keys(client, template_pattern(key_template), STATE_SAMPLE, 0)
    except redis.RedisError:
        keys = {"sampled": 0, "avg_bytes": None, "count": 0, "count_is_lower_bound": True}
    return ServerFacts(info=info, config=config, config_refused=refused, state_keys_sampled=keys["sampled"],
                       state_key_bytes=keys["avg_bytes"], state_keys_seen=keys["count"],
                       state_keys_complete=not keys["count_is_lower_bound"])


def journal_window(journal: redis.Redis, run_id: str | None = None) -> list[JournalEntry]:
    """The run's records and the journal's recent window (``[]`` for what cannot be read)."""
    entries: list[JournalEntry] = []
    try:
        if run_id is not None:
            entries.extend(store.read_run(journal, run_id))
        entries.extend(store.read_recent(journal, WINDOW_ENTRIES))
    except redis.RedisError:
        pass  # the fixes say what they could not compute
    return entries


def remediation_section(verdict: Verdict, evidence: Evidence, state: redis.Redis, journal: redis.Redis | None,
                        key_template: str) -> list[dict[str, Any]]:
    """``diagnose --missing-state``'s ``remediation``: the fixes as JSON-ready objects."""
    entries = journal_window(journal, evidence.run_id) if journal is not None else []
    return [fix.as_dict() for fix in remediate(verdict, evidence, entries, server_facts(state, key_template))]


def render(console: Console, fixes: Sequence[dict[str, Any]], indent: str = "  ") -> None:
    """The fixes as lines: the action, whether it would have prevented the miss, why (with its numbers)."""
    if not fixes:
        console.print(f"{indent}No remediation: the evidence supports none.")
        return
    mark = {True: "prevents this miss", False: "would not have prevented it", None: "effect unknown"}
    for fix in fixes:
        line = Text.assemble((fix["action"], "bold"), f" ({mark[fix['prevents']]}): {fix['why']}")
        console.print(Padding(line, (0, 0, 0, len(indent))), highlight=False)  # wrapped lines stay indented


# -- the demo ------------------------------------------------------------------------------


def _verdict_of(injection: Injection) -> tuple[Verdict, Evidence]:
    """The verdict the failed read's span carried, and the evidence of where it read."""
    attrs = injection.result.verdict or {}
    prefix = names.EVIDENCE_PREFIX
    said = {k[len(prefix):]: v for k, v in attrs.items() if k.startswith(prefix)}
    verdict = Verdict(injection.final_cause, injection.final_confidence, injection.summary, said)
    key = names.DEFAULT_KEY_TEMPLATE.format(run_id=injection.run_id, node_id=injection.node_id)
    db = said.get("reader_db")
    evidence = Evidence(key, injection.run_id, injection.node_id, reader_db=int(db) if db is not None else 0,
                        reader_endpoint=said.get("reader_endpoint"))
    return verdict, evidence


def add_to_demo_report(report: dict[str, Any], injections: Sequence[Injection], lab: Lab) -> None:
    """Each cause's example in the demo's report gets ``remediation``: the fixes for that very miss."""
    lab.settle()  # every worker's journal flushed: the reads that missed are in it
    try:
        window = store.read_recent(lab.journal_client, WINDOW_ENTRIES)
    except redis.RedisError:
        window = []
    for entry in report.get("failures_by_cause", {}).values():
        example = entry.get("example") or {}
        injection = next((i for i in injections if i.run_id == example.get("run_id")
                          and i.node_id == example.get("node_id")), None)
        if injection is None:
            continue
        verdict, evidence = _verdict_of(injection)
        try:
            with redis.Redis.from_url(injection.result.url, socket_timeout=5, decode_responses=True) as client:
                facts = server_facts(client, names.DEFAULT_KEY_TEMPLATE)
            run = lab.journal_entries(injection.run_id)
        except redis.RedisError:
            example["remediation"] = []
            continue
        example["remediation"] = [fix.as_dict() for fix in remediate(verdict, evidence, [*run, *window], facts)]


def render_demo(console: Console, report: dict[str, Any]) -> None:
    """The demo's remediation lines, one block per cause."""
    causes = {cause: entry["example"].get("remediation") for cause, entry in report.get("failures_by_cause", {}).items()
              if entry.get("example") and "remediation" in entry["example"]}
    if not causes:
        return
    console.print("\n[bold]Remediation[/] (numbers from each example's evidence, the journal and its server):")
    for cause, fixes in causes.items():
        console.print(f"  [bold]{cause}[/]")
        render(console, fixes or [], indent="    ")
