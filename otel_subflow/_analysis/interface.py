"""What the analysis, the report and the journal read of a call: the interface between the parts.

A decorated call (``_instrument/call.py``) provides all of it; an analysis outside any
call (the CLI's ``--missing-state``) provides :class:`StateQuery`, which has no span.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol

from otel_subflow._config import SubflowConfig
from otel_subflow._redis.connection import ConnectionInfo, connection_info

if TYPE_CHECKING:
    from opentelemetry import trace

    from otel_subflow._journal.races import MissRecord
    from otel_subflow._telemetry.instruments import Instruments


class StateCall(Protocol):
    """One read of one state: what the miss analysis needs."""

    @property
    def client(self) -> object:
        """The application's Redis client (anything else: the analysis says it found none)."""

    @property
    def config(self) -> SubflowConfig: ...

    @property
    def run_id(self) -> str | None: ...

    @property
    def node_id(self) -> str | None: ...

    @property
    def key(self) -> str | None: ...

    @property
    def info(self) -> ConnectionInfo | None:
        """What is known of the client's connections (server address, ids), learned without a round trip."""


class TracedCall(StateCall, Protocol):
    """A decorated call: what the report (span event, log, metric) and the journal also read."""

    @property
    def span(self) -> trace.Span: ...

    @property
    def instruments(self) -> Instruments:
        """The decorator's instruments: its ``tracer_provider=`` / ``meter_provider=``, or the global ones."""

    @property
    def ttl_ms(self) -> int | None: ...

    @property
    def race_of(self) -> MissRecord | None:
        """An init only: the miss of this key in this process that it answers (a read-before-init race)."""


@dataclasses.dataclass
class StateQuery:
    """A state to analyse outside any decorated call (implements :class:`StateCall`)."""

    client: object
    run_id: str | None
    node_id: str | None
    key: str | None
    config: SubflowConfig
    info: ConnectionInfo | None = None

    def __post_init__(self) -> None:
        if self.info is None:
            self.info = connection_info(self.client)
