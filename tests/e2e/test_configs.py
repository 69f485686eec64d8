"""The shipped configs: valid for the real tools, on one release, and the same in compose and the local stack."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from otel_subflow import stack as stack_mod
from otel_subflow.stack import Binaries, StackPorts, render_prometheus_config

REPO = Path(__file__).resolve().parents[2]
COLLECTOR = REPO / "collector"
E2E = Path(__file__).resolve().parent


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env=env, cwd=REPO)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_SUBFLOW_VENDOR")}
    return env | extra


VENDOR_ENV = {"OTEL_SUBFLOW_VENDOR_ENDPOINT": "http://127.0.0.1:1", "OTEL_SUBFLOW_VENDOR_API_KEY": "k"}
GATEWAYS_ENV = {"OTEL_SUBFLOW_GATEWAYS": "[127.0.0.1:14317,127.0.0.1:24317]"}


# -- otelcol validate --------------------------------------------------------------


@pytest.mark.parametrize(
    "configs",
    [["otelcol.yaml"], ["otelcol.yaml", "vendor-overlay.yaml"], ["agent.yaml"]],
    ids=["base", "base+vendor", "agent"],
)
def test_otelcol_validate_accepts_bundled_configs(otelcol: Path, configs: list[str]) -> None:
    """`otelcol validate` passes for the bundled config alone, with the vendor overlay, and for the agent."""
    argv = [str(otelcol), "validate"]
    for c in configs:
        argv += ["--config", str(COLLECTOR / c)]
    result = run(argv, env=clean_env(**VENDOR_ENV, **GATEWAYS_ENV))
    assert result.returncode == 0, result.stderr


def test_otelcol_validate_rejects_agent_without_gateways(otelcol: Path) -> None:
    """The agent has no default gateway list (a default would be a guess): validation says so."""
    env = {k: v for k, v in clean_env().items() if k != "OTEL_SUBFLOW_GATEWAYS"}
    result = run([str(otelcol), "validate", "--config", str(COLLECTOR / "agent.yaml")], env=env)
    assert result.returncode != 0
    assert "no endpoints specified for the static resolver" in result.stderr, result.stderr


def test_otelcol_validate_rejects_overlay_without_vendor_endpoint(otelcol: Path) -> None:
    """Validation is real: the overlay without its env vars is refused."""
    result = run(
        [str(otelcol), "validate", "--config", str(COLLECTOR / "otelcol.yaml"),
         "--config", str(COLLECTOR / "vendor-overlay.yaml")],
        env=clean_env(),
    )  # fmt: skip
    assert result.returncode != 0
    assert "otlp_http/vendor" in result.stderr


def test_vendor_stand_in_config_validates(otelcol: Path) -> None:
    """The test vendor's config is valid for the same binary."""
    env = clean_env(VENDOR_PORT="1", VENDOR_HEALTH_PORT="2", VENDOR_TELEMETRY_PORT="3", VENDOR_OUT_DIR="/tmp")
    result = run([str(otelcol), "validate", "--config", str(E2E / "vendor-collector.yaml")], env=env)
    assert result.returncode == 0, result.stderr


# -- manifest vs configs vs binary -------------------------------------------------------

KINDS = ("receivers", "processors", "exporters", "connectors", "extensions")


def component_types(config: dict[str, Any]) -> set[tuple[str, str]]:
    return {(kind, name.split("/")[0]) for kind in KINDS for name in (config.get(kind) or {})}


def test_manifest_holds_exactly_the_components_the_configs_use(otelcol: Path) -> None:
    """The distribution has every component the configs use and nothing else."""
    used: set[tuple[str, str]] = set()
    configs = ["otelcol.yaml", "vendor-overlay.yaml", "agent.yaml"]
    for path in [*(COLLECTOR / c for c in configs), E2E / "vendor-collector.yaml"]:
        used |= component_types(load(path))
    result = run([str(otelcol), "components"])
    assert result.returncode == 0, result.stderr
    built = yaml.safe_load(result.stdout)
    have = {(kind, c["name"]) for kind in KINDS for c in (built.get(kind) or [])}
    assert have == used
    manifest = load(COLLECTOR / "manifest.yaml")
    modules = {c["gomod"] for kind in KINDS for c in manifest.get(kind, [])}
    assert modules == {c["module"] for kind in KINDS for c in (built.get(kind) or [])}


