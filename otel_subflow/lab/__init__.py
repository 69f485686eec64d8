"""The fault-injection lab: real redis-server processes and workers that produce each cause."""

from otel_subflow.lab.process import RedisServerError, free_port
from otel_subflow.lab.servers import RedisServer, find_redis_server

__all__ = ["RedisServer", "RedisServerError", "find_redis_server", "free_port"]
