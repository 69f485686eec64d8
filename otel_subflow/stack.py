"""The otel-subflow stack without Docker: collector, Jaeger and Prometheus as local processes.

Runs the binaries that ``scripts/build_binaries.sh`` builds (cached outside the
repository, keyed by version) with the bundled configs in ``collector/``, on
loopback only, each pointed at the others through the same environment
variables that docker-compose.yml sets.

Example::

    from otel_subflow.stack import LocalStack, StackPorts

    with LocalStack(ports=StackPorts.free()) as stack:
        print(stack.urls["jaeger"])
        # export OTLP to stack.otlp_grpc_endpoint ...

From a shell: ``python -m otel_subflow.stack`` (or ``make stack``) builds or finds
the binaries, starts everything, prints the URLs and stops on Ctrl-C.

Only the standard library is used here, so this module works before (and
without) the rest of the package's dependencies.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "JAEGER_MODULE_VERSION",
    "JAEGER_VERSION",
    "OTELCOL_VERSION",
    "Binaries",
    "LocalStack",
    "StackError",
    "StackPorts",
    "build_binaries",
    "collector_config_dir",
    "find_binaries",
    "main",
    "render_prometheus_config",
]

OTELCOL_VERSION = "0.161.0"
#: Go module version of github.com/jaegertracing/jaeger that is built ...
JAEGER_MODULE_VERSION = "1.76.0"
#: ... and the Jaeger v2 release (docker image tag) it corresponds to.
JAEGER_VERSION = "2.13.0"

_LOOPBACK = "127.0.0.1"


class StackError(RuntimeError):
    """A stack component could not be found, built or started."""


@dataclasses.dataclass(frozen=True)
class StackPorts:
    """Every port the stack listens on. Defaults are the docker-compose ports."""

    otlp_grpc: int = 4317
    otlp_http: int = 4318
    collector_prometheus: int = 8889
    collector_health: int = 13133
    collector_telemetry: int = 8888
    jaeger_otlp_grpc: int = 14317
    jaeger_otlp_http: int = 14318
    jaeger_query: int = 16686
    jaeger_query_grpc: int = 16685
    jaeger_health: int = 14133
    jaeger_metrics: int = 14269
    prometheus: int = 9090

    @classmethod
    def free(cls) -> StackPorts:
        """Ports the OS reports free on loopback right now (for tests running in parallel)."""
        names = [f.name for f in dataclasses.fields(cls)]
        socks: list[socket.socket] = []
        try:
            for _ in names:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((_LOOPBACK, 0))
                socks.append(s)
            ports = [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()
        return cls(**dict(zip(names, ports, strict=True)))


@dataclasses.dataclass(frozen=True)
class Binaries:
    """Executables the stack runs."""

    otelcol: Path
    jaeger: Path
    prometheus: Path


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def collector_config_dir() -> Path:
    """The directory holding the bundled configs (``collector/`` of the source tree).

    ``OTEL_SUBFLOW_COLLECTOR_DIR`` overrides it.
    """
    override = os.environ.get("OTEL_SUBFLOW_COLLECTOR_DIR")
    path = Path(override) if override else _repo_root() / "collector"
    if not (path / "otelcol.yaml").is_file():
        raise StackError(
            f"bundled collector configs not found in {path}; run from a source checkout "
            "or set OTEL_SUBFLOW_COLLECTOR_DIR"
        )
    return path


def cache_dir() -> Path:
    """Where scripts/build_binaries.sh keeps the binaries (outside the repository)."""
    override = os.environ.get("OTEL_SUBFLOW_CACHE_DIR")
    return Path(override) if override else Path.home() / ".cache" / "otel-subflow"


def find_binaries(
    require: Sequence[str] = ("collector", "jaeger", "prometheus"),
) -> Binaries:
    """Locate the binaries; each can be overridden with an ``OTEL_SUBFLOW_*_BIN`` variable.

    Raises StackError naming every binary in ``require`` (component names) that
    is missing.
    """
    cache = cache_dir()
    otelcol = Path(
        os.environ.get("OTEL_SUBFLOW_OTELCOL_BIN") or cache / f"otelcol-subflow-v{OTELCOL_VERSION}" / "otelcol-subflow"
    )
    jaeger = Path(os.environ.get("OTEL_SUBFLOW_JAEGER_BIN") or cache / f"jaeger-v{JAEGER_MODULE_VERSION}" / "jaeger")
    prom_env = os.environ.get("OTEL_SUBFLOW_PROMETHEUS_BIN")
    prometheus = Path(prom_env or shutil.which("prometheus") or "prometheus")
    missing = [
        f"{path} ({hint})"
        for component, path, hint in [
            ("collector", otelcol, "scripts/build_binaries.sh collector"),
            ("jaeger", jaeger, "scripts/build_binaries.sh jaeger"),
            ("prometheus", prometheus, "apt-get install prometheus"),
        ]
        if component in require and not os.access(path, os.X_OK)
    ]
    if missing:
        raise StackError("missing binaries: " + ", ".join(missing))
    return Binaries(otelcol=otelcol, jaeger=jaeger, prometheus=prometheus)


def build_binaries() -> Binaries:
    """Run scripts/build_binaries.sh (a no-op when the cache holds both) and locate the results."""
    script = _repo_root() / "scripts" / "build_binaries.sh"
    if not script.is_file():
        raise StackError(f"{script} not found: building needs a source checkout")
    result = subprocess.run(["bash", str(script), "all"], check=False)
    if result.returncode != 0:
        raise StackError(f"{script} failed with exit code {result.returncode}")
    return find_binaries()


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


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
        redis_endpoint: str = f"{_LOOPBACK}:6379",
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
    def otlp_grpc_endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT with protocol grpc."""
        return f"http://{_LOOPBACK}:{self.ports.otlp_grpc}"

    @property
    def otlp_http_endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT with protocol http/protobuf."""
        return f"http://{_LOOPBACK}:{self.ports.otlp_http}"

    @property
    def urls(self) -> dict[str, str]:
        p = self.ports
        return {
            "otlp_grpc": self.otlp_grpc_endpoint,
            "otlp_http": self.otlp_http_endpoint,
            "jaeger": f"http://{_LOOPBACK}:{p.jaeger_query}",
            "prometheus": f"http://{_LOOPBACK}:{p.prometheus}",
            "collector_metrics": f"http://{_LOOPBACK}:{p.collector_prometheus}/metrics",
            "collector_health": f"http://{_LOOPBACK}:{p.collector_health}/",
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
                "JAEGER_LISTEN_HOST": _LOOPBACK,
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
            health = f"http://{_LOOPBACK}:{p.jaeger_query}/api/services"
        elif name == "collector":
            env = (
                base_env
                | {
                    "OTEL_SUBFLOW_LISTEN_HOST": _LOOPBACK,
                    "OTEL_SUBFLOW_OTLP_GRPC_PORT": str(p.otlp_grpc),
                    "OTEL_SUBFLOW_OTLP_HTTP_PORT": str(p.otlp_http),
                    "OTEL_SUBFLOW_PROMETHEUS_PORT": str(p.collector_prometheus),
                    "OTEL_SUBFLOW_HEALTH_PORT": str(p.collector_health),
                    "OTEL_SUBFLOW_TELEMETRY_PORT": str(p.collector_telemetry),
                    "OTEL_SUBFLOW_JAEGER_ENDPOINT": f"{_LOOPBACK}:{p.jaeger_otlp_grpc}",
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
            health = f"http://{_LOOPBACK}:{p.collector_health}/"
        else:
            config = self.workdir / "prometheus.yml"
            config.write_text(render_prometheus_config(self.config_dir, p, self.scrape_interval))
            env = base_env
            argv = [
                str(self.binaries.prometheus),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
                f"--web.listen-address={_LOOPBACK}:{p.prometheus}",
                "--log.level=warn",
            ]
            health = f"http://{_LOOPBACK}:{p.prometheus}/-/ready"
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
            if _http_ok(comp.health_url):
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        raise StackError(
            f"{comp.name} not healthy at {comp.health_url} after {self.startup_timeout:.0f}s; "
            f"log {comp.log_path}:\n{self.log_tail(comp.name)}"
        )


def render_prometheus_config(config_dir: Path, ports: StackPorts, scrape_interval: str) -> str:
    """collector/prometheus.yml with its compose targets replaced by this stack's loopback ports.

    Every replacement must match exactly once, so a change to the file that the
    local stack would silently miss fails here instead.
    """
    text = (config_dir / "prometheus.yml").read_text()
    replacements = [
        ('"collector:8889"', f'"{_LOOPBACK}:{ports.collector_prometheus}"'),
        ('"collector:8888"', f'"{_LOOPBACK}:{ports.collector_telemetry}"'),
        ("scrape_interval: 15s", f"scrape_interval: {scrape_interval}"),
        ("evaluation_interval: 15s", f"evaluation_interval: {scrape_interval}"),
        ("  - alerts.yml\n", f"  - {config_dir / 'alerts.yml'}\n"),
    ]
    for old, new in replacements:
        count = text.count(old)
        if count != 1:
            raise StackError(f"{config_dir / 'prometheus.yml'}: expected {old!r} once, found {count}")
        text = text.replace(old, new)
    return text


def _parse_args(argv: Sequence[str] | None, prog: str = "python -m otel_subflow.stack") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the otel-subflow collector, Jaeger and Prometheus locally (no Docker).",
    )
    parser.add_argument("--no-build", action="store_true", help="do not build missing binaries")
    parser.add_argument("--redis", default=f"{_LOOPBACK}:6379", help="host:port for the redis receiver")
    parser.add_argument("--sample-percent", type=float, default=10.0)
    parser.add_argument(
        "--free-ports",
        action="store_true",
        help="use free ports instead of the compose ports",
    )
    parser.add_argument(
        "--vendor",
        action="store_true",
        help="add collector/vendor-overlay.yaml (needs OTEL_SUBFLOW_VENDOR_ENDPOINT and _API_KEY)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m otel_subflow.stack") -> int:
    """Build or find the binaries, start the stack, print URLs, stop on Ctrl-C / SIGTERM.

    ``prog`` names the command in ``--help`` and usage errors (``otel-subflow stack``).
    """
    args = _parse_args(argv, prog)
    try:
        binaries = find_binaries() if args.no_build else build_binaries()
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    overlays: list[Path] = []
    collector_env: dict[str, str] = {}
    if args.vendor:
        missing = [v for v in ("OTEL_SUBFLOW_VENDOR_ENDPOINT", "OTEL_SUBFLOW_VENDOR_API_KEY") if not os.environ.get(v)]
        if missing:
            print(f"error: --vendor needs {', '.join(missing)}", file=sys.stderr)
            return 1
        overlays.append(collector_config_dir() / "vendor-overlay.yaml")
        collector_env = {k: os.environ[k] for k in ("OTEL_SUBFLOW_VENDOR_ENDPOINT", "OTEL_SUBFLOW_VENDOR_API_KEY")}

    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _on_signal)
    stack = LocalStack(
        ports=StackPorts.free() if args.free_ports else StackPorts(),
        binaries=binaries,
        redis_endpoint=args.redis,
        sample_percent=args.sample_percent,
        collector_overlays=overlays,
        collector_env=collector_env,
    )
    try:
        stack.start()  # stops what it started if it fails or is interrupted
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        print("otel-subflow stack is up (Ctrl-C stops it):")
        for name, url in stack.urls.items():
            print(f"  {name:<18} {url}")
        print(f"  {'logs':<18} {stack.workdir}")
        print("App environment:")
        for key, value in stack.app_env().items():
            print(f"  export {key}={value}")
        sys.stdout.flush()
        while not stopping:
            dead = [n for n in ("jaeger", "collector", "prometheus") if not stack.is_running(n)]
            if dead:
                for name in dead:
                    print(
                        f"error: {name} exited; log:\n{stack.log_tail(name)}",
                        file=sys.stderr,
                    )
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping...", file=sys.stderr)
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
