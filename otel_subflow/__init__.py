"""otel-subflow: OpenTelemetry instrumentation that explains missing sub-flow state in Redis.

Decorate the functions that read and write the state::

    from otel_subflow import configure, instrument_state_get, instrument_state_init

    configure(service_name="workflow-engine")

    @instrument_state_init()
    def initialize_state(redis, run_id, node_id, data, ttl_ms=60_000): ...

    @instrument_state_get()
    def get_state(redis, run_id, node_id): ...

Every miss gets a verdict (span event ``subflow.state.missing``, a
``MISSING_STATE_ANALYSIS`` log record and the ``subflow.state.missing`` metric).
The names of the contract live in :mod:`otel_subflow.names`.
"""

import logging

from otel_subflow import names
from otel_subflow._analysis.verdict import Verdict
from otel_subflow._config import SubflowConfig
from otel_subflow._instrument.args import SubflowInstrumentationWarning
from otel_subflow._instrument.context import RunContextSpanProcessor
from otel_subflow._instrument.decorators import instrument_state_get, instrument_state_init
from otel_subflow._instrument.instrumentor import SubflowInstrumentor
from otel_subflow._journal.location import flush_journals
from otel_subflow._journal.writer import JournalStats
from otel_subflow._telemetry.setup import Telemetry, configure, shutdown
from otel_subflow._version import __version__
from otel_subflow._watch.events import EventsCheck, KeyspaceEventsOff
from otel_subflow._watch.watcher import KeyspaceWatcher

# A library never prints through logging's last-resort handler: applications choose.
logging.getLogger(names.LOGGER_NAME).addHandler(logging.NullHandler())

__all__ = [
    "EventsCheck",
    "JournalStats",
    "KeyspaceEventsOff",
    "KeyspaceWatcher",
    "RunContextSpanProcessor",
    "SubflowConfig",
    "SubflowInstrumentationWarning",
    "SubflowInstrumentor",
    "Telemetry",
    "Verdict",
    "__version__",
    "configure",
    "flush_journals",
    "instrument_state_get",
    "instrument_state_init",
    "names",
    "shutdown",
]
