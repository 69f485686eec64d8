"""``otel-subflow diagnose``: what is wrong with the state Redis, and why a given state went missing.

Each flag adds a section; ``--json`` prints them as one document (docs/cli.md).
The exit code is the worst finding of the health review (0 healthy, 1 warning,
2 critical), so ``diagnose --redis-health`` serves as a probe.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import redis

from otel_subflow import names
from otel_subflow._analysis.miss import analyze_state
from otel_subflow._config import SubflowConfig
from otel_subflow._journal import store
from otel_subflow._journal.schema import OP_MISS
from otel_subflow._journal.store import read_window
from otel_subflow._version import __version__
from otel_subflow.cli import _render
from otel_subflow.cli._common import (
    CliError,
    RedisTarget,
    check_writable_file,
    dump_json,
    iso,
    make_console,
    open_redis,
    redis_command_options,
    redis_errors,
    resolve_dir,
    stamped_path,
    utc_now,
    write_json,
    write_private,
)
from otel_subflow.cli._health import Finding, collect_health, exit_code, worst
from otel_subflow.cli._jaeger import JaegerClient, JaegerError
from otel_subflow.cli._memory import collect_memory, journal_memory
from otel_subflow.cli._patterns import actions_for, default_bucket_ms, parse_duration_ms
from otel_subflow.cli._patterns import collect as collect_patterns
from otel_subflow.cli._patterns_page import patterns_page
from otel_subflow.cli._remediation import remediation_section
from otel_subflow.cli._run_page import read_run_page
from otel_subflow.cli._secrets import join_url, mask_url
from otel_subflow.cli._timeline import jaeger_link, race_section, read_recent, timeline_rows

SCHEMA = "otel-subflow/diagnose/v1"
JAEGER_URL_ENV = "OTEL_SUBFLOW_JAEGER_URL"
#: How many recent global-journal entries the export scans for runs with misses.
EXPORT_SCAN_ENTRIES = 2000


def missing_state_section(
    target: RedisTarget, config: SubflowConfig, run_id: str, node_id: str, key: str | None, jaeger_url: str | None,
    journal: redis.Redis | None = None,
) -> dict[str, Any]:
    """The verdict for one state now, with its evidence, the run's journal as a timeline, and what to change."""
    verdict, evidence = analyze_state(target.client, run_id, node_id, key=key, config=config)
    rows = timeline_rows(evidence.journal, jaeger_url)
    traces = sorted({row["trace_id"] for row in rows if row["trace_id"]})
    return {
        "run_id": run_id,
        "node_id": node_id,
        "key": evidence.key,
        "verdict": verdict.as_dict(),
        "journal_read": evidence.journal_read,
        "timeline": rows,
        "trace_links": {t: jaeger_link(jaeger_url, t) for t in traces} if jaeger_url else {},
        "remediation": remediation_section(verdict, evidence, target.client, journal, config.key_template),
    }


def recent_section(journal: redis.Redis, limit: int, jaeger_url: str | None) -> dict[str, Any]:
    entries, total = read_recent(journal, limit)
    return {
        "journal": names.JOURNAL_KEY_PREFIX + "*",
        "limit": limit,
        "records_written": total,
        "entries": timeline_rows(entries, jaeger_url),
    }


def patterns_section(journal: redis.Redis, window_ms: int, bucket_ms: int) -> dict[str, Any]:
    """The window's misses by cause, category, host pair and time bucket, and the fixes ranked."""
    seconds, micros = journal.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    since_ms = now_ms - window_ms
    return collect_patterns(read_window(journal, since_ms), since_ms, now_ms, bucket_ms, actions_for)


