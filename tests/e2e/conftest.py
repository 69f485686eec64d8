"""End-to-end tier: the real collector, Jaeger and Prometheus as local processes.

Binaries come from scripts/build_binaries.sh (cached outside the repository).
When they are missing the tier FAILS (in CI and locally); set
OTEL_SUBFLOW_ALLOW_SKIP=1 to skip it instead on a machine without Go.

Helpers are exposed as fixtures (not an importable module) so this directory
works under any pytest import mode.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from otel_subflow.stack import (
    Binaries,
    LocalStack,
    StackError,
    StackPorts,
    find_binaries,
)

REPO = Path(__file__).resolve().parents[2]
COLLECTOR_DIR = REPO / "collector"
E2E_DIR = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"

T = TypeVar("T")


def _missing(reason: str) -> None:
    if os.environ.get("OTEL_SUBFLOW_ALLOW_SKIP") == "1" and not os.environ.get("CI"):
        pytest.skip(f"{reason} (OTEL_SUBFLOW_ALLOW_SKIP=1)")
    pytest.fail(
        f"{reason}. Build them with scripts/build_binaries.sh, or set "
        "OTEL_SUBFLOW_ALLOW_SKIP=1 to skip the end-to-end tier (never in CI).",
        pytrace=False,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def poll(
    fn: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.25,
) -> T:
    """Call fn until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last={last!r}")
        time.sleep(interval)


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return 200 <= int(resp.status) < 300
    except OSError:
        return False


def scrape_sum(port: int, name: str, **labels: str) -> float:
    """Sum of a metric over its series on a Prometheus text endpoint (loopback `port`), optionally
    only the series carrying every `labels` pair; 0 when no series matches."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            if all(w in series for w in wanted):
                total += float(value)
    return total


def jaeger_search(
    base_url: str, service: str, tags: Mapping[str, str] | None = None, lookback_s: float = 3600
) -> list[dict[str, Any]]:
    """Jaeger's GET /api/traces (start/end in unix microseconds); [] while the service is unknown."""
    now_us = int(time.time() * 1_000_000)
    params = {
        "service": service,
        "start": str(now_us - int(lookback_s * 1_000_000)),
        "end": str(now_us + 60_000_000),
        "limit": "1000",
    }
    if tags:
        params["tags"] = json.dumps(dict(tags))
    try:
        data = http_json(f"{base_url}/api/traces?{urllib.parse.urlencode(params)}")
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return []
        raise
    traces: list[dict[str, Any]] = data.get("data") or []
    return traces


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: needs the collector/Jaeger/Prometheus binaries")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def poll_until() -> Callable[..., Any]:
    """poll(fn, timeout=, what=): call fn until truthy, fail at the deadline."""
    return poll


# -- binaries ------------------------------------------------------------------


@pytest.fixture(scope="session")
def binaries() -> Binaries:
    try:
        return find_binaries()
    except StackError as err:
        _missing(str(err))
        raise


@pytest.fixture(scope="session")
def otelcol(binaries: Binaries) -> Path:
    return binaries.otelcol


@pytest.fixture(scope="session")
def promtool() -> Path:
    found = shutil.which("promtool")
    if not found:
        _missing("promtool not found (apt-get install prometheus)")
    assert found
    return Path(found)


@pytest.fixture(scope="session")
def docker_compose() -> Path:
    found = shutil.which("docker-compose")
    if not found:
        _missing("docker-compose not found (apt-get install docker-compose)")
    assert found
    return Path(found)


# -- managed processes -----------------------------------------------------------


