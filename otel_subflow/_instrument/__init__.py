"""The decorators: what a call of the user's function becomes.

- ``decorators``: ``instrument_state_get`` / ``instrument_state_init`` and the sync and async wrappers;
- ``spec``: what a decorator compiles once (argument sources, key template, instruments);
- ``call``: one call from span start to span end (outcome, metric, log, journal, the miss's analysis);
- ``args``: reading run id, node id, key, client and TTL out of a call's arguments;
- ``context``: run and node ids carried to child spans (baggage and a span processor);
- ``instrumentor``: the zero-code path (``OTEL_SUBFLOW_INSTRUMENT_*``, ``opentelemetry-instrument``).
"""