def journal_stats(journal: redis.Redis) -> dict[str, Any]:
    """How much the journal holds: its footprint, records by operation, ops in its recent window."""
    entries, total = read_recent(journal, EXPORT_SCAN_ENTRIES)
    usage = store.read_usage(journal)
    return {
        "journal": names.JOURNAL_KEY_PREFIX + "*",
        "records_written": total,
        "records_by_op": store.read_counts(journal),
        "buckets": usage.buckets,
        "estimated_bytes": usage.estimated_bytes,
        "measured_bytes": usage.measured_bytes,
        "window_entries": len(entries),
        "window_first_id": entries[0].stream_id if entries else None,
        "window_last_id": entries[-1].stream_id if entries else None,
        "ops": dict(Counter(e.op for e in entries)),
        "hosts": dict(Counter(e.fields.get("host", "?") for e in entries)),
        "miss_causes": dict(Counter(e.fields.get("cause", "?") for e in entries if e.op == OP_MISS)),
    }


def runs_with_misses(journal: redis.Redis, max_runs: int) -> list[tuple[str, list[str]]]:
    """Runs with a miss in the global journal's recent window, newest first, with the missed nodes."""
    entries, _ = read_recent(journal, EXPORT_SCAN_ENTRIES)
    runs: dict[str, list[str]] = {}
    for entry in reversed(entries):
        run_id = entry.fields.get("run_id")
        if entry.op != OP_MISS or not run_id:
            continue
        if run_id not in runs:
            if len(runs) >= max_runs:
                continue
            runs[run_id] = []
        node = entry.fields.get("node_id")
        if node and node not in runs[run_id]:
            runs[run_id].append(node)
    return list(runs.items())


def jaeger_traces(
    jaeger: JaegerClient, journal: redis.Redis, run_ids: list[str], service: str | None, limit: int
) -> dict[str, Any]:
    """The traces of each run, searched from an hour before its first journal entry until now."""
    out: dict[str, Any] = {"jaeger_url": jaeger.masked, "service": service, "runs": {}}
    now_us = int(time.time() * 1_000_000)
    for run_id in run_ids:
        first = store.read_run(journal, run_id)
        start_ms = first[0].op_ms if first else int(time.time() * 1000) - 24 * 3600 * 1000
        start_us = (start_ms - 3600 * 1000) * 1000
        try:
            traces = jaeger.traces_of_run(run_id, start_us, now_us, service=service, limit=limit)
            out["runs"][run_id] = {"trace_count": len(traces), "traces": traces, "error": None}
        except JaegerError as exc:
            out["runs"][run_id] = {"trace_count": 0, "traces": [], "error": str(exc)}
    return out


def _export_runs(sections: dict[str, Any], target: RedisTarget, journal: redis.Redis, config: SubflowConfig,
                 max_runs: int, jaeger_url: str | None) -> None:
    """Journal stats, and each recent run with a miss: its timeline, conflicts and a verdict per missed node."""
    sections["journal_stats"] = journal_stats(journal)
    runs = []
    for missed_run, nodes in runs_with_misses(journal, max_runs):
        run = race_section(journal, missed_run, jaeger_url)
        run["missing_states"] = [
            {"node_id": node, "verdict": analyze_state(target.client, missed_run, node, config=config)[0].as_dict()}
            for node in nodes
        ]
        runs.append(run)
    sections["runs_with_misses"] = runs


def _check_jaeger_url(url: str) -> None:
    """An http(s) URL with a host, or a one-line error naming it masked (before any work)."""
    try:
        join_url(url)
        ok = url.strip().lower().startswith(("http://", "https://"))
    except ValueError:
        ok = False
    if not ok:
        raise click.BadParameter(f"{mask_url(url)} is not an http(s) URL with a host", param_hint="'--jaeger-url'")


@contextlib.contextmanager
def _progress(enabled: bool, message: str) -> Iterator[None]:
    """A spinner on stderr for steps that take a while (only on a terminal)."""
    console = make_console(stderr=True)
    if enabled and console.is_terminal:
        with console.status(message):
            yield
    else:
        yield


@click.command("diagnose")
@redis_command_options
@click.option("--redis-health", is_flag=True, help="Latency, identity, clients, replication, config review.")
@click.option("--memory-analysis", is_flag=True, help="Memory, eviction/expiry rates, keyspace, state keys.")
@click.option("--missing-state", is_flag=True, help="Why one state is missing now (needs --run-id, --node-id).")
@click.option("--race-conditions", is_flag=True, help="The run's timeline and its conflicts (needs --run-id).")
@click.option("--recent-operations", is_flag=True, help="The latest entries of the global journal.")
@click.option("--patterns", is_flag=True,
              help="Misses over a window: by cause, category, host pair and time, and the fixes ranked.")
