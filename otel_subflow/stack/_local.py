"""LocalStack: the collector, Jaeger and Prometheus as local processes, on loopback.

Each is pointed at the others through the same environment variables that
docker-compose.yml sets, runs in its own process group and is stopped in order
(the collector flushes before Jaeger goes).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from otel_subflow.stack._binaries import Binaries, find_binaries
from otel_subflow.stack._common import LOOPBACK, StackError, StackPorts, http_ok
from otel_subflow.stack._configs import collector_config_dir, render_prometheus_config


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclasses.dataclass
class _Component:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None


class LocalStack:
    """Collector, Jaeger and Prometheus on loopback with the bundled configs.

    Use as a context manager, or call start() / stop(). ``stop_component`` and
    ``start_component`` stop and restart one part (e.g. Jaeger) while the rest
    keeps running.

    Args:
        ports: where everything listens (StackPorts() = the compose ports,
            StackPorts.free() = free ephemeral ports).
        binaries: executables; default find_binaries().
        workdir: logs, generated Prometheus config and its TSDB; default a
            temporary directory removed on stop().
        redis_endpoint: host:port the collector's redis receiver reads.
        sample_percent: tail-sampling share of traces kept without error/missing state.
        decision_wait: tail-sampling wait for a trace's spans (Go duration).
        spanmetrics_flush: span_metrics flush interval (Go duration).
        scrape_interval: Prometheus scrape and rule evaluation interval.
        collector_overlays: extra ``--config`` files after collector/otelcol.yaml
            (e.g. collector/vendor-overlay.yaml).
        collector_env: extra environment for the collector (e.g. the vendor
            endpoint and key; kept out of every file).
        components: which parts to run, in start order.
    """

    def __init__(
        self,
        *,
        ports: StackPorts | None = None,
        binaries: Binaries | None = None,
        workdir: Path | None = None,
        redis_endpoint: str = f"{LOOPBACK}:6379",
        sample_percent: float = 10,
        decision_wait: str = "10s",
        spanmetrics_flush: str = "15s",
        scrape_interval: str = "15s",
        collector_overlays: Sequence[Path] = (),
        collector_env: Mapping[str, str] | None = None,
        components: Sequence[str] = ("jaeger", "collector", "prometheus"),
        startup_timeout: float = 60.0,
    ) -> None:
        unknown = set(components) - {"jaeger", "collector", "prometheus"}
        if unknown:
            raise ValueError(f"unknown components: {sorted(unknown)}")
        self.ports = ports or StackPorts()
        self.binaries = binaries or find_binaries(components)
        self.config_dir = collector_config_dir()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="otel-subflow-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis_endpoint = redis_endpoint
        self.sample_percent = sample_percent
        self.decision_wait = decision_wait
        self.spanmetrics_flush = spanmetrics_flush
        self.scrape_interval = scrape_interval
        self.collector_overlays = [Path(p) for p in collector_overlays]
        self.collector_env = dict(collector_env or {})
        self.startup_timeout = startup_timeout
        self._order = list(components)
        self._components = {name: self._make(name) for name in self._order}

    # -- public surface -------------------------------------------------

    @property
    def components(self) -> tuple[str, ...]:
        """The parts this stack runs, in start order."""
        return tuple(self._order)

    @property
    def otlp_grpc_endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT with protocol grpc."""
        return f"http://{LOOPBACK}:{self.ports.otlp_grpc}"

    @property
    def otlp_http_endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT with protocol http/protobuf."""
        return f"http://{LOOPBACK}:{self.ports.otlp_http}"

    @property
    def urls(self) -> dict[str, str]:
        p = self.ports
        return {
            "otlp_grpc": self.otlp_grpc_endpoint,
            "otlp_http": self.otlp_http_endpoint,
            "jaeger": f"http://{LOOPBACK}:{p.jaeger_query}",
            "prometheus": f"http://{LOOPBACK}:{p.prometheus}",
            "collector_metrics": f"http://{LOOPBACK}:{p.collector_prometheus}/metrics",
            "collector_health": f"http://{LOOPBACK}:{p.collector_health}/",
        }

    def app_env(self, protocol: str = "grpc") -> dict[str, str]:
        """Environment for an app exporting to this stack with the OTel SDK's env configuration."""
        endpoint = self.otlp_grpc_endpoint if protocol == "grpc" else self.otlp_http_endpoint
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            # `otel-subflow diagnose` links and looks up traces here.
            "OTEL_SUBFLOW_JAEGER_URL": self.urls["jaeger"],
        }

    def log_path(self, name: str) -> Path:
        return self._components[name].log_path

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The end of a component's log, as printed on errors: URLs masked, the vendor's secrets replaced.

        The collector gets the vendor endpoint and key in its environment; whatever it logs
        about them (a config error quoting the endpoint, say) must not reach the terminal.
        """
        from otel_subflow.cli._secrets import is_secret_param, scrub, url_secrets  # the cli imports this module

        secrets = [value for key, value in self.collector_env.items() if is_secret_param(key)]
        for value in self.collector_env.values():
            secrets += url_secrets(value)
        return scrub(_tail(self.log_path(name), lines), secrets, one_line=False)

    def is_running(self, name: str) -> bool:
        proc = self._components[name].process
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int | None:
        """The process id of a running component (its CPU and RSS are in /proc/<pid>); None when stopped."""
        proc = self._components[name].process
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> LocalStack:
        try:
            for name in self._order:
                self.start_component(name)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in reversed(self._order):
            self.stop_component(name)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def start_component(self, name: str) -> None:
        comp = self._components[name]
        if self.is_running(name):
            return
        with comp.log_path.open("ab") as log:
            comp.process = subprocess.Popen(
                comp.argv,
                env=comp.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Own process group: a Ctrl-C in the terminal reaches us, and we
                # stop the children in order (collector flushes before Jaeger goes).
                start_new_session=True,
            )
        self._wait_healthy(comp)

    def stop_component(self, name: str, timeout: float = 15.0) -> None:
        comp = self._components[name]
        proc = comp.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        comp.process = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------

    def _make(self, name: str) -> _Component:
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        log_path = self.workdir / f"{name}.log"
        p = self.ports
        if name == "jaeger":
            env = base_env | {
                "JAEGER_LISTEN_HOST": LOOPBACK,
                "JAEGER_OTLP_GRPC_PORT": str(p.jaeger_otlp_grpc),
                "JAEGER_OTLP_HTTP_PORT": str(p.jaeger_otlp_http),
                "JAEGER_QUERY_PORT": str(p.jaeger_query),
                "JAEGER_QUERY_GRPC_PORT": str(p.jaeger_query_grpc),
                "JAEGER_HEALTH_PORT": str(p.jaeger_health),
                "JAEGER_METRICS_PORT": str(p.jaeger_metrics),
            }
            argv = [
                str(self.binaries.jaeger),
                "--config",
                str(self.config_dir / "jaeger.yaml"),
            ]
            health = f"http://{LOOPBACK}:{p.jaeger_query}/api/services"
        elif name == "collector":
            env = (
                base_env
                | {
                    "OTEL_SUBFLOW_LISTEN_HOST": LOOPBACK,
                    "OTEL_SUBFLOW_OTLP_GRPC_PORT": str(p.otlp_grpc),
                    "OTEL_SUBFLOW_OTLP_HTTP_PORT": str(p.otlp_http),
                    "OTEL_SUBFLOW_PROMETHEUS_PORT": str(p.collector_prometheus),
                    "OTEL_SUBFLOW_HEALTH_PORT": str(p.collector_health),
                    "OTEL_SUBFLOW_TELEMETRY_PORT": str(p.collector_telemetry),
                    "OTEL_SUBFLOW_JAEGER_ENDPOINT": f"{LOOPBACK}:{p.jaeger_otlp_grpc}",
                    "OTEL_SUBFLOW_REDIS_ENDPOINT": self.redis_endpoint,
                    "OTEL_SUBFLOW_SAMPLE_PERCENT": f"{self.sample_percent:g}",
                    "OTEL_SUBFLOW_DECISION_WAIT": self.decision_wait,
                    "OTEL_SUBFLOW_SPANMETRICS_FLUSH": self.spanmetrics_flush,
                }
                | self.collector_env
            )
            argv = [
                str(self.binaries.otelcol),
                "--config",
                str(self.config_dir / "otelcol.yaml"),
            ]
            for overlay in self.collector_overlays:
                argv += ["--config", str(overlay.resolve())]
            health = f"http://{LOOPBACK}:{p.collector_health}/"
        else:
            config = self.workdir / "prometheus.yml"
            config.write_text(render_prometheus_config(self.config_dir, p, self.scrape_interval))
            env = base_env
            argv = [
                str(self.binaries.prometheus),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
                f"--web.listen-address={LOOPBACK}:{p.prometheus}",
                "--log.level=warn",
            ]
            health = f"http://{LOOPBACK}:{p.prometheus}/-/ready"
        return _Component(name=name, argv=argv, env=env, health_url=health, log_path=log_path)

    def _wait_healthy(self, comp: _Component) -> None:
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.05
        while time.monotonic() < deadline:
            proc = comp.process
            if proc is None:
                raise StackError(f"{comp.name} was not started")
            if proc.poll() is not None:
                raise StackError(
                    f"{comp.name} exited with code {proc.returncode} during start-up; "
                    f"log {comp.log_path}:\n{self.log_tail(comp.name)}"
                )
            if http_ok(comp.health_url):
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        raise StackError(
            f"{comp.name} not healthy at {comp.health_url} after {self.startup_timeout:.0f}s; "
            f"log {comp.log_path}:\n{self.log_tail(comp.name)}"
        )
