"""What every part of the local stack shares: its error and its ports."""

from __future__ import annotations

import dataclasses
import socket
import urllib.error
import urllib.request

LOOPBACK = "127.0.0.1"


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
                s.bind((LOOPBACK, 0))
                socks.append(s)
            ports = [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()
        return cls(**dict(zip(names, ports, strict=True)))


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """The URL answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False
