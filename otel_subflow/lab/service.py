"""The lab's workflow service, decorated exactly as the README tells users to."""

from __future__ import annotations

from typing import Any

import redis

from otel_subflow import instrument_state_get, instrument_state_init


@instrument_state_init()
def initialize_state(redis: redis.Redis, run_id: str, node_id: str, data: str, ttl_ms: int = 60_000) -> bool:
    """Write a node's sub-flow state with a TTL."""
    return bool(redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms))


@instrument_state_get()
def get_state(redis: redis.Redis, run_id: str, node_id: str) -> Any:
    """Read a node's sub-flow state; ``None`` when it is missing."""
    return redis.get(f"subflow:state:{run_id}:{node_id}")