@click.option("--since", "since", default="24h", show_default=True, metavar="DURATION",
              help="The --patterns window (e.g. 90s, 15m, 24h, 2d), up to now.")
@click.option("--bucket", "bucket", default=None, metavar="DURATION",
              help="The --patterns time bucket [default: about a twelfth of the window].")
@click.option("--export-traces", is_flag=True, help="Write everything to subflow_diagnostics_<timestamp>.json.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write one self-contained HTML page here: the run's timeline (with --run-id), or the "
                   "patterns (with --patterns).")
@click.option("--run-id", help="Run id (for --missing-state, --race-conditions, --html).")
@click.option("--node-id", help="Node id (for --missing-state).")
@click.option("--key", "state_key", help="The state key, when it is not built from OTEL_SUBFLOW_KEY_TEMPLATE.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="Entries for --recent-operations.")
@click.option("--jaeger-url", envvar=JAEGER_URL_ENV,
              help=f"Jaeger query base URL for trace links (env {JAEGER_URL_ENV}).")
@click.option("--jaeger-service", help="Service to search in Jaeger (default: every service Jaeger knows).")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="File for --export-traces (default: <output-dir>/subflow_diagnostics_<timestamp>.json).")
@click.option("--samples", type=click.IntRange(1, 1000), default=10, show_default=True, help="PINGs for latency.")
@click.option("--sample-interval", type=click.FloatRange(0.0, 60.0), default=1.0, show_default=True,
              help="Seconds between the two INFO samples of --memory-analysis.")
@click.option("--scan-limit", type=click.IntRange(1, 1_000_000), default=1000, show_default=True,
              help="Most state keys SCANned and weighed by --memory-analysis.")
