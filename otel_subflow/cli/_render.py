"""Human output of ``diagnose``: rich tables and short sentences, from the JSON document."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from otel_subflow.cli import _remediation
from otel_subflow.cli._common import iso_ms

_SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "critical": "bold red"}
_STATUS_STYLE = {"healthy": "green", "warning": "yellow", "critical": "bold red"}


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, "-" if value is None else str(value))
    return table


def _timeline(console: Console, title: str, rows: list[dict[str, Any]]) -> None:
    """The journal as a table; Jaeger links (when given) listed below it so they stay clickable."""
    table = Table(title=title, title_justify="left")
    for column in ("server time", "+ms", "op", "host", "node", "trace id", "detail"):
        # Ids stay on one line so they can be copied; the detail wraps instead.
        table.add_column(column, no_wrap=column in ("server time", "op", "trace id"), overflow="fold")
    for row in rows:
        fields = row["fields"]
        detail = row.get("cause") or ""
        if row["op"] == "race":
            detail = fields.get("detected_by", "?")
        elif row["op"] == "init" and fields.get("ttl_ms"):
            detail = f"ttl {fields['ttl_ms']} ms"
        table.add_row(row["server_time"][11:], str(row["offset_ms"]), row["op"], row.get("host") or "-",
                      row.get("node_id") or "-", row.get("trace_id") or "-", detail)
    console.print(table)
    links = list(dict.fromkeys(row["jaeger_url"] for row in rows if row.get("jaeger_url")))
    if links:
        console.print("Traces in Jaeger:")
        for link in links:
            console.print(f"  {link}", soft_wrap=True)


def findings(console: Console, items: list[dict[str, Any]]) -> None:
    if not items:
        console.print("No findings: the configuration review found nothing that loses state.")
        return
    table = Table(title="Configuration review", title_justify="left")
    table.add_column("severity")
    table.add_column("rule")
    table.add_column("finding", overflow="fold")
    table.add_column("fix", overflow="fold")
    for item in items:
        sev = item["severity"]
        table.add_row(f"[{_SEVERITY_STYLE[sev]}]{sev}[/]", item["rule"], item["message"], item.get("fix") or "")
    console.print(table)


def health(console: Console, section: dict[str, Any]) -> None:
    ping, server, clients = section["ping"], section["server"], section["clients"]
    persistence, memory, repl = section["persistence"], section["memory"], section["replication"]
    status = section["status"]
    console.print(f"[bold]Redis health:[/] [{_STATUS_STYLE[status]}]{status}[/]")
    ratio = memory.get("used_ratio")
    rows: list[tuple[str, Any]] = [
        ("PING", f"p50 {ping['p50_ms']} ms, p99 {ping['p99_ms']} ms, max {ping['max_ms']} ms "
                 f"({ping['samples']} samples)"),
        ("server", f"redis {server['redis_version']} ({server['mode']}), run_id {server['run_id']}"),
        ("role", section["role"]),
        ("uptime", f"{server['uptime_s']} s"),
        ("persistence", {True: "on", None: "unknown (CONFIG not allowed)"}.get(
            persistence["enabled"], f"off (save {persistence['save']!r}, appendonly {persistence['appendonly']})")),
        ("clients", f"{clients['connected']} connected, {clients['blocked']} blocked, "
                    f"{clients['rejected_connections']} rejected (maxclients {clients['maxclients']})"),
        ("replication", f"replicas: {repl['connected_replicas']}"
         + (f", master {repl['master']['host']}:{repl['master']['port']} link {repl['master']['link_status']}"
            if repl.get("master") else "")),
        ("memory", f"{_bytes(memory['used_bytes'])} "
                   + (f"of {_bytes(memory['maxmemory_bytes'])}" if memory["maxmemory_bytes"] else "(no maxmemory)")
                   + (f" ({ratio:.0%})" if ratio is not None else "")
                   + f", policy {memory['maxmemory_policy']}"),
        ("keyspace events", f"{section['keyspace_events']['value']!r}"
         + (f" (missing {section['keyspace_events']['missing']!r})" if section["keyspace_events"]["missing"] else "")),
    ]
    console.print(_kv_table("", rows))
    findings(console, section["findings"])


def memory(console: Console, section: dict[str, Any]) -> None:
    ratio = section.get("used_ratio")
    ev, ex = section["evicted_keys"], section["expired_keys"]
    console.print("[bold]Memory analysis[/]")
    console.print(_kv_table("", [
        ("used", f"{_bytes(section['used_bytes'])} (peak {_bytes(section['peak_bytes'])})"),
        ("maxmemory", (_bytes(section["maxmemory_bytes"]) if section["maxmemory_bytes"] else "no limit")
         + (f", {ratio:.1%} used" if ratio is not None else "")),
        ("policy", section["maxmemory_policy"]),
        ("fragmentation", section["fragmentation_ratio"]),
        ("evicted keys", f"{ev['per_min']}/min now ({ev['delta']} in {section['sample_interval_s']} s), "
                         f"{ev['total']} since start"),
        ("expired keys", f"{ex['per_min']}/min now ({ex['delta']} in {section['sample_interval_s']} s), "
                         f"{ex['total']} since start"),
    ]))
    if section["keyspace"]:
        table = Table(title="Keyspace", title_justify="left")
        for column in ("db", "keys", "with TTL", "avg TTL ms"):
            table.add_column(column)
        for db, stats in section["keyspace"].items():
            table.add_row(db, str(stats.get("keys")), str(stats.get("expires")), str(stats.get("avg_ttl")))
        console.print(table)
    keys = section["state_keys"]
    bound = "at least " if keys["count_is_lower_bound"] else ""
    console.print(
        f"State keys matching {keys['pattern']!r}: {bound}{keys['count']}, "
        f"{_bytes(keys['sampled_bytes'])} in total, {keys['without_ttl']} without a TTL."
    )
    if keys["largest"]:
        table = Table(title="Largest state keys (MEMORY USAGE)", title_justify="left")
        table.add_column("key", overflow="fold")
        table.add_column("size")
        table.add_column("PTTL ms")
        for item in keys["largest"]:
            table.add_row(item["key"], _bytes(item["bytes"]), str(item["pttl_ms"]))
        console.print(table)
    journal = section.get("journal")
    if journal is not None:
        console.print(_journal_line(journal, section["used_bytes"]))
    console.print("[bold]MEMORY DOCTOR:[/] " + (section.get("memory_doctor") or "-").strip())


def _journal_line(journal: dict[str, Any], used_bytes: int) -> str:
    """The journal's own bytes against its budget (and against used memory when it shares the server)."""
    where = "on its own Redis" if journal["dedicated"] else "on this Redis"
    if "error" in journal:
        return f"otel-subflow journal ({journal['keys']}, {where}): not readable: {journal['error']}"
    measured = journal.get("measured_bytes")
    size = _bytes(measured if measured is not None else journal["estimated_bytes"])
    share = (f", {measured / used_bytes:.1%} of used memory"
             if measured is not None and used_bytes and not journal["dedicated"] else "")
    paused = "; PAUSED under memory pressure (records are dropped and counted)" if journal["paused"] else ""
    return (f"otel-subflow journal ({journal['keys']}, {where}): {size} in {journal['buckets']} bucket(s), "
            f"budget {_bytes(journal['budget_bytes'])}{share}{paused}")


