"""A small service decorated with otel_subflow, run in its own interpreter by the e2e tests.

configure() reads the OTEL_* variables the test sets (endpoint, protocol,
service name), so the telemetry goes through the stack's collector. Scenarios:
  hit            init then get: outcome created / hit
  never_written  get of a node no one initialised: a miss with a verdict
  expired        init with a 100 ms TTL, get as soon as Redis expired the key
                 (inside the journal's flush interval: the verdict must still say expired)
Prints one JSON line: {"hit": [[run, node], ...], "never_written": [...], "expired": [...],
"host": ..., "pid": ..., "redis_port": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from typing import Any

import redis

from otel_subflow import configure, instrument_state_get, instrument_state_init, shutdown


@instrument_state_init()
def initialize_state(redis: redis.Redis, run_id: str, node_id: str, data: str, ttl_ms: int = 60_000) -> None:
    redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms)


@instrument_state_get()
def get_state(redis: redis.Redis, run_id: str, node_id: str) -> Any:
    return redis.get(f"subflow:state:{run_id}:{node_id}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--hit", type=int, default=0)
    parser.add_argument("--never-written", type=int, default=0)
    parser.add_argument("--expired", type=int, default=0)
    args = parser.parse_args()

    telemetry = configure(service_name=os.environ["OTEL_SERVICE_NAME"])
    client = redis.Redis.from_url(os.environ["E2E_REDIS_URL"])
    out: dict[str, Any] = {"hit": [], "never_written": [], "expired": []}

    for i in range(args.hit):
        run, node = f"{args.prefix}-hit-{i}", f"{args.prefix}-node-hit-{i}"
        initialize_state(client, run, node, "{}")
        assert get_state(client, run, node) == b"{}"
        out["hit"].append([run, node])

    for i in range(args.never_written):
        run, node = f"{args.prefix}-nw-{i}", f"{args.prefix}-node-nw-{i}"
        # Another node of the run exists, the asked one was never written.
        initialize_state(client, run, f"{node}-sibling", "{}")
        assert get_state(client, run, node) is None
        out["never_written"].append([run, node])

    for i in range(args.expired):
        run, node = f"{args.prefix}-exp-{i}", f"{args.prefix}-node-exp-{i}"
        initialize_state(client, run, node, "{}", ttl_ms=100)
        key = f"subflow:state:{run}:{node}"
        deadline = time.monotonic() + 5
        while client.exists(key) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert get_state(client, run, node) is None
        out["expired"].append([run, node])

    telemetry.force_flush()
    shutdown()
    kwargs = client.connection_pool.connection_kwargs
    out |= {"host": socket.gethostname(), "pid": os.getpid(), "redis_port": kwargs["port"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