@dataclass
class Managed:
    """A child process with a health URL, restartable on the same ports."""

    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self.proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            return http_ok(self.health_url)

        poll(healthy, timeout=timeout, what=f"{self.name} health at {self.health_url}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None


@dataclass
class RedisServer:
    port: int
    managed: Managed

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"


@pytest.fixture(scope="session")
def e2e_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the e2e tier's own, configured like the compose one."""
    exe = shutil.which("redis-server")
    if not exe:
        _missing("redis-server not found (apt-get install redis-server)")
    assert exe
    port = free_port()
    workdir = tmp_path_factory.mktemp("e2e-redis")
    argv = [
        exe,
        "--bind", LOOPBACK,
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--notify-keyspace-events", "Exeg",
        "--maxmemory", "256mb",
        "--maxmemory-policy", "volatile-lru",
    ]  # fmt: skip
    managed = Managed("redis", argv, dict(os.environ), "", workdir / "redis.log")

    def pong() -> bool:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    with managed.log_path.open("ab") as log:
        managed.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        poll(pong, timeout=20, what="redis-server PONG")
        yield RedisServer(port=port, managed=managed)
    finally:
        managed.stop()


# -- the vendor stand-in -----------------------------------------------------------


@dataclass
class Vendor:
    """A second collector receiving OTLP/HTTP like a vendor, recording what arrives."""

    port: int
    api_key: str
    out_dir: Path
    managed: Managed

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def collector_env(self) -> dict[str, str]:
        """What the vendor overlay reads from the environment."""
        return {
            "OTEL_SUBFLOW_VENDOR_ENDPOINT": self.endpoint,
            "OTEL_SUBFLOW_VENDOR_API_KEY": self.api_key,
        }

    def records(self, signal: str) -> list[dict[str, Any]]:
        """Every OTLP JSON request the vendor stored for a signal (traces/metrics/logs)."""
        path = self.out_dir / f"{signal}.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line being written right now
        return out

    def log_records(self) -> list[dict[str, Any]]:
        """Log records as {"body", "severity", "trace_id", "attributes", "resource"}."""
        out = []
        for rec in self.records("logs"):
            for rl in rec.get("resourceLogs", []):
                res = _attrs(rl.get("resource", {}).get("attributes", []))
                for sl in rl.get("scopeLogs", []):
                    for lr in sl.get("logRecords", []):
                        out.append(
                            {
                                "body": _value(lr.get("body", {})),
                                "severity": lr.get("severityText"),
                                "trace_id": lr.get("traceId", "").lower(),
                                "attributes": _attrs(lr.get("attributes", [])),
                                "resource": res,
                            }
                        )
        return out

    def spans(self) -> list[FlatSpan]:
        return [s for rec in self.records("traces") for s in flatten_otlp_traces(rec)]

    def metric_names(self) -> dict[str, list[dict[str, Any]]]:
        """Metric name -> the resource attributes (flattened) it arrived with."""
        names: dict[str, list[dict[str, Any]]] = {}
        for rec in self.records("metrics"):
            for rm in rec.get("resourceMetrics", []):
                res = _attrs(rm.get("resource", {}).get("attributes", []))
                for sm in rm.get("scopeMetrics", []):
                    for m in sm.get("metrics", []):
                        points = _metric_points(m)
                        attrs = dict(res)
                        for p in points:
                            attrs.update(_attrs(p.get("attributes", [])))
                        names.setdefault(m["name"], []).append(attrs)
        return names


def _metric_points(metric: Mapping[str, Any]) -> list[dict[str, Any]]:
    for kind in ("sum", "gauge", "histogram", "exponentialHistogram", "summary"):
        if kind in metric:
            points: list[dict[str, Any]] = metric[kind].get("dataPoints", [])
            return points
    return []


def _value(v: Mapping[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        return int(v["intValue"])
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values", [])]
    return None


def _attrs(kvs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: _value(kv.get("value", {})) for kv in kvs}


@dataclass
class FlatSpan:
    name: str
    trace_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status_code: int = 0


def flatten_otlp_traces(rec: Mapping[str, Any]) -> list[FlatSpan]:
    out = []
    for rs in rec.get("resourceSpans", []):
        res = _attrs(rs.get("resource", {}).get("attributes", []))
        for ss in rs.get("scopeSpans", []):
            for sp in ss.get("spans", []):
                out.append(
                    FlatSpan(
                        name=sp["name"],
                        trace_id=sp["traceId"].lower(),
                        attributes=_attrs(sp.get("attributes", [])),
                        resource=res,
                        events=[(e["name"], _attrs(e.get("attributes", []))) for e in sp.get("events", [])],
                        status_code=int(sp.get("status", {}).get("code", 0) or 0),
                    )
                )
    return out


def _start_vendor(otelcol: Path, workdir: Path) -> Vendor:
    out_dir = workdir / "vendor-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    port, health, telemetry = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | {
        "VENDOR_PORT": str(port),
        "VENDOR_HEALTH_PORT": str(health),
        "VENDOR_TELEMETRY_PORT": str(telemetry),
        "VENDOR_OUT_DIR": str(out_dir),
    }
    managed = Managed(
        "vendor",
        [str(otelcol), "--config", str(E2E_DIR / "vendor-collector.yaml")],
        env,
        f"http://{LOOPBACK}:{health}/",
        workdir / "vendor.log",
    )
    managed.start()
    # A fresh key per run: it can be in no file of the repository.
    return Vendor(port=port, api_key="e2e-" + secrets.token_hex(16), out_dir=out_dir, managed=managed)


# -- stacks ----------------------------------------------------------------------------


@dataclass
class E2EStack:
    """A LocalStack with the vendor overlay, its vendor and its Redis."""

    stack: LocalStack
    vendor: Vendor
    redis: RedisServer

    # -- app side ---------------------------------------------------------

    def run_script(
        self,
        script: str,
        *args: str,
        service: str,
        protocol: str = "grpc",
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Run tests/e2e/<script> in a fresh interpreter exporting to this stack; return its JSON."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env |= self.stack.app_env(protocol)
        env |= {
            "OTEL_SERVICE_NAME": service,
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "E2E_REDIS_URL": self.redis.url,
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(E2E_DIR / script), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        elapsed = time.monotonic() - started
        assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        assert lines, f"{script} printed no JSON:\n{proc.stdout}\n{proc.stderr}"
        result: dict[str, Any] = json.loads(lines[-1])
        result["_elapsed_s"] = elapsed
        result["_stderr"] = proc.stderr
        return result

    # -- Jaeger ------------------------------------------------------------

    def jaeger_traces(
        self, service: str, tags: Mapping[str, str] | None = None, lookback_s: float = 3600
    ) -> list[dict[str, Any]]:
        """GET /api/traces (start/end in unix microseconds); [] while the service is unknown."""
        return jaeger_search(self.stack.urls["jaeger"], service, tags, lookback_s)

    # -- Prometheus --------------------------------------------------------

    def promql(self, query: str) -> list[dict[str, Any]]:
        url = f"{self.stack.urls['prometheus']}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
        data = http_json(url)
        assert data["status"] == "success", data
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    def collector_self_metric(self, name: str) -> float:
        """Sum of a collector self-telemetry counter (all label sets), from its /metrics."""
        return scrape_sum(self.stack.ports.collector_telemetry, name)

    def stop(self) -> None:
        self.stack.stop()
        self.vendor.managed.stop()


def _make_stack(
    binaries: Binaries,
    redis: RedisServer,
    workdir: Path,
    *,
    sample_percent: float,
) -> E2EStack:
    vendor = _start_vendor(binaries.otelcol, workdir)
    stack = LocalStack(
        ports=StackPorts.free(),
        binaries=binaries,
        workdir=workdir / "stack",
        redis_endpoint=redis.endpoint,
        sample_percent=sample_percent,
        collector_overlays=[COLLECTOR_DIR / "vendor-overlay.yaml"],
        collector_env=vendor.collector_env(),
        # Fast settings for tests; the shipped defaults are 10s / 15s / 15s.
        decision_wait="2s",
        spanmetrics_flush="1s",
        scrape_interval="1s",
    )
    try:
        stack.start()
    except BaseException:
        vendor.managed.stop()
        raise
    return E2EStack(stack=stack, vendor=vendor, redis=redis)


@pytest.fixture(scope="session")
def e2e(binaries: Binaries, e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EStack]:
    """The shared stack: bundled config + vendor overlay, 25% baseline sampling."""
    env = _make_stack(binaries, e2e_redis, tmp_path_factory.mktemp("e2e-stack"), sample_percent=25)
    try:
        yield env
    finally:
        env.stop()


@pytest.fixture()
def fresh_e2e(binaries: Binaries, e2e_redis: RedisServer, tmp_path: Path) -> Iterator[E2EStack]:
    """A stack of the test's own (for tests that stop parts of it); keeps every trace."""
    env = _make_stack(binaries, e2e_redis, tmp_path, sample_percent=100)
    try:
        yield env
    finally:
        env.stop()


# -- two tiers: per-host agents, tail-sampling gateways ---------------------------------


@dataclass
class TierCollector:
    """One collector of the two-tier topology (an agent or a gateway) on its own loopback ports."""

    managed: Managed
    grpc_port: int
    telemetry_port: int
    prometheus_port: int | None = None  # gateways only

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def self_metric(self, name: str, **labels: str) -> float:
        """A self-telemetry metric summed over the series that carry `labels`."""
        return scrape_sum(self.telemetry_port, name, **labels)

    def exported_metric(self, name: str, **labels: str) -> float:
        """An app / span metric as this gateway's Prometheus endpoint exposes it (0 when absent)."""
        assert self.prometheus_port is not None, f"{self.managed.name} exports no metrics"
        return scrape_sum(self.prometheus_port, name, **labels)


@dataclass
class TwoTier:
    """Jaeger, gateways running collector/otelcol.yaml and agents running collector/agent.yaml."""

    jaeger: Managed
    jaeger_query_port: int
    gateways: list[TierCollector]
    agents: list[TierCollector]

    @property
    def jaeger_url(self) -> str:
        return f"http://{LOOPBACK}:{self.jaeger_query_port}"

    def app_env(self, agent: int, service: str) -> dict[str, str]:
        """The environment of an app on agent `agent`'s host: OTLP/gRPC to that agent."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        return env | {
            "OTEL_SERVICE_NAME": service,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{self.agents[agent].endpoint}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }

    def jaeger_trace(self, trace_id: str) -> dict[str, Any] | None:
        """GET /api/traces/<id>: the trace, or None while Jaeger does not have it (404)."""
        try:
            data = http_json(f"{self.jaeger_url}/api/traces/{trace_id}")
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise
        traces: list[dict[str, Any]] = data.get("data") or []
        return traces[0] if traces else None

    def jaeger_traces(self, service: str) -> list[dict[str, Any]]:
        return jaeger_search(self.jaeger_url, service)

    def stop(self) -> None:
        for managed in [*(a.managed for a in self.agents), *(g.managed for g in self.gateways), self.jaeger]:
            managed.stop()


#: Tail sampling's wait in the two-tier tests: the two halves of a trace reach the gateway
#: through two agents, each batching for up to 1 s, so they can arrive about 1 s apart.
TWO_TIER_DECISION_WAIT = "3s"


def _start_two_tier(binaries: Binaries, redis: RedisServer, workdir: Path, gateways: int, agents: int) -> TwoTier:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    started: list[Managed] = []

    def start(managed: Managed) -> Managed:
        started.append(managed)
        managed.start()
        return managed

    try:
        query, jaeger_grpc = free_port(), free_port()
        jaeger_env = base_env | {
            "JAEGER_LISTEN_HOST": LOOPBACK,
            "JAEGER_OTLP_GRPC_PORT": str(jaeger_grpc),
            "JAEGER_OTLP_HTTP_PORT": str(free_port()),
            "JAEGER_QUERY_PORT": str(query),
            "JAEGER_QUERY_GRPC_PORT": str(free_port()),
            "JAEGER_HEALTH_PORT": str(free_port()),
            "JAEGER_METRICS_PORT": str(free_port()),
        }
        jaeger = start(
            Managed(
                "jaeger",
                [str(binaries.jaeger), "--config", str(COLLECTOR_DIR / "jaeger.yaml")],
                jaeger_env,
                f"http://{LOOPBACK}:{query}/api/services",
                workdir / "jaeger.log",
            )
        )

        def collector(name: str, config: str, env: dict[str, str], prometheus: int | None) -> TierCollector:
            grpc, health, telemetry = free_port(), free_port(), free_port()
            env = (
                base_env
                | env
                | {
                    "OTEL_SUBFLOW_LISTEN_HOST": LOOPBACK,
                    "OTEL_SUBFLOW_OTLP_GRPC_PORT": str(grpc),
                    "OTEL_SUBFLOW_OTLP_HTTP_PORT": str(free_port()),
                    "OTEL_SUBFLOW_HEALTH_PORT": str(health),
                    "OTEL_SUBFLOW_TELEMETRY_PORT": str(telemetry),
                }
            )
            managed = Managed(
                name,
                [str(binaries.otelcol), "--config", str(COLLECTOR_DIR / config)],
                env,
                f"http://{LOOPBACK}:{health}/",
                workdir / f"{name}.log",
            )
            start(managed)
            return TierCollector(managed, grpc, telemetry, prometheus)

        gws = []
        for i in range(gateways):
            prometheus = free_port()
            gateway_env = {
                "OTEL_SUBFLOW_PROMETHEUS_PORT": str(prometheus),
                "OTEL_SUBFLOW_JAEGER_ENDPOINT": f"{LOOPBACK}:{jaeger_grpc}",
                "OTEL_SUBFLOW_REDIS_ENDPOINT": redis.endpoint,
                # Only the verdict / error policies keep a trace: what reaches Jaeger was decided whole.
                "OTEL_SUBFLOW_SAMPLE_PERCENT": "0",
                "OTEL_SUBFLOW_DECISION_WAIT": TWO_TIER_DECISION_WAIT,
                "OTEL_SUBFLOW_SPANMETRICS_FLUSH": "1s",
            }
            gws.append(collector(f"gateway-{i + 1}", "otelcol.yaml", gateway_env, prometheus))
        endpoints = [g.endpoint for g in gws]
        ags = []
        for i in range(agents):
            # Each agent lists the gateways in its own order: the ring sorts them, so all agents agree.
            listed = endpoints if i % 2 == 0 else endpoints[::-1]
            agent_env = {"OTEL_SUBFLOW_GATEWAYS": "[" + ",".join(listed) + "]"}
            ags.append(collector(f"agent-{i + 1}", "agent.yaml", agent_env, None))
    except BaseException:
        for managed in reversed(started):
            managed.stop()
        raise
    return TwoTier(jaeger=jaeger, jaeger_query_port=query, gateways=gws, agents=ags)


@pytest.fixture(scope="session")
def two_tier(binaries: Binaries, e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoTier]:
    """Two agents (collector/agent.yaml) routing to two gateways (collector/otelcol.yaml, no baseline
    sampling), one Jaeger; every process on loopback."""
    env = _start_two_tier(binaries, e2e_redis, tmp_path_factory.mktemp("two-tier"), gateways=2, agents=2)
    try:
        yield env
    finally:
        env.stop()