def missing_state(console: Console, section: dict[str, Any]) -> None:
    verdict = section["verdict"]
    console.print(f"[bold]Missing state[/] {section['key']} (run {section['run_id']}, node {section['node_id']})")
    console.print(f"  cause: [bold]{verdict['cause']}[/] ({verdict['confidence']})")
    console.print(f"  {verdict['summary']}")
    evidence = {k: v for k, v in verdict["evidence"].items() if v is not None}
    if evidence:
        console.print(_kv_table("Evidence", sorted(evidence.items())))
    if "remediation" in section:
        console.print("[bold]Remediation[/] (numbers from this incident's evidence and the journal):")
        _remediation.render(console, section["remediation"])
    if section["timeline"]:
        _timeline(console, "Journal of the run (server order)", section["timeline"])
    elif section["journal_read"]:
        console.print("The run has no journal entries.")
    else:
        console.print("The run's journal could not be read.")


def races(console: Console, section: dict[str, Any]) -> None:
    console.print(f"[bold]Race conditions[/] in run {section['run_id']}: "
                  f"{section['entries']} journal entries from {len(section['hosts'])} host(s)")
    if not section["journal_found"]:
        console.print("The journal holds no record of this run (never journalled, or trimmed since).")
        return
    _timeline(console, "Timeline (server order)", section["timeline"])
    if not section["conflicts"]:
        console.print("No conflicts found.")
        return
    table = Table(title=f"Conflicts ({len(section['conflicts'])})", title_justify="left")
    table.add_column("type")
    table.add_column("key", overflow="fold")
    table.add_column("hosts")
    table.add_column("what happened", overflow="fold")
    for conflict in section["conflicts"]:
        table.add_row(conflict["type"], conflict["key"] or "-", " -> ".join(h or "?" for h in conflict["hosts"]),
                      conflict["description"])
    console.print(table)


