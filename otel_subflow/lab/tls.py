"""Throw-away TLS certificates for a test redis-server (made with the ``openssl`` command)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

from otel_subflow.lab.process import RedisServerError


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost (see :func:`make_tls_files`)."""

    ca_cert: Path
    cert: Path
    key: Path


def make_tls_files(directory: str | Path) -> TlsFiles:
    """Create a CA and a server certificate with the ``openssl`` command (raises RedisServerError without it)."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise RedisServerError("openssl not found: needed to make test certificates")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert, key, csr, cert = (d / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = d / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=otel-subflow test CA",
         "-keyout", str(ca_key), "-out", str(ca_cert)],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(csr)],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
         "-days", "2", "-extfile", str(ext), "-out", str(cert)],
    ]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, check=False, timeout=60)
        if proc.returncode != 0:
            raise RedisServerError(f"openssl failed: {proc.stderr[-500:]}")
    return TlsFiles(ca_cert=ca_cert, cert=cert, key=key)
