"""A TCP proxy that can hold back one direction of chosen connections: replica lag on demand.

A replica pointed at the proxy replicates through it; :meth:`LagProxy.hold`
stops forwarding the master's stream on replication links (connections whose
client spoke REPLCONF or PSYNC), while other connections (clients of the
master) pass straight through. :meth:`LagProxy.release` delivers what was held.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

from otel_subflow.lab.process import free_port


class LagProxy:
    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._thread = threading.Thread(target=self._accept, name="lab-lag-proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            link = _Link(client, upstream, self._stop)
            with self._lock:
                self._links.append(link)
            link.start()

    def hold(self) -> None:
        """Hold back master-to-replica data on every existing connection."""
        with self._lock:
            for link in self._links:
                if link.replication:
                    link.held.set()

    def release(self) -> None:
        with self._lock:
            for link in self._links:
                link.held.clear()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for link in self._links:
                link.close()
        self._thread.join(2)


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket, stop: threading.Event) -> None:
        self.client, self.upstream = client, upstream
        self.stop = stop
        self.held = threading.Event()
        self.alive = True
        self.replication = False
        self._pending = bytearray()
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _pump(self) -> None:
        sockets = [self.client, self.upstream]
        try:
            while not self.stop.is_set() and self.alive:
                if not self.held.is_set() and self._pending:
                    self.client.sendall(self._pending)
                    self._pending.clear()
                readable, _, _ = select.select(sockets, [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        self.alive = False
                        break
                    if sock is self.client:
                        if b"REPLCONF" in data or b"PSYNC" in data:
                            self.replication = True
                        self.upstream.sendall(data)
                    elif self.held.is_set() or self._pending:
                        self._pending += data
                    else:
                        self.client.sendall(data)
        except OSError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.alive = False
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.close()
