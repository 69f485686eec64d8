"""No credential in any CLI output or file: Redis, journal and Jaeger URLs with user:password, vendor keys.

Every check searches the literal secrets in everything a command printed (stdout,
stderr) and every file it wrote, and also asserts that the masked URL or the
credential-free link IS there, so a test cannot pass because nothing was shown.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import stat
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from rich.console import Console

from otel_subflow import flush_journals, names
from otel_subflow._config import SubflowConfig, set_config
from otel_subflow._runtime import runtime
from otel_subflow.cli._jaeger import JaegerClient
from otel_subflow.cli._secrets import (
    MASK,
    basic_auth_header,
    join_url,
    mask_url,
    mask_urls_in,
    scrub,
    url_secrets,
)
from otel_subflow.cli.demo import _render as render_demo
from otel_subflow.lab.harness import Injection
from otel_subflow.lab.process import free_port
from otel_subflow.lab.servers import RedisServer
from otel_subflow.lab.worker import GetResult
from otel_subflow.lab.workload import WorkloadResult, build_report
from otel_subflow.stack import Binaries, LocalStack, StackError, StackPorts
from tests.cli_helpers import run_cli
from tests.service import get_state, initialize_state

REDIS_USER = "app-user"
REDIS_PW = "rEd1s-pw-Qz81"
JOURNAL_PW = "j0urnal-pw-Kx27"
JAEGER_USER = "jaeger-user"
JAEGER_PW = "jAeg3r-pw-Tt94"
VENDOR_KEY = "vend0r-key-Mm63"
VENDOR_PW = "vend0r-pw-Hh55"
SECRETS = (REDIS_PW, JOURNAL_PW, JAEGER_PW, VENDOR_KEY, VENDOR_PW)

RUN_SAME = "run-secrets-same"  # journal on the state server
RUN_APART = "run-secrets-apart"  # journal on its own server (OTEL_SUBFLOW_JOURNAL_URL)


def leaks(texts: Mapping[str, str]) -> list[str]:
    """Where a secret appears (empty when none does)."""
    return [f"{where}: {secret}" for where, text in texts.items() for secret in SECRETS if secret in text]


def files_in(directory: Path) -> dict[str, str]:
    return {str(p): p.read_text(errors="replace") for p in sorted(directory.rglob("*")) if p.is_file()}


# -- the helper -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "masked"), [
    (f"redis://{REDIS_USER}:{REDIS_PW}@db:6379/0", f"redis://{REDIS_USER}:***@db:6379/0"),
    (f"redis://:{REDIS_PW}@db:6379/0", "redis://:***@db:6379/0"),
    (f"rediss://{REDIS_USER}:{REDIS_PW}@db:6380/3?ssl_cert_reqs=none",
     f"rediss://{REDIS_USER}:***@db:6380/3?ssl_cert_reqs=none"),
    (f"unix://{REDIS_USER}:{REDIS_PW}@/run/redis.sock?db=1", f"unix://{REDIS_USER}:***@/run/redis.sock?db=1"),
    (f"unix:///run/redis.sock?db=1&password={REDIS_PW}", "unix:///run/redis.sock?db=1&password=***"),
    (f"redis://db/0?username=u&password={REDIS_PW}", "redis://db/0?username=u&password=***"),
    (f"http://{JAEGER_USER}:{JAEGER_PW}@jaeger:16686/", f"http://{JAEGER_USER}:***@jaeger:16686/"),
    (f"https://{VENDOR_KEY}@otlp.vendor.example/v1", "https://***@otlp.vendor.example/v1"),
    (f"https://otlp.vendor.example/?api_key={VENDOR_KEY}&region=eu", "https://otlp.vendor.example/?api_key=***&region=eu"),
    (f"https://h/cb#access_token={VENDOR_KEY}", "https://h/cb#access_token=***"),
    (f"redis://{REDIS_USER}:{REDIS_PW}%40x@db/0", f"redis://{REDIS_USER}:***@db/0"),  # percent-encoded
    (f"redis://:{REDIS_PW}@x@db/0", "redis://:***@db/0"),  # an unencoded "@" in the password
    (f"{REDIS_USER}:{REDIS_PW}@db:6379", f"{REDIS_USER}:***@db:6379"),  # no scheme
    ("redis://app@db/0", "redis://app@db/0"),  # an ACL user name alone is not a secret
    ("redis://db:6379/0", "redis://db:6379/0"),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert not leaks({url: mask_url(url)})
    for secret in SECRETS:
        if secret in url:
            assert any(secret in s for s in url_secrets(url)), url


def test_urls_inside_longer_text_are_masked() -> None:
    text = (f"OTEL_SUBFLOW_JOURNAL_URL=redis://{REDIS_USER}:{JOURNAL_PW}@j:6379/0 otel-subflow diagnose "
            f"--redis-url 'rediss://:{REDIS_PW}@db:6380/1' (see http://{JAEGER_USER}:{JAEGER_PW}@jaeger/trace/ab).")
    masked = mask_urls_in(text)
    assert not leaks({"text": masked})
    assert masked == (f"OTEL_SUBFLOW_JOURNAL_URL=redis://{REDIS_USER}:***@j:6379/0 otel-subflow diagnose "
                      f"--redis-url 'rediss://:***@db:6380/1' (see http://{JAEGER_USER}:***@jaeger/trace/ab).")
    # Known secrets in someone else's message, URL or not.
    message = f"AUTH failed for {REDIS_PW}\nat redis://u:{JOURNAL_PW}@h"
    assert scrub(message, [REDIS_PW]) == "AUTH failed for *** at redis://u:***@h"
    assert scrub(message, [REDIS_PW], one_line=False) == "AUTH failed for ***\nat redis://u:***@h"


def test_links_carry_no_credentials_and_still_work() -> None:
    """A link keeps scheme, host, port, path and harmless parameters; userinfo and secret parameters go."""
    base = f"https://{JAEGER_USER}:{JAEGER_PW}@jaeger.example:16686/jaeger/?token={VENDOR_KEY}&orgId=3"
    assert join_url(base, "/trace/abc") == "https://jaeger.example:16686/jaeger/trace/abc?orgId=3"
    assert join_url(base, "/search", {"service": "s", "tags": '{"a":"b c"}'}) == (
        "https://jaeger.example:16686/jaeger/search?orgId=3&service=s&tags=%7B%22a%22%3A%22b%20c%22%7D")
    # For a request (never shown) the secret parameter stays, the userinfo becomes a header.
    assert VENDOR_KEY in join_url(base, "/api/services", keep_secret_params=True)
    assert JAEGER_PW not in join_url(base, "/api/services", keep_secret_params=True)
    header = basic_auth_header(base)["Authorization"]
    assert base64.b64decode(header.removeprefix("Basic ")).decode() == f"{JAEGER_USER}:{JAEGER_PW}"
    for bad in ("jaeger:16686", "http://[::1", f"http://u:{JAEGER_PW}@h:port"):
        with pytest.raises(ValueError) as info:
            join_url(bad)
        assert JAEGER_PW not in str(info.value)


# -- servers: a password-protected state Redis, a journal Redis, a Jaeger behind basic auth ------------


@dataclasses.dataclass
class Setup:
    state: RedisServer
    journal: RedisServer
    jaeger_port: int

    @property
    def state_url(self) -> str:
        return f"redis://{REDIS_USER}:{REDIS_PW}@127.0.0.1:{self.state.port}/0"

    @property
    def state_masked(self) -> str:
        return f"redis://{REDIS_USER}:***@127.0.0.1:{self.state.port}/0"

    @property
    def journal_url(self) -> str:
        return f"redis://{REDIS_USER}:{JOURNAL_PW}@127.0.0.1:{self.journal.port}/0"

    @property
    def jaeger_url(self) -> str:
        return f"http://{JAEGER_USER}:{JAEGER_PW}@127.0.0.1:{self.jaeger_port}"

    @property
    def jaeger_public(self) -> str:
        return f"http://127.0.0.1:{self.jaeger_port}"


class _JaegerBehindBasicAuth(BaseHTTPRequestHandler):
    """Jaeger's query API behind a proxy that wants basic auth: a trace for every run asked about."""

    expected = "Basic " + base64.b64encode(f"{JAEGER_USER}:{JAEGER_PW}".encode()).decode()
    authorized_queries: list[str] = []

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="jaeger"')
            self.end_headers()
            return
        url = urllib.parse.urlsplit(self.path)
        self.authorized_queries.append(self.path)
        if url.path == "/api/services":
            body: dict[str, Any] = {"data": ["svc"]}
        else:
            params = dict(urllib.parse.parse_qsl(url.query))
            run_id = json.loads(params["tags"])[names.ATTR_RUN_ID]
            body = {"data": [{"traceID": f"trace-of-{run_id}", "spans": []}]}
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