def test_every_collector_module_is_on_one_release() -> None:
    """Contrib and core on v0.161.0, stable core modules on v1.67.0; compose image and build agree."""
    manifest = load(COLLECTOR / "manifest.yaml")
    versions = {}
    for kind in (*KINDS, "providers"):
        for c in manifest.get(kind, []):
            module, version = c["gomod"].split()
            versions[module] = version
    versions["telemetry"] = manifest["telemetry"]["gomod"].split()[1]
    providers = {c["gomod"].split()[0] for c in manifest["providers"]}
    assert {v for m, v in versions.items() if m not in providers} == {"v" + stack_mod.OTELCOL_VERSION}
    assert {versions[m] for m in providers} == {"v1.67.0"}
    assert manifest["dist"]["version"] == stack_mod.OTELCOL_VERSION
    # The versions have one home, otel_subflow/stack/_build.py; the checkout's script runs that file.
    script = (REPO / "scripts" / "build_binaries.sh").read_text()
    assert "otel_subflow/stack/_build.py" in script and "VERSION" not in script
    compose = load(REPO / "docker-compose.yml")
    assert compose["services"]["collector"]["image"] == (
        f"otel/opentelemetry-collector-contrib:{stack_mod.OTELCOL_VERSION}"
    )
    assert compose["services"]["jaeger"]["image"] == f"jaegertracing/jaeger:{stack_mod.JAEGER_VERSION}"


def test_built_binaries_report_the_pinned_versions(binaries: Binaries) -> None:
    """The cached collector and Jaeger are the pinned releases (a stale cache would fail here)."""
    result = run([str(binaries.otelcol), "--version"])
    assert result.stdout.strip().endswith(stack_mod.OTELCOL_VERSION), result.stdout
    result = run([str(binaries.jaeger), "version"])
    assert f'"gitVersion":"v{stack_mod.JAEGER_VERSION}"' in result.stdout, result.stdout + result.stderr


# -- the bundled config's contract ------------------------------------------------------


def test_overlay_restates_every_base_exporter() -> None:
    """Arrays replace on merge: the overlay must keep each pipeline's own exporters and add the vendor."""
    base = load(COLLECTOR / "otelcol.yaml")["service"]["pipelines"]
    overlay = load(COLLECTOR / "vendor-overlay.yaml")["service"]["pipelines"]
    assert set(overlay) == {"traces", "metrics", "logs"}
    for name, pipeline in overlay.items():
        assert set(pipeline) == {"exporters"}, "the overlay only re-declares exporter arrays"
        assert pipeline["exporters"] == [*base[name]["exporters"], "otlp_http/vendor"]


def test_overlay_takes_endpoint_and_key_only_from_env() -> None:
    """No secret in a file: the vendor exporter's endpoint and auth header are env references."""
    exp = load(COLLECTOR / "vendor-overlay.yaml")["exporters"]["otlp_http/vendor"]
    assert exp["endpoint"] == "${env:OTEL_SUBFLOW_VENDOR_ENDPOINT}"
    assert exp["headers"] == {"authorization": "Bearer ${env:OTEL_SUBFLOW_VENDOR_API_KEY}"}


def test_tail_sampling_keeps_errors_and_missing_state() -> None:
    """Policies: status ERROR, a subflow.state.missing or .race span event, and a configurable share."""
    policies = load(COLLECTOR / "otelcol.yaml")["processors"]["tail_sampling"]["policies"]
    by_type = {p["type"]: p for p in policies}
    assert by_type["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert by_type["ottl_condition"]["ottl_condition"]["spanevent"] == [
        'spanevent.name == "subflow.state.missing"', 'spanevent.name == "subflow.state.race"']
    assert by_type["probabilistic"]["probabilistic"]["sampling_percentage"] == (
        "${env:OTEL_SUBFLOW_SAMPLE_PERCENT:-10}"
    )