@click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True, help="Largest state keys shown.")
@click.option("--max-runs", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="Runs with misses put in an export.")
@click.pass_context
def diagnose(
    ctx: click.Context,
    redis_url: str,
    as_json: bool,
    output_dir: Path | None,
    redis_health: bool,
    memory_analysis: bool,
    missing_state: bool,
    race_conditions: bool,
    recent_operations: bool,
    patterns: bool,
    since: str,
    bucket: str | None,
    export_traces: bool,
    html_path: Path | None,
    run_id: str | None,
    node_id: str | None,
    state_key: str | None,
    limit: int,
    jaeger_url: str | None,
    jaeger_service: str | None,
    output_path: Path | None,
    samples: int,
    sample_interval: float,
    scan_limit: int,
    top: int,
    max_runs: int,
    timeout: float,
) -> None:
    """Diagnose the state Redis. Without a section flag, runs --redis-health.

    \b
    Examples:
      otel-subflow diagnose --redis-health
      otel-subflow diagnose --missing-state --run-id r-42 --node-id n-7 --jaeger-url http://localhost:16686
      otel-subflow diagnose --race-conditions --run-id r-42 --json
      otel-subflow diagnose --run-id r-42 --html run-r-42.html --jaeger-url http://localhost:16686
      otel-subflow diagnose --export-traces --output-dir /tmp/incident
    """
    if missing_state and not (run_id and node_id):
        raise click.UsageError("--missing-state needs --run-id and --node-id")
    if race_conditions and not run_id:
        raise click.UsageError("--race-conditions needs --run-id")
    if output_path is not None and not export_traces:
        raise click.UsageError("--output is only used with --export-traces")
    if html_path is not None:
        if not run_id and not patterns:
            raise click.UsageError("--html needs --run-id (the run view) or --patterns")
        if run_id and patterns:
            raise click.UsageError("--html writes one page: give --run-id (the run view) or --patterns, not both")
        check_writable_file(html_path)
    if jaeger_url:
        _check_jaeger_url(jaeger_url)
    try:
        window_ms = parse_duration_ms(since)
        bucket_ms = parse_duration_ms(bucket) if bucket else default_bucket_ms(window_ms)
    except ValueError as exc:
        raise click.UsageError(f"--since/--bucket: {exc}") from None
    if not any((redis_health, memory_analysis, missing_state, race_conditions, recent_operations, patterns,
                export_traces, html_path)):
        redis_health = True
    if export_traces:
        redis_health = memory_analysis = recent_operations = True
        race_conditions = race_conditions or bool(run_id)
        missing_state = missing_state or bool(run_id and node_id)
        if output_path is None:
            directory = resolve_dir(output_dir)
            output_path = stamped_path(directory, "subflow_diagnostics", utc_now())
        check_writable_file(output_path)

    sections: dict[str, Any] = {}
    findings: list[Finding] = []
    with open_redis(redis_url, timeout) as (config, target, journal), redis_errors(target):
        started = utc_now()
        if redis_health:
            with _progress(not as_json, "Checking Redis health..."):
                sections["redis_health"], health_findings = collect_health(target.client, samples)
            findings.extend(health_findings)
        if memory_analysis:
            with _progress(not as_json, f"Sampling INFO over {sample_interval:g} s and scanning state keys..."):
                sections["memory_analysis"] = collect_memory(
                    target.client, config.key_template, interval_s=sample_interval, scan_limit=scan_limit, top=top
                )
                dedicated = bool(config.journal_url)
                sections["memory_analysis"]["journal"] = journal_memory(
                    journal, config, dedicated=dedicated,
                    maxmemory=None if dedicated else sections["memory_analysis"]["maxmemory_bytes"])
        if missing_state and run_id is not None and node_id is not None:  # (checked above)
            sections["missing_state"] = missing_state_section(target, config, run_id, node_id, state_key, jaeger_url,
                                                              journal)
        if race_conditions and run_id is not None:
            sections["race_conditions"] = race_section(journal, run_id, jaeger_url)
        if recent_operations:
            sections["recent_operations"] = recent_section(journal, limit, jaeger_url)
        if patterns:
            with _progress(not as_json, f"Reading the journal's last {since}..."):
                sections["patterns"] = patterns_section(journal, window_ms, bucket_ms)
        if html_path is not None and patterns:
            write_private(html_path, patterns_page(sections["patterns"], redis_url=target.masked,
                                                   generated_at=iso(started)))
        if html_path is not None and run_id is not None:  # (checked above)
            write_private(html_path, read_run_page(target.client, journal, config, run_id, jaeger_url=jaeger_url,
                                                   redis_url=target.masked, generated_at=iso(started)))
        if export_traces:
            with _progress(not as_json, "Collecting runs with misses..."):
                _export_runs(sections, target, journal, config, max_runs, jaeger_url)
            if jaeger_url:
                with _progress(not as_json, "Fetching traces from Jaeger..."):
                    sections["jaeger"] = jaeger_traces(
                        JaegerClient(jaeger_url, timeout), journal,
                        [r["run_id"] for r in sections["runs_with_misses"]], jaeger_service, 20,
                    )
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "version": __version__,
        "generated_at": iso(started),
        "redis_url": target.masked,
        "status": worst(findings),
        "exit_code": exit_code(findings),
        "findings": [f.as_dict() for f in findings],
        "sections": sections,
    }
    if export_traces and output_path is not None:
        document["export_path"] = str(output_path)
        write_json(output_path, document)
    if html_path is not None:
        document["html_path"] = str(html_path)

    if as_json:
        click.echo(dump_json(document))
    else:
        _render.diagnose(make_console(), document)
        jaeger_errors = [
            r["error"] for r in sections.get("jaeger", {}).get("runs", {}).values() if r.get("error")
        ]
        if jaeger_errors:
            click.echo(f"warning: {jaeger_errors[0]}", err=True)
        if html_path is not None:
            what = "the patterns page" if patterns else "the run view"
            click.echo(f"Wrote {what} {html_path} (mode 0600; open it in a browser)")
    ctx.exit(document["exit_code"])


__all__ = ["CliError", "diagnose"]