def _seed(client: redis.Redis, run_id: str, journal_url: str | None) -> None:
    """Through the decorators (the journal's format is theirs): an init, a hit and a miss of another node."""
    runtime.reset()
    set_config(SubflowConfig.from_env() if journal_url is None
               else dataclasses.replace(SubflowConfig.from_env(), journal_url=journal_url))
    try:
        assert initialize_state(client, run_id, "n1", "state", ttl_ms=600_000)
        assert get_state(client, run_id, "n1") is not None
        assert get_state(client, run_id, "n2") is None
        assert flush_journals(5.0)
    finally:
        runtime.reset()


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    jaeger = ThreadingHTTPServer(("127.0.0.1", 0), _JaegerBehindBasicAuth)
    thread = threading.Thread(target=jaeger.serve_forever, daemon=True)
    thread.start()
    with RedisServer(password=REDIS_PW) as state, RedisServer(password=JOURNAL_PW) as journal:
        for server, password in ((state, REDIS_PW), (journal, JOURNAL_PW)):
            admin = server.client()
            admin.acl_setuser(REDIS_USER, enabled=True, passwords=[f"+{password}"], categories=["+@all"],
                              keys=["*"], channels=["*"])
            admin.close()
        found = Setup(state, journal, int(jaeger.server_address[1]))
        client = redis.Redis.from_url(found.state_url)
        _seed(client, RUN_SAME, None)
        _seed(client, RUN_APART, found.journal_url)
        client.close()
        yield found
    jaeger.shutdown()
    jaeger.server_close()


