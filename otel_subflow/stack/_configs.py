"""The bundled configs: the collector's, Jaeger's, Prometheus's and its alert rules.

They ship inside the package (``otel_subflow/stack/collector/``); a checkout's
``collector/`` is a symlink to them, which docker-compose.yml mounts.
"""

from __future__ import annotations

import os
from pathlib import Path

from otel_subflow.stack._common import LOOPBACK, StackError, StackPorts

BUNDLED = Path(__file__).resolve().parent / "collector"


def collector_config_dir() -> Path:
    """The directory holding the bundled configs; ``OTEL_SUBFLOW_COLLECTOR_DIR`` overrides it."""
    override = os.environ.get("OTEL_SUBFLOW_COLLECTOR_DIR")
    path = Path(override) if override else BUNDLED
    if not (path / "otelcol.yaml").is_file():
        where = "OTEL_SUBFLOW_COLLECTOR_DIR" if override else "the installed package (reinstall otel-subflow)"
        raise StackError(f"collector configs not found in {path}: check {where}")
    return path


def render_prometheus_config(config_dir: Path, ports: StackPorts, scrape_interval: str) -> str:
    """collector/prometheus.yml with its compose targets replaced by this stack's loopback ports.

    Every replacement must match exactly once, so a change to the file that the
    local stack would silently miss fails here instead.
    """
    text = (config_dir / "prometheus.yml").read_text()
    replacements = [
        ('"collector:8889"', f'"{LOOPBACK}:{ports.collector_prometheus}"'),
        ('"collector:8888"', f'"{LOOPBACK}:{ports.collector_telemetry}"'),
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
