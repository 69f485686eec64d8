"""Who we are: host name and pid, computed once per process (and again after fork)."""

from __future__ import annotations

import os
import socket

from otel_subflow import names


def _host_from_env() -> str | None:
    explicit = os.environ.get("OTEL_SUBFLOW_HOST_NAME")
    if explicit:
        return explicit
    for item in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip() == names.RES_HOST_NAME and value.strip():
            return value.strip()
    return None


class _Identity:
    def __init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        self.host = _host_from_env() or socket.gethostname()
        self.pid = os.getpid()


identity = _Identity()
os.register_at_fork(after_in_child=identity.refresh)