# -- diagnose and monitor ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "env"])
def test_diagnose_and_monitor_show_no_credential(setup: Setup, tmp_path: Path, how: str) -> None:
    """Every section, human and JSON, the export file and the monitor's files: masked URLs, clean links.

    ``flag``: --redis-url, the journal on the state server. ``env``: OTEL_SUBFLOW_REDIS_URL and a journal
    of its own (OTEL_SUBFLOW_JOURNAL_URL), the Jaeger URL from OTEL_SUBFLOW_JAEGER_URL.
    """
    out_dir = tmp_path / "out"
    if how == "flag":
        run_id, redis_args, jaeger_args = RUN_SAME, ["--redis-url", setup.state_url], ["--jaeger-url", setup.jaeger_url]
        env: dict[str, str] = {}
    else:
        run_id, redis_args, jaeger_args = RUN_APART, [], []
        env = {"OTEL_SUBFLOW_REDIS_URL": setup.state_url, "OTEL_SUBFLOW_JOURNAL_URL": setup.journal_url,
               "OTEL_SUBFLOW_JAEGER_URL": setup.jaeger_url}
    diagnose = ["diagnose", *redis_args]
    commands = {
        "health": [*diagnose, "--redis-health", "--memory-analysis", "--sample-interval", "0", "--samples", "2"],
        "missing": [*diagnose, "--missing-state", "--run-id", run_id, "--node-id", "n2", *jaeger_args],
        "race": [*diagnose, "--race-conditions", "--run-id", run_id, *jaeger_args],
        "recent": [*diagnose, "--recent-operations", *jaeger_args],
        "export": [*diagnose, "--export-traces", "--sample-interval", "0", "--run-id", run_id, "--node-id", "n2",
                   "--output-dir", str(out_dir), *jaeger_args],
        "monitor": ["monitor", *redis_args, "--interval", "0.1", "--duration", "0.4", "--export-alerts",
                    "--latency-threshold-ms", "0", "--output-dir", str(out_dir)],
    }
    outputs: dict[str, str] = {}
    documents: dict[str, dict[str, Any]] = {}
    for name, args in commands.items():
        for mode in ("text", "json"):
            proc = run_cli(*args, *(["--json"] if mode == "json" else []), env=env, cwd=tmp_path)
            assert proc.returncode in (0, 1), (name, mode, proc.stderr)
            outputs[f"{name} {mode} stdout"] = proc.stdout
            outputs[f"{name} {mode} stderr"] = proc.stderr
            if mode == "json":
                documents[name] = json.loads(proc.stdout)
    written = files_in(out_dir)
    assert leaks({**outputs, **written}) == []

    # Not vacuous: the URLs are named (masked) and the links are there, credential-free and usable.
    for name in ("health", "missing", "race", "recent", "export", "monitor"):
        assert documents[name]["redis_url"] == setup.state_masked, name
    assert f"otel-subflow diagnose: {setup.state_masked}" in outputs["health text stdout"]
    missing = documents["missing"]["sections"]["missing_state"]
    assert missing["verdict"]["cause"] == names.CAUSE_NEVER_WRITTEN
    assert len(missing["trace_links"]) == 2  # the init and the miss of the run
    for trace_id, link in missing["trace_links"].items():
        assert link == f"{setup.jaeger_public}/trace/{trace_id}"
        assert link in outputs["missing text stdout"]
    for section in (documents["race"]["sections"]["race_conditions"]["timeline"],
                    documents["recent"]["sections"]["recent_operations"]["entries"]):
        links = [row["jaeger_url"] for row in section if row["trace_id"]]
        assert links and all(link.startswith(f"{setup.jaeger_public}/trace/") for link in links)
    jaeger = documents["export"]["sections"]["jaeger"]
    assert jaeger["jaeger_url"] == f"http://{JAEGER_USER}:***@127.0.0.1:{setup.jaeger_port}"
    assert jaeger["runs"][run_id]["trace_count"] == 1, jaeger  # the credentials did reach Jaeger, as a header
    assert jaeger["runs"][run_id]["error"] is None
    exports = [p for p in written if Path(p).name.startswith("subflow_diagnostics_")]
    assert len(exports) == 2
    for path in exports:
        document = json.loads(written[path])
        assert document["redis_url"] == setup.state_masked
        assert document["sections"]["missing_state"]["trace_links"]
    alerts = [p for p in written if Path(p).name == "subflow_monitoring_alerts.jsonl"]
    assert alerts and all(json.loads(line)["redis_url"] == setup.state_masked
                          for line in written[alerts[0]].splitlines())
    assert len([p for p in written if Path(p).name.startswith("subflow_monitoring_summary_")]) == 2
    for path in written:
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600, path