def recent(console: Console, section: dict[str, Any]) -> None:
    console.print(f"[bold]Recent operations[/] (last {len(section['entries'])} of "
                  f"{section['records_written']} journalled)")
    if section["entries"]:
        _timeline(console, "", section["entries"])
    else:
        console.print("The journal is empty.")


def _cell(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def patterns(console: Console, section: dict[str, Any]) -> None:
    """Misses over the window: by cause and category, by host pair, by time bucket, and the fixes ranked."""
    window_s = (section["until_ms"] - section["since_ms"]) / 1000
    console.print(f"[bold]Patterns[/] over the last {window_s:g} s: {section['misses']} misses analysed, "
                  f"{section['misses_not_analysed']} counted without analysis (rate limit)")
    if not section["misses"]:
        console.print("No miss in the window.")
        return
    console.print(_kv_table("By cause", list(section["by_cause"].items())))
    console.print(_kv_table("By category", list(section["by_category"].items())))
    console.print(_table(
        "Writer -> reader (the init's host, the miss's host)", ("writer", "reader", "misses", "cross-server"),
        [(p["writer"], p["reader"], str(p["misses"]), "yes" if p["cross_server"] else "")
         for p in section["host_pairs"]]))
    console.print(_table(
        f"By time ({section['bucket_ms'] / 1000:g} s buckets; the server's figures from its counters, sampled "
        f"into the journal)", ("from", "misses", "evicted", "expired", "used memory", "avg command latency"),
        [(iso_ms(row["start_ms"]),
          ", ".join(f"{cause} {n}" for cause, n in sorted(row["misses"].items())) or "-",
          _cell(row["evicted"]), _cell(row["expired"]),
          _bytes(row["used_memory_bytes"]) if row["used_memory_bytes"] is not None else "-",
          _cell(row["avg_command_latency_us"], " us")) for row in section["buckets"]]))
    console.print(_table(
        "Fixes, by the misses each would have prevented", ("misses", "action", "what", "causes"),
        [(str(f["misses_prevented"]), f["action"], f["what"], ", ".join(f["causes"]))
         for f in section["remediations"]]))


#: The sections with a renderer of their own, in the order they are shown.
_SECTIONS: tuple[tuple[str, Callable[[Console, dict[str, Any]], None]], ...] = (
    ("redis_health", health), ("memory_analysis", memory), ("missing_state", missing_state),
    ("race_conditions", races), ("recent_operations", recent), ("patterns", patterns),
)


def diagnose(console: Console, document: dict[str, Any]) -> None:
    sections = document["sections"]
    console.print(f"otel-subflow diagnose: {document['redis_url']} at {document['generated_at']}")
    for name, render in _SECTIONS:
        if name in sections:
            render(console, sections[name])
    if "journal_stats" in sections:
        stats = sections["journal_stats"]
        console.print(f"Journal: {stats['records_written']} records written, {stats['buckets']} buckets, "
                      f"~{stats['estimated_bytes']} bytes; ops in the recent window: {stats['ops']}")
    if "runs_with_misses" in sections:
        runs = sections["runs_with_misses"]
        conflicts = sum(len(r["conflicts"]) for r in runs)
        console.print(f"Runs with misses: {len(runs)} ({conflicts} conflicts)")
    if "jaeger" in sections:
        found = sum(r["trace_count"] for r in sections["jaeger"]["runs"].values())
        console.print(f"Jaeger: {found} traces fetched for {len(sections['jaeger']['runs'])} runs")
    if "export_path" in document:
        console.print(f"Wrote {document['export_path']} (mode 0600)")
