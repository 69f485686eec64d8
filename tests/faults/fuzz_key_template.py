"""atheris target: key templates through decoration, a decorated call and the watcher's parser.

    python tests/faults/fuzz_key_template.py -runs=100000

A crash is any exception other than what the contract allows: decoration may
warn (SubflowInstrumentationWarning), never raise; the call returns the wrapped
function's value; ``key_pattern`` compiles any template.
"""

from __future__ import annotations

import sys
import warnings

import atheris

with atheris.instrument_imports():
    from otel_subflow import SubflowInstrumentationWarning, instrument_state_get
    from otel_subflow._watch.events import key_pattern


def service(redis: object, run_id: str, node_id: str) -> str:
    return "value"


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    template = fdp.ConsumeUnicodeNoSurrogates(48)
    run_id = fdp.ConsumeUnicodeNoSurrogates(12)
    node_id = fdp.ConsumeUnicodeNoSurrogates(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SubflowInstrumentationWarning)
        decorated = instrument_state_get(key=template)(service)
    if decorated(None, run_id, node_id) != "value":
        raise AssertionError("the decorated call changed the return value")
    key_pattern(template)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
