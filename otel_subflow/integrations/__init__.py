"""Instrumentors for the workflow engines that keep their state in Redis (each engine an extra).

The core package never imports an engine: each module here imports its engine itself, and is
loaded only when its instrumentor is used (``opentelemetry-instrument`` finds them by entry point).
"""
