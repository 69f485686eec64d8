"""Decorators that fit real code (issue 13, point 1): only Redis clients, ``missing_on=``, ``wrote=``,
watchers with several key templates, no made-up key attribute, a key prefixed on one side only."""

from __future__ import annotations

import sys
import textwrap

import pytest

from otel_subflow import SubflowInstrumentor, instrument_state_get, names


def _span(spans, name):
    return next(s for s in spans() if s.name == name)


def _missing_event(span):
    return next(e for e in span.events if e.name == names.EVENT_STATE_MISSING).attributes


# -- never a made-up key attribute ----------------------------------------------------------------


def test_no_key_attribute_when_the_call_lacks_a_template_field(r, spans):
    """A run id, node id or template field the call does not give leaves the key out (never
    ``...:None``), and the miss's verdict says the key could not be built."""

    @instrument_state_get(key="wf:{tenant}:{run_id}:{node_id}")
    def load(redis, tenant, run_id, node_id):
        return None

    load(r, "acme", "R1", None)
    load(r, None, "R1", "N1")
    load(r, "acme", "R1", "N1")
    no_node, no_tenant, full = [s for s in spans() if s.name == names.SPAN_STATE_GET]
    for span in (no_node, no_tenant):
        assert names.ATTR_STATE_KEY not in span.attributes
        assert "None" not in str(dict(span.attributes))
        assert _missing_event(span)[names.ATTR_MISSING_CAUSE] == names.CAUSE_UNKNOWN
        assert "key could not be built" in _missing_event(span)[names.ATTR_MISSING_SUMMARY]
    assert full.attributes[names.ATTR_STATE_KEY] == "wf:acme:R1:N1"


CELERY_LIKE = '''
class Backend:
    """No run_id / node_id parameters, the client in another attribute, as Celery's RedisBackend."""

    def __init__(self, client):
        self.conn = client

    def get_task_meta(self, task_id):
        return self.conn.get("celery-task-meta-" + task_id)
'''


def test_env_var_path_never_makes_up_a_key(r, spans, tmp_path, monkeypatch):
    """``OTEL_SUBFLOW_INSTRUMENT_GET`` on a function without run/node parameters: the span has no key
    attribute (the issue saw ``subflow:state:None:None``); an attribute path the object lacks is a
    missing value, not an untraced call."""
    (tmp_path / "fit_celery_like.py").write_text(textwrap.dedent(CELERY_LIKE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OTEL_SUBFLOW_WATCH", "false")
    import fit_celery_like

    instrumentor = SubflowInstrumentor()
    with pytest.warns(UserWarning):
        instrumentor.instrument(get_targets="fit_celery_like:Backend.get_task_meta[client=self.nope.deeper]")
    try:
        assert fit_celery_like.Backend(r).get_task_meta("t-1") is None
    finally:
        instrumentor.uninstrument()
        sys.modules.pop("fit_celery_like", None)
    span = _span(spans, names.SPAN_STATE_GET)
    assert names.ATTR_STATE_KEY not in span.attributes
    assert span.attributes[names.ATTR_STATE_OUTCOME] == names.OUTCOME_MISS
    assert "None" not in str(dict(span.attributes))
