"""``otel-subflow demo``: an incident reproduced and diagnosed in a minute.

With no ``--redis-url`` it starts its own redis-servers in a temp dir (a state
server, a second one, an evicting one, a replica and a journal server) and
removes them on exit, Ctrl-C included. Worker processes with different host
identities run a decorated workflow service while the lab injects failures.
Telemetry goes to ``OTEL_EXPORTER_OTLP_ENDPOINT`` when set (the stack), else to
OTLP-JSON files that ``scripts/replay_telemetry.sh`` (or the contrib collector's
``otlpjsonfile`` receiver) loads into the stack later.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from otel_subflow.cli._common import CliError, iso, resolve_dir, utc_now
from otel_subflow.cli._remediation import add_to_demo_report as add_remediation
from otel_subflow.cli._remediation import render_demo as render_remediation
from otel_subflow.cli._run_page import write_demo_pages
from otel_subflow.cli._secrets import join_url, mask_url, scrub, url_secrets
from otel_subflow.lab.harness import Injection, Lab
from otel_subflow.lab.process import RedisServerError
from otel_subflow.lab.scenarios import DESCRIPTIONS, EXTERNAL_SAFE, SCENARIOS
from otel_subflow.lab.worker import EXPORT_ENV
from otel_subflow.lab.workload import DEFAULT_MIX, build_report, run_workload

SERVICE_NAME = "subflow-demo"


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _list_scenarios() -> None:
    table = Table(title="otel-subflow demo scenarios", show_lines=False)
    table.add_column("name")
    table.add_column("cause it produces")
    table.add_column("in default mix")
    table.add_column("with --redis-url")
    for name in SCENARIOS:
        table.add_row(name, DESCRIPTIONS.get(name, ""), "yes" if name in DEFAULT_MIX else "",
                      "yes" if name in EXTERNAL_SAFE else "")
    Console().print(table)


def _render(console: Console, report: dict[str, Any]) -> None:
    console.print()
    console.rule("[bold]otel-subflow demo: root-cause report")
    console.print(
        f"{report['runs']} workflow runs ({report['healthy_runs']} healthy), {report['reads']} state reads, "
        f"[bold red]{report['failures']} SUBFLOW STATE GET FAILED[/] in {report['elapsed_s']} s"
    )
    causes = Table(title="Failures by cause (what otel-subflow said, in the failed read's own span)")
    causes.add_column("cause")
    causes.add_column("n", justify="right")
    causes.add_column("confidence")
    causes.add_column("example: summary and evidence")
    for cause, entry in report["failures_by_cause"].items():
        example = entry["example"]
        evidence = ", ".join(f"{k}={v}" for k, v in list(example["evidence"].items())[:6])
        causes.add_row(
            cause, str(entry["count"]), ", ".join(f"{k} {v}" for k, v in entry["confidence"].items()),
            f"{example['summary']}\n[dim]{example['writer']} wrote, {example['reader']} read; run "
            f"{example['run_id']}; {evidence}[/]",
        )
    console.print(causes)

    matrix = report["confusion_matrix"]
    columns = sorted({c for row in matrix.values() for c in row})
    table = Table(title="Confusion matrix: injected (rows) vs verdict (columns)")
    table.add_column("injected \\ verdict")
    for column in columns:
        table.add_column(column, justify="right")
    for truth in sorted(matrix):
        table.add_row(truth, *[str(matrix[truth].get(c, "")) for c in columns])
    console.print(table)
    console.print(
        f"accuracy {report['accuracy']:.0%}; definitive verdicts {report['definitive']} at "
        f"{report['definitive_accuracy']:.0%} accuracy"
    )
    ttv = report["time_to_verdict_ms"]
    console.print(
        f"time from failure to verdict: analysis p50 {ttv['analysis_p50']} ms, p99 {ttv['analysis_p99']} ms "
        f"(the whole failed read, analysis included: p50 {ttv['failed_read_p50']} ms)"
    )
    render_remediation(console, report)
    console.print("\n[bold]Dig further[/] (while the servers run; see --keep-servers):")
    for command in report["dig_further"]:
        console.print(f"  {command}", soft_wrap=True)
    if report["jaeger_search"]:
        console.print("\n[bold]Failed runs in Jaeger:[/]")
        for run_id, url in report["jaeger_search"].items():
            console.print(f"  {run_id}: {url}", soft_wrap=True)
    console.print(f"\ntelemetry: {report['telemetry']}")
    if report.get("run_pages"):
        console.print("\n[bold]Run views[/] (one page per failed run; open in a browser):")
        for path in report["run_pages"].values():
            console.print(f"  {path}", soft_wrap=True, highlight=False)


@click.command()
@click.option("--redis-url", default=None, help="Use this Redis instead of embedded servers (safe scenarios only).")
@click.option("--scenario", "scenarios", multiple=True, metavar="NAME",
              help="Inject only this failure mode (repeatable). See --list-scenarios.")
@click.option("--list-scenarios", is_flag=True, help="Name every failure mode and exit.")
@click.option("--runs", type=click.IntRange(1, 100_000), default=None, help="Workflow runs to execute [default: 40].")
@click.option("--duration", type=click.FloatRange(min=0.1), default=None,
              help="Run for this many seconds instead of a number of runs.")
@click.option("--workers", type=click.IntRange(2, 8), default=3, show_default=True,
              help="Worker processes, each with its own host identity.")
@click.option("--seed", type=int, default=None, help="Seed of the random mix (reproducible runs).")
@click.option("--telemetry-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where OTLP-JSON files go when no OTEL_EXPORTER_OTLP_ENDPOINT is set "
                   "[default: ./subflow-demo-telemetry].")
@click.option("--html-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("subflow-demo-runs"),
              show_default=True, help="Where the run view of each failed run is written (one HTML page each).")
@click.option("--keep-servers", is_flag=True, help="Keep the embedded servers until Ctrl-C, to dig further.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def demo(redis_url: str | None, scenarios: tuple[str, ...], list_scenarios: bool, runs: int | None,
         duration: float | None, workers: int, seed: int | None, telemetry_dir: Path | None,
         html_dir: Path, keep_servers: bool, as_json: bool) -> None:
    """Reproduce a missing-state incident and show why each read failed."""
    if list_scenarios:
        _list_scenarios()
        return
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise CliError(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")
    chosen = list(scenarios) or list(DEFAULT_MIX)
    if redis_url is not None:
        unsafe = [s for s in chosen if s not in EXTERNAL_SAFE]
        if scenarios and unsafe:
            raise CliError(f"scenario {unsafe[0]!r} needs the demo's own servers (it restarts, flushes or fills "
                           "Redis); drop --redis-url")
        chosen = [s for s in chosen if s in EXTERNAL_SAFE] or sorted(EXTERNAL_SAFE)
    if runs is None and duration is None:
        runs = 40
    html_dir = resolve_dir(html_dir).resolve()

    service_name = os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME
    env: dict[str, str] = {"OTEL_SERVICE_NAME": service_name}
    jaeger_url: str | None = None
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        env[EXPORT_ENV] = "otlp"
        telemetry = f"exported over OTLP to {mask_url(os.environ['OTEL_EXPORTER_OTLP_ENDPOINT'])}"
        jaeger_url = os.environ.get("OTEL_SUBFLOW_JAEGER_URL") or "http://localhost:16686"
        try:
            join_url(jaeger_url)
        except ValueError as exc:
            raise CliError(f"invalid OTEL_SUBFLOW_JAEGER_URL {mask_url(jaeger_url)}: {exc}") from None
    else:
        folder = (telemetry_dir or Path("subflow-demo-telemetry")).resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder):
                pass  # writable?
        except OSError as exc:
            raise CliError(f"cannot write telemetry to {folder}: {exc.strerror or exc}") from None
        try:
            has_files = importlib.util.find_spec("opentelemetry.exporter.otlp.json.file") is not None
        except ModuleNotFoundError:  # a parent package is missing too
            has_files = False
        if not has_files:
            raise CliError("writing the demo's telemetry to files needs the demo extra: "
                           "pip install 'otel-subflow[demo]' (or set OTEL_EXPORTER_OTLP_ENDPOINT to export over OTLP)")
        env[EXPORT_ENV] = f"file:{folder}"
        telemetry = (f"OTLP-JSON files in {folder} (*.traces.jsonl, *.metrics.jsonl, *.logs.jsonl); "
                     "replay them into the stack with scripts/replay_telemetry.sh (docs/demo.md)")

    err = Console(stderr=True)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    secrets = url_secrets(redis_url) if redis_url else []
    lab = Lab(workers=workers, seed=seed, state_url=redis_url, worker_env=env)
    try:
        with err.status("starting redis-servers and worker processes..."):
            try:
                lab.start()
            except RedisServerError as exc:
                raise CliError(scrub(str(exc).splitlines()[0], secrets)) from None
            except (OSError, ConnectionError) as exc:
                raise CliError(f"cannot start the demo: {scrub(str(exc), secrets)}") from None
            except Exception as exc:  # noqa: BLE001 - redis errors from an external --redis-url
                raise CliError(f"cannot use {mask_url(redis_url or '')}: {type(exc).__name__}") from None
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=err,
                      disable=not err.is_terminal) as bar:
            task = bar.add_task("workflow runs", total=runs, last="")

            def progress(done: int, total: int | None, injection: Injection | None) -> None:
                last = f"injected {injection.scenario} -> {injection.final_cause}" if injection else ""
                bar.update(task, completed=done, last=last)

            result = run_workload(lab, runs=runs, duration_s=duration, scenarios=chosen, progress=progress)
        state_url = mask_url(lab.state.url())
        report = build_report(result, journal_url=lab.journal_server.url(), jaeger_url=jaeger_url,
                              service_name=service_name, telemetry=telemetry)
        add_remediation(report, result.injections, lab)
        report["run_pages"] = {run: str(path) for run, path in write_demo_pages(
            lab, result.injections, html_dir, jaeger_url=jaeger_url, redis_url=state_url,
            generated_at=iso(utc_now())).items()}
        if as_json:
            click.echo(json.dumps(report, indent=2, default=str))
        else:
            _render(Console(), report)
        if keep_servers and redis_url is None:
            err.print(f"servers kept: state {state_url}; press Ctrl-C to stop them")
            signal.pause()
    except KeyboardInterrupt:
        err.print("interrupted: stopping the demo's servers and workers")
    finally:
        lab.stop()
        signal.signal(signal.SIGTERM, previous)


__all__ = ["demo"]
