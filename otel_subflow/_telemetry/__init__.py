"""OpenTelemetry plumbing: the instruments the decorators record with, and ``configure()``.

- ``instruments``: tracer, histogram and counters of a decorator, and the structured log records;
- ``exporters``: which exporter each signal gets (``OTEL_*_EXPORTER``), chosen in one place;
- ``setup``: ``configure()`` / ``shutdown()`` for applications that want one call.
"""