def test_error_messages_show_no_credential(setup: Setup, tmp_path: Path) -> None:
    """Unreachable Redis or journal, a wrong password, a bad URL, Jaeger down or refusing: masked, one line."""
    dead = free_port()
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["diagnose", "--redis-url", f"redis://user:{REDIS_PW}@127.0.0.1:1", "--timeout", "1"], {},
         "cannot reach Redis at redis://user:***@127.0.0.1:1"),
        (["monitor", "--duration", "1", "--output-dir", str(tmp_path / "mon"), "--timeout", "1"],
         {"OTEL_SUBFLOW_REDIS_URL": f"redis://user:{REDIS_PW}@127.0.0.1:1"},
         "cannot reach Redis at redis://user:***@127.0.0.1:1"),
        (["diagnose", "--recent-operations", "--redis-url", setup.state_url, "--timeout", "1"],
         {"OTEL_SUBFLOW_JOURNAL_URL": f"redis://{REDIS_USER}:{JOURNAL_PW}@127.0.0.1:{dead}/0"},
         f"cannot reach Redis at redis://{REDIS_USER}:***@127.0.0.1:{dead}/0 (OTEL_SUBFLOW_JOURNAL_URL)"),
        (["diagnose", "--redis-url", setup.state_url.replace(REDIS_PW, REDIS_PW + "-wrong")], {},
         f"authentication failed for {setup.state_masked}"),
        (["diagnose", "--redis-url", f"http://{REDIS_USER}:{REDIS_PW}@127.0.0.1/0"], {},
         f"invalid --redis-url http://{REDIS_USER}:***@127.0.0.1/0"),
        (["diagnose", "--recent-operations", "--redis-url", setup.state_url, "--jaeger-url",
          f"ftp://{JAEGER_USER}:{JAEGER_PW}@127.0.0.1:{setup.jaeger_port}"], {},
         f"ftp://{JAEGER_USER}:***@127.0.0.1:{setup.jaeger_port} is not an http(s) URL"),
        (["demo", "--runs", "1"],
         {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{dead}",
          "OTEL_SUBFLOW_JAEGER_URL": f"http://{JAEGER_USER}:{JAEGER_PW}@127.0.0.1:port"},
         f"invalid OTEL_SUBFLOW_JAEGER_URL http://{JAEGER_USER}:***@127.0.0.1:port"),
    ]
    outputs: dict[str, str] = {}
    for args, env, expected in cases:
        proc = run_cli(*args, env=env, cwd=tmp_path)
        outputs[" ".join(args) + " stdout"] = proc.stdout
        outputs[" ".join(args) + " stderr"] = proc.stderr
        assert proc.returncode == 2, (args, proc.stderr)
        assert expected in proc.stderr, (expected, proc.stderr)
        assert "Traceback" not in proc.stderr

    # Jaeger unreachable, then refusing wrong credentials: the export goes on, the error is masked.
    for jaeger_url, fragment in (
        (f"http://{JAEGER_USER}:{JAEGER_PW}@127.0.0.1:{dead}", f"Jaeger at http://{JAEGER_USER}:***@127.0.0.1:{dead}"),
        (f"http://{JAEGER_USER}:{JAEGER_PW}-wrong@127.0.0.1:{setup.jaeger_port}", "Unauthorized"),
    ):
        out_dir = tmp_path / f"export-{len(outputs)}"
        proc = run_cli("diagnose", "--export-traces", "--sample-interval", "0", "--redis-url", setup.state_url,
                       "--jaeger-url", jaeger_url, "--output-dir", str(out_dir), "--timeout", "2", cwd=tmp_path)
        assert proc.returncode in (0, 1), proc.stderr
        assert fragment in proc.stderr, proc.stderr
        outputs[f"export via {jaeger_url} stdout"] = proc.stdout
        outputs[f"export via {jaeger_url} stderr"] = proc.stderr
        outputs.update(files_in(out_dir))
        export = next(iter(files_in(out_dir).values()))
        assert fragment in json.dumps(json.loads(export)["sections"]["jaeger"])

    # --help with every URL in the environment.
    env = {"OTEL_SUBFLOW_REDIS_URL": setup.state_url, "OTEL_SUBFLOW_JOURNAL_URL": setup.journal_url,
           "OTEL_SUBFLOW_JAEGER_URL": setup.jaeger_url}
    for command in ("diagnose", "monitor", "demo"):
        proc = run_cli(command, "--help", env=env)
        assert proc.returncode == 0 and "--redis-url" in proc.stdout
        outputs[f"{command} --help"] = proc.stdout + proc.stderr
    assert leaks(outputs) == []


