"""Fetch the traces of a run from Jaeger's HTTP query API (stdlib only).

``GET /api/traces?service=S&tags={"subflow.run_id":"R"}&start=&end=&limit=``,
start and end in unix microseconds. Jaeger matches all tags within one span
plus its resource, which is why every span carries ``subflow.run_id``.
Without a service name, every service Jaeger knows is searched.

Credentials in the base URL (``http://user:password@jaeger:16686``, e.g. Jaeger
behind a proxy with basic auth) go in an ``Authorization`` header, never in a
requested or shown URL; messages name the URL masked.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from otel_subflow import names
from otel_subflow.cli._secrets import basic_auth_header, join_url, mask_url, scrub, url_secrets


class JaegerError(RuntimeError):
    """Jaeger could not be queried."""


class JaegerClient:
    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.masked = mask_url(self.base_url)
        self.timeout_s = timeout_s
        self._headers = basic_auth_header(self.base_url)
        self._secrets = url_secrets(self.base_url)

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        try:
            # Secret query parameters of the base URL are kept for the request: it is never shown.
            url = join_url(self.base_url, path, params, keep_secret_params=True)
            request = urllib.request.Request(url)
            for name, value in self._headers.items():
                request.add_unredirected_header(name, value)  # never forwarded to where a redirect points
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            detail = scrub(str(getattr(exc, "reason", exc)), self._secrets)
            raise JaegerError(f"Jaeger at {self.masked}: {detail}") from None

    def services(self) -> list[str]:
        data = self._get("/api/services").get("data") or []
        return [str(s) for s in data]

    def traces_of_run(
        self, run_id: str, start_us: int, end_us: int, *, service: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        """Every trace with a span tagged ``subflow.run_id=run_id`` between start and end (deduplicated)."""
        services = [service] if service else self.services()
        found: dict[str, dict[str, Any]] = {}
        for name in services:
            reply = self._get("/api/traces", {
                "service": name,
                "tags": json.dumps({names.ATTR_RUN_ID: run_id}),
                "start": start_us,
                "end": end_us,
                "limit": limit,
            })
            for trace in reply.get("data") or []:
                trace_id = str(trace.get("traceID", ""))
                if trace_id and trace_id not in found:
                    found[trace_id] = trace
        return list(found.values())
