"""A sub-flow state service decorated exactly as the README shows."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aredis

from otel_subflow import instrument_state_get, instrument_state_init


@instrument_state_init()
def initialize_state(redis: redis.Redis, run_id: str, node_id: str, data: str, ttl_ms: int = 60_000) -> bool:
    return bool(redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms))


@instrument_state_get()
def get_state(redis: redis.Redis, run_id: str, node_id: str) -> Any:
    return redis.get(f"subflow:state:{run_id}:{node_id}")


class StateStore:
    """The method form: the client is ``self.redis``."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    @instrument_state_init()
    def initialize_state(self, run_id: str, node_id: str, data: str, ttl_ms: int = 60_000) -> bool:
        return bool(self.redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms))

    @instrument_state_get()
    def get_state(self, run_id: str, node_id: str) -> Any:
        return self.redis.get(f"subflow:state:{run_id}:{node_id}")


class AsyncStateStore:
    """The async form, on redis.asyncio."""

    def __init__(self, client: aredis.Redis) -> None:
        self.client = client

    @instrument_state_init()
    async def initialize_state(self, run_id: str, node_id: str, data: str, ttl_ms: int = 60_000) -> bool:
        return bool(await self.client.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms))

    @instrument_state_get()
    async def get_state(self, run_id: str, node_id: str) -> Any:
        return await self.client.get(f"subflow:state:{run_id}:{node_id}")