class _Elsewhere(BaseHTTPRequestHandler):
    """Another server a redirect points to: records the Authorization header it was sent."""

    seen: list[str | None] = []

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(200)
        self.send_header("Content-Length", "11")
        self.end_headers()
        self.wfile.write(b'{"data":[]}')

    def log_message(self, *args: Any) -> None:
        pass


def test_jaeger_credentials_are_not_forwarded_on_a_redirect(setup: Setup) -> None:
    """The basic-auth header goes to the Jaeger named in the URL only, not to where a redirect points."""
    elsewhere = ThreadingHTTPServer(("127.0.0.1", 0), _Elsewhere)
    threading.Thread(target=elsewhere.serve_forever, daemon=True).start()

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{elsewhere.server_address[1]}{self.path}")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    redirecting = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=redirecting.serve_forever, daemon=True).start()
    _Elsewhere.seen = []
    try:
        assert JaegerClient(setup.jaeger_url).services() == ["svc"]  # the header does reach Jaeger itself
        url = f"http://{JAEGER_USER}:{JAEGER_PW}@127.0.0.1:{redirecting.server_address[1]}"
        assert JaegerClient(url).services() == []
        assert _Elsewhere.seen == [None]
    finally:
        for server in (elsewhere, redirecting):
            server.shutdown()
            server.server_close()