def test_span_metrics_dimensions_are_bounded() -> None:
    """RED metrics over the state spans never use run, node or key as a dimension."""
    cfg = load(COLLECTOR / "otelcol.yaml")
    dims = [d["name"] for d in cfg["connectors"]["span_metrics"]["dimensions"]]
    assert dims == ["subflow.state.outcome"]
    text = json.dumps(cfg["connectors"])
    for forbidden in ("subflow.run_id", "subflow.node_id", "subflow.state.key"):
        assert forbidden not in text
    pipe = cfg["service"]["pipelines"]["traces/spanmetrics"]
    assert pipe["exporters"] == ["span_metrics"]
    assert "tail_sampling" not in pipe["processors"], "RED metrics must count every span, before sampling"


def test_every_listen_address_comes_from_env() -> None:
    """Each endpoint is an ${env:...} reference, so compose and the local stack share the file."""
    for name in ("otelcol.yaml", "jaeger.yaml", "agent.yaml"):
        text = (COLLECTOR / name).read_text()
        for line in text.splitlines():
            m = re.match(r"\s*endpoint:\s*(\S+)", line)
            if m:
                assert m.group(1).startswith("${env:"), f"{name}: {line.strip()}"


def test_agent_routes_traces_and_logs_by_trace_id_and_metrics_by_resource() -> None:
    """Every signal leaves the agent through the load balancer, over the same gateway list; the agent
    does not sample (a gateway decides on the whole trace)."""
    cfg = load(COLLECTOR / "agent.yaml")
    exporters = cfg["exporters"]
    assert set(exporters) == {"load_balancing", "load_balancing/metrics"}
    assert exporters["load_balancing"]["routing_key"] == "traceID"
    assert exporters["load_balancing/metrics"]["routing_key"] == "resource"
    for exp in exporters.values():
        assert exp["resolver"] == {"static": {"hostnames": "${env:OTEL_SUBFLOW_GATEWAYS}"}}
        assert exp["protocol"]["otlp"]["tls"] == {"insecure": True}
    pipelines = cfg["service"]["pipelines"]
    assert {name: p["exporters"] for name, p in pipelines.items()} == {
        "traces": ["load_balancing"],
        "logs": ["load_balancing"],
        "metrics": ["load_balancing/metrics"],
    }
    assert all(p["processors"] == ["memory_limiter", "batch"] for p in pipelines.values())
    # Its ports have the gateway's variables and defaults (the StackPorts defaults).
    text = (COLLECTOR / "agent.yaml").read_text()
    ports = StackPorts()
    for var, port in [
        ("OTEL_SUBFLOW_OTLP_GRPC_PORT", ports.otlp_grpc),
        ("OTEL_SUBFLOW_OTLP_HTTP_PORT", ports.otlp_http),
        ("OTEL_SUBFLOW_HEALTH_PORT", ports.collector_health),
        ("OTEL_SUBFLOW_TELEMETRY_PORT", ports.collector_telemetry),
    ]:
        assert f"${{env:{var}:-{port}}}" in text
    # Each variable the agent reads is listed in its header.
    header = text.split("\n\n", 1)[0]
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for var in set(re.findall(r"\$\{env:(\w+)", body)):
        assert f"#   {var} " in header, var


# -- Prometheus ------------------------------------------------------------------------


