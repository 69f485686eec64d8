"""The fault-injection lab: real redis-server processes and workers that produce each cause."""

from otel_subflow.lab.servers import RedisServer, RedisServerError, find_redis_server, free_port

__all__ = ["RedisServer", "RedisServerError", "find_redis_server", "free_port"]