# -- the demo ------------------------------------------------------------------------------------------


def _injection(scenario: str, truth: str, cause: str, url: str, run_id: str) -> Injection:
    result = GetResult(value=None, outcome="miss", verdict={"subflow.evidence.analysis_ms": 1.5},
                       trace_id="ab" * 16, span_id="cd" * 8, host="worker-b", verdict_latency_ms=3.0, url=url)
    return Injection(scenario, truth, run_id, "node-1", "worker-a", "worker-b", result, cause,
                     names.CONFIDENCE_DEFINITIVE, f"{cause}, said otel-subflow")


def test_demo_report_shows_no_credential() -> None:
    """build_report's diagnose commands, Jaeger links, telemetry line and records, as JSON and as rendered."""
    state = f"redis://{REDIS_USER}:{REDIS_PW}@127.0.0.1:6379/0"
    injections = [
        _injection("ttl_too_short", names.CAUSE_EXPIRED, names.CAUSE_EXPIRED, state, "run-a"),
        # A wrong definitive verdict: its whole record (with the read's URL) goes into the report.
        _injection("wrong_db", names.CAUSE_WRONG_ENDPOINT, names.CAUSE_NEVER_WRITTEN, state.replace("/0", "/5"),
                   "run-b"),
    ]
    report = build_report(
        WorkloadResult(runs=3, healthy_runs=1, reads=5, hits=3, injections=injections, elapsed_s=1.0),
        journal_url=f"redis://{REDIS_USER}:{JOURNAL_PW}@127.0.0.1:6390/0",
        jaeger_url=f"https://{JAEGER_USER}:{JAEGER_PW}@jaeger.example:16686/",
        service_name="subflow-demo", telemetry="exported over OTLP to somewhere",
    )
    buffer = io.StringIO()
    render_demo(Console(file=buffer, width=200, no_color=True), report)
    text = buffer.getvalue()
    assert leaks({"json": json.dumps(report), "text": text}) == []

    assert report["dig_further"][0] == (
        f"OTEL_SUBFLOW_JOURNAL_URL='redis://{REDIS_USER}:***@127.0.0.1:6390/0' otel-subflow diagnose "
        f"--redis-url 'redis://{REDIS_USER}:***@127.0.0.1:6379/0' --missing-state --run-id run-a --node-id 'node-1'")
    assert report["wrong_definitive"][0]["result"]["url"] == f"redis://{REDIS_USER}:***@127.0.0.1:6379/5"
    link = report["jaeger_search"]["run-b"]
    assert link.startswith("https://jaeger.example:16686/search?service=subflow-demo&tags=")
    assert json.loads(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(link).query))["tags"]) == {
        names.ATTR_RUN_ID: "run-b"}
    assert link in text and report["dig_further"][0] in text