def test_promtool_check_rules(promtool: Path) -> None:
    """The alert rules parse."""
    result = run([str(promtool), "check", "rules", str(COLLECTOR / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout  # 6 alerts, 1 recording rule


def test_promtool_test_rules(promtool: Path) -> None:
    """The alert rules fire at the monitor's thresholds and not below them."""
    result = run([str(promtool), "test", "rules", str(COLLECTOR / "alerts.test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_thresholds_mirror_the_monitor() -> None:
    """10 failures/min, 50 evictions/min, 500 ms p99, 80% of maxmemory, Redis down."""
    alerts = [r for g in load(COLLECTOR / "alerts.yml")["groups"] for r in g["rules"] if "alert" in r]
    rules = {r["alert"]: r["expr"] for r in alerts}
    assert re.search(r"increase\(subflow_state_missing_total\[1m\]\)\) > 10$", rules["SubflowStateFailuresHigh"])
    assert re.search(r"increase\(redis_keys_evicted_total\[1m\]\)\) > 50$", rules["RedisEvictionsHigh"])
    assert rules["SubflowStateLatencyHigh"].strip().endswith("> 0.5")
    assert "histogram_quantile(0.99" in rules["SubflowStateLatencyHigh"]
    assert rules["RedisMemoryNearMax"].strip().endswith("> 0.8")
    assert "RedisDown" in rules
    severity = {
        r["alert"]: r["labels"]["severity"] for r in alerts
    }
    assert severity == {
        "SubflowStateFailuresHigh": "critical",  # as the monitor's rules
        "RedisEvictionsHigh": "critical",
        "SubflowStateLatencyHigh": "warning",
        "RedisMemoryNearMax": "warning",
        "RedisDown": "critical",
        "RedisMetricsAbsent": "critical",
    }


def test_two_tier_prometheus_config_scrapes_every_gateway(promtool: Path) -> None:
    """The overlay's Prometheus config passes promtool and keeps prometheus.yml's jobs, over the gateways."""
    path = COLLECTOR / "prometheus.two-tier.yml"
    result = run([str(promtool), "check", "config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    single, two = load(COLLECTOR / "prometheus.yml"), load(path)
    assert two["rule_files"] == single["rule_files"]
    assert [j["job_name"] for j in two["scrape_configs"]] == [j["job_name"] for j in single["scrape_configs"]]
    jobs = {j["job_name"]: j for j in two["scrape_configs"]}
    app = jobs["otel-subflow-collector"]
    assert app["honor_labels"] is True
    assert app["static_configs"] == [{"targets": ["gateway-1:8889", "gateway-2:8889"]}]
    assert jobs["otelcol-internal"]["static_configs"] == [
        {"targets": ["collector:8888", "gateway-1:8888", "gateway-2:8888"]}
    ]


def test_prometheus_config_and_local_copy_are_valid(promtool: Path, tmp_path: Path) -> None:
    """collector/prometheus.yml and the copy the local stack renders both pass promtool."""
    rendered = render_prometheus_config(COLLECTOR, StackPorts.free(), "1s")
    (tmp_path / "prometheus.yml").write_text(rendered)
    for path in (COLLECTOR / "prometheus.yml", tmp_path / "prometheus.yml"):
        result = run([str(promtool), "check", "config", str(path)])
        assert result.returncode == 0, result.stdout + result.stderr
    original, local = load(COLLECTOR / "prometheus.yml"), yaml.safe_load(rendered)
    strip = [{k: v for k, v in job.items() if k != "static_configs"} for job in original["scrape_configs"]]
    assert strip == [{k: v for k, v in job.items() if k != "static_configs"} for job in local["scrape_configs"]]
    assert [Path(p).name for p in local["rule_files"]] == original["rule_files"]


# -- docker-compose ----------------------------------------------------------------------


def test_docker_compose_config_is_valid(docker_compose: Path) -> None:
    """`docker-compose config` accepts the stack; the vendor override needs its env vars."""
    result = run([str(docker_compose), "-f", "docker-compose.yml", "config", "-q"], env=clean_env())
    assert result.returncode == 0, result.stderr
    both = [str(docker_compose), "-f", "docker-compose.yml", "-f", "docker-compose.vendor.yml", "config"]
    missing = run([*both, "-q"], env=clean_env())
    assert missing.returncode != 0
    assert "OTEL_SUBFLOW_VENDOR_ENDPOINT" in missing.stderr
    ok = run(both, env=clean_env(**VENDOR_ENV))
    assert ok.returncode == 0, ok.stderr
    merged = yaml.safe_load(ok.stdout)["services"]["collector"]
    assert merged["command"] == [
        "--config=/etc/otel-subflow/otelcol.yaml",
        "--config=/etc/otel-subflow/vendor-overlay.yaml",
    ]


def test_docker_compose_two_tier_overlay_is_valid(docker_compose: Path) -> None:
    """`docker-compose -f docker-compose.yml -f docker-compose.two-tier.yml config` accepts the overlay:
    the base collector becomes the agent, routing to gateways that run the base collector's config and
    settings; Prometheus scrapes the gateways."""
    result = run(
        [str(docker_compose), "-f", "docker-compose.yml", "-f", "docker-compose.two-tier.yml", "config"],
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    base = load(REPO / "docker-compose.yml")["services"]
    agent = services["collector"]
    assert agent["command"] == ["--config=/etc/otel-subflow/agent.yaml"]
    assert _mounts(agent)["/etc/otel-subflow/agent.yaml"].endswith("collector/agent.yaml")
    agent_env = agent["environment"]
    assert set(agent_env) == set(base["collector"]["environment"]) | {"OTEL_SUBFLOW_GATEWAYS"}
    gateways = yaml.safe_load(agent_env["OTEL_SUBFLOW_GATEWAYS"])
    assert gateways == ["gateway-1:4317", "gateway-2:4317"]
    for endpoint in gateways:
        name = endpoint.split(":")[0]
        gateway = services[name]
        assert gateway["image"] == base["collector"]["image"]
        assert gateway["command"] == base["collector"]["command"]
        assert set(_mounts(gateway).values()) == {str(REPO / "collector" / "otelcol.yaml")}
        # The base collector's settings, which the agent inherits and does not read.
        assert gateway["environment"] == {k: v for k, v in agent_env.items() if k != "OTEL_SUBFLOW_GATEWAYS"}
        assert name in agent["depends_on"]
        assert not gateway.get("ports"), "only the agent takes the apps' OTLP"
    assert _mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == str(
        REPO / "collector" / "prometheus.two-tier.yml"
    )
    # The demo still sends to the `collector` service, which is now the agent.
    assert services["demo"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> repo-relative source."""
    out = {}
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        out[dst] = str(Path(src).as_posix()).removeprefix("./")
    return out


def _published(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[0]) for p in service.get("ports", [])}


def test_compose_and_local_stack_use_the_same_files_ports_and_versions() -> None:
    """What docker compose runs is what the local stack and the tests run."""
    compose = load(REPO / "docker-compose.yml")["services"]
    ports = StackPorts()
    collector = compose["collector"]
    assert _mounts(collector) == {"/etc/otel-subflow/otelcol.yaml": "collector/otelcol.yaml"}
    assert collector["command"] == ["--config=/etc/otel-subflow/otelcol.yaml"]
    assert _published(collector) == {
        ports.otlp_grpc,
        ports.otlp_http,
        ports.collector_prometheus,
        ports.collector_health,
    }
    # The collector's env overrides only host names (compose service names), never ports.
    env = collector["environment"]
    assert env["OTEL_SUBFLOW_JAEGER_ENDPOINT"] == f"jaeger:{ports.jaeger_otlp_grpc}"
    assert env["OTEL_SUBFLOW_REDIS_ENDPOINT"] == "redis:6379"
    assert not any(k.endswith("_PORT") for k in env)

    jaeger = compose["jaeger"]
    assert _mounts(jaeger) == {"/etc/jaeger/jaeger.yaml": "collector/jaeger.yaml"}
    assert _published(jaeger) == {ports.jaeger_query}
    assert not any(k.endswith("_PORT") for k in jaeger["environment"])

    prom = compose["prometheus"]
    assert _mounts(prom) == {
        "/etc/prometheus/prometheus.yml": "collector/prometheus.yml",
        "/etc/prometheus/alerts.yml": "collector/alerts.yml",
    }
    assert _published(prom) == {ports.prometheus}
    assert prom["image"] == "prom/prometheus:v2.42.0"
    # Prometheus targets in the file are the compose service and the ports the stack defaults to.
    targets = [
        t
        for job in load(COLLECTOR / "prometheus.yml")["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    assert targets == [f"collector:{ports.collector_prometheus}", f"collector:{ports.collector_telemetry}"]

    # Defaults in the configs are the StackPorts defaults.
    otelcol_text = (COLLECTOR / "otelcol.yaml").read_text()
    for var, port in [
        ("OTEL_SUBFLOW_OTLP_GRPC_PORT", ports.otlp_grpc),
        ("OTEL_SUBFLOW_OTLP_HTTP_PORT", ports.otlp_http),
        ("OTEL_SUBFLOW_PROMETHEUS_PORT", ports.collector_prometheus),
        ("OTEL_SUBFLOW_HEALTH_PORT", ports.collector_health),
        ("OTEL_SUBFLOW_TELEMETRY_PORT", ports.collector_telemetry),
    ]:
        assert f"${{env:{var}:-{port}}}" in otelcol_text
    assert f"${{env:OTEL_SUBFLOW_JAEGER_ENDPOINT:-localhost:{ports.jaeger_otlp_grpc}}}" in otelcol_text
    jaeger_text = (COLLECTOR / "jaeger.yaml").read_text()
    for var, port in [
        ("JAEGER_OTLP_GRPC_PORT", ports.jaeger_otlp_grpc),
        ("JAEGER_OTLP_HTTP_PORT", ports.jaeger_otlp_http),
        ("JAEGER_QUERY_PORT", ports.jaeger_query),
        ("JAEGER_HEALTH_PORT", ports.jaeger_health),
        ("JAEGER_METRICS_PORT", ports.jaeger_metrics),
    ]:
        assert f"${{env:{var}:-{port}}}" in jaeger_text

    # Redis: keyspace events and an evicting policy on the command line.
    redis_cmd = compose["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--notify-keyspace-events") + 1] == "Exeg"
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1].startswith("volatile-")

    # Grafana: provisioning and the dashboard from collector/grafana.
    assert set(_mounts(compose["grafana"]).values()) == {
        "collector/grafana/provisioning",
        "collector/grafana/dashboards",
    }


def test_no_jaeger_or_collector_port_clash() -> None:
    """Every local-stack port is distinct, so collector and Jaeger run side by side."""
    ports = [getattr(StackPorts(), f) for f in StackPorts.__dataclass_fields__]
    assert len(ports) == len(set(ports))


def test_grafana_dashboard_has_the_state_panels() -> None:
    """Operation rate, miss rate by cause and p99 duration panels over the exported names."""
    dash = json.loads((COLLECTOR / "grafana" / "dashboards" / "subflow-state.json").read_text())
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dash["panels"]}
    assert "subflow_state_operation_duration_seconds_count" in exprs["State operation rate"]
    assert "sum by (subflow_missing_cause) (rate(subflow_state_missing_total" in exprs["Missing state rate by cause"]
    assert "histogram_quantile(0.99" in exprs["p99 state operation duration"]
    assert "subflow:state_missing:corrected_total" in exprs["Missing states by cause, corrected"]
    ds_uid = load(COLLECTOR / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == ds_uid for p in dash["panels"])


def test_jaeger_does_not_trace_itself_into_our_collector() -> None:
    """Jaeger v2 traces its own queries to localhost:4317 by default: the collector's port."""
    assert load(COLLECTOR / "jaeger.yaml")["extensions"]["jaeger_query"]["enable_tracing"] is False