class _OtlpSink(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports (so the demo's workers do not retry), records the Authorization seen."""

    authorizations: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.authorizations.append(self.headers.get("Authorization") or "")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.slow
def test_demo_run_shows_no_credential(tmp_path: Path) -> None:
    """The real demo on a password-protected Redis, exporting to an OTLP endpoint with a key, Jaeger with a password."""
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _OtlpSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        with RedisServer(password=REDIS_PW) as server:
            env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
            env.update({
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://otlp-user:{VENDOR_PW}@127.0.0.1:{sink.server_address[1]}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_HEADERS": f"x-api-key={VENDOR_KEY}",
                "OTEL_SUBFLOW_JAEGER_URL": f"http://{JAEGER_USER}:{JAEGER_PW}@127.0.0.1:16686",
            })
            url = f"redis://default:{REDIS_PW}@127.0.0.1:{server.port}/0"
            outputs = {}
            for mode in ("text", "json"):
                proc = subprocess.run(
                    [sys.executable, "-m", "otel_subflow.cli", "demo", "--redis-url", url, "--runs", "4", "--seed", "5",
                     *(["--json"] if mode == "json" else [])],
                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
                assert proc.returncode == 0, proc.stderr[-3000:]
                outputs[f"{mode} stdout"], outputs[f"{mode} stderr"] = proc.stdout, proc.stderr
    finally:
        sink.shutdown()
        sink.server_close()
    assert leaks(outputs) == []
    report = json.loads(outputs["json stdout"])
    assert report["telemetry"] == f"exported over OTLP to http://otlp-user:***@127.0.0.1:{sink.server_address[1]}"
    assert report["dig_further"] and all(f"'redis://default:***@127.0.0.1:{server.port}/0'" in c
                                         for c in report["dig_further"])
    assert report["jaeger_search"] and all(link.startswith("http://127.0.0.1:16686/search?")
                                           for link in report["jaeger_search"].values())
    assert "http://127.0.0.1:16686/search?" in outputs["text stdout"]
    assert _OtlpSink.authorizations  # the workers did export


# -- otel-subflow stack: the vendor's endpoint and key ---------------------------------------------------


def _fake_binaries(tmp_path: Path) -> Binaries:
    """A Jaeger that answers its health URL, and a collector that logs its vendor settings and dies."""
    jaeger = tmp_path / "fake-jaeger"
    jaeger.write_text(
        f"#!{sys.executable}\n"
        "import os, http.server\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.send_header('Content-Length', '2'); self.end_headers()\n"
        "        self.wfile.write(b'{}')\n"
        "http.server.HTTPServer(('127.0.0.1', int(os.environ['JAEGER_QUERY_PORT'])), H).serve_forever()\n")
    collector = tmp_path / "fake-otelcol"
    collector.write_text(
        "#!/bin/sh\n"
        'echo "Error: exporter otlp_http/vendor: cannot reach $OTEL_SUBFLOW_VENDOR_ENDPOINT"\n'
        'echo "headers: authorization: Bearer $OTEL_SUBFLOW_VENDOR_API_KEY"\n'
        "exit 1\n")
    for path in (jaeger, collector):
        path.chmod(0o755)
    return Binaries(otelcol=collector, jaeger=jaeger, prometheus=collector)


def test_stack_errors_show_no_vendor_secret(tmp_path: Path) -> None:
    """The collector's log tail printed on a failed start: the vendor endpoint masked, the key replaced."""
    binaries = _fake_binaries(tmp_path)
    vendor = {"OTEL_SUBFLOW_VENDOR_ENDPOINT": f"https://tenant:{VENDOR_PW}@otlp.vendor.example",
              "OTEL_SUBFLOW_VENDOR_API_KEY": VENDOR_KEY}
    stack = LocalStack(ports=StackPorts.free(), binaries=binaries, workdir=tmp_path / "work",
                       components=("collector",), collector_env=vendor, startup_timeout=10)
    with pytest.raises(StackError) as info:
        stack.start()
    message = str(info.value)
    assert "cannot reach https://tenant:***@otlp.vendor.example" in message
    assert "Bearer ***" in message
    assert leaks({"StackError": message}) == []

    # The command: Jaeger starts, the collector fails, the error goes to stderr.
    proc = run_cli("stack", "--no-build", "--vendor", "--free-ports", env={
        **vendor, "OTEL_SUBFLOW_OTELCOL_BIN": str(binaries.otelcol), "OTEL_SUBFLOW_JAEGER_BIN": str(binaries.jaeger),
        "OTEL_SUBFLOW_PROMETHEUS_BIN": str(binaries.prometheus)}, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "collector exited with code 1" in proc.stderr
    assert "cannot reach https://tenant:***@otlp.vendor.example" in proc.stderr and "Bearer ***" in proc.stderr
    assert leaks({"stdout": proc.stdout, "stderr": proc.stderr}) == []
    assert MASK == "***"
