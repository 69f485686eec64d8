"""``opentelemetry-instrument`` with an engine installed and no other code change: the engine's state
spans, with verdicts, over OTLP.

One fresh venv with ``pip install <this checkout>[arq,rq,celery]`` (pip picks the versions its ranges
allow next to redis 8: arq 0.25); each engine's app below is plain engine code, run under
``opentelemetry-instrument``: a write, a hit and a read of something never written."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otel_subflow import names
from tests.cli_helpers import wait_for
from tests.test_setup import OtlpSink, _attrs, sink  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parent.parent

ARQ_APP = '''
import asyncio, sys
from arq.connections import RedisSettings, create_pool
from arq.jobs import Job
from arq.worker import Worker, func

async def add(ctx, a, b):
    return a + b

async def main(port):
    pool = await create_pool(RedisSettings(port=port))
    await pool.enqueue_job("add", 1, 2, _job_id="zc-job")
    worker = Worker(functions=[func(add, name="add")], redis_pool=pool, burst=True, poll_delay=0.01,
                    handle_signals=False)
    await worker.main()
    assert (await Job("zc-job", pool).result_info()).result == 3
    assert await Job("zc-gone", pool).result_info() is None
    await worker.close()

asyncio.run(main(int(sys.argv[1])))
'''

RQ_APP = '''
import sys
from redis import Redis
from rq import Queue, SimpleWorker
from rq.exceptions import NoSuchJobError
from rq.job import Job

connection = Redis(port=int(sys.argv[1]))
queue = Queue("zc", connection=connection)
queue.enqueue("operator.add", 1, 2, job_id="zc-job")
SimpleWorker([queue], connection=connection).work(burst=True)
assert Job.fetch("zc-job", connection=connection).return_value() == 3
try:
    Job.fetch("zc-gone", connection=connection)
except NoSuchJobError:
    pass
else:
    raise AssertionError("zc-gone was found")
'''

CELERY_APP = '''
import sys
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.result import AsyncResult

url = "redis://127.0.0.1:" + sys.argv[1]
app = Celery("zc", broker=url + "/1", backend=url + "/0")
app.conf.update(worker_hijack_root_logger=False)

@app.task(name="add", shared=False)
def add(x, y):
    return x + y

with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
    assert add.apply_async((1, 2), task_id="zc-task").get(timeout=30) == 3
assert AsyncResult("zc-task", app=app).state == "SUCCESS"
assert AsyncResult("zc-gone", app=app).state == "PENDING"
'''


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("engines") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    pip = subprocess.run([str(path / "bin" / "pip"), "install", "--quiet", f"{ROOT}[arq,rq,celery]",
                          "opentelemetry-sdk"], capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    yield path


Spans = list[tuple[Any, dict[str, Any]]]


def run_instrumented(venv: Path, app: str, port: int, sink: OtlpSink, tmp_path: Path) -> Spans:  # noqa: F811
    """Run ``app`` under ``opentelemetry-instrument``; the spans it exported, with their attributes."""
    (tmp_path / "app.py").write_text(app)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "PYTHONPATH"}
    env = {**clean, "OTEL_SERVICE_NAME": "zero-code", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}", "OTEL_SUBFLOW_WATCH": "false",
           "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    done = subprocess.run([str(venv / "bin" / "opentelemetry-instrument"), str(venv / "bin" / "python"),
                           str(tmp_path / "app.py"), str(port)],
                          env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    wait_for(lambda: len(sink.received["/v1/traces"]) > 0, 10.0)
    return [(span, _attrs(span.attributes)) for request in sink.received["/v1/traces"]
            for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]


def ours(spans: Spans) -> list[tuple[str, str, str]]:
    return [(span.name, a[names.ATTR_STATE_KEY], a[names.ATTR_STATE_OUTCOME]) for span, a in spans
            if span.name.startswith("subflow.state.")]


def causes(spans: Spans, key: str) -> list[str]:
    (miss,) = [span for span, a in spans if a.get(names.ATTR_STATE_KEY) == key]
    return [_attrs(e.attributes)[names.ATTR_MISSING_CAUSE] for e in miss.events if e.name == names.EVENT_STATE_MISSING]


@pytest.mark.slow
def test_opentelemetry_instrument_with_arq_installed(venv, redis_server, r, sink, tmp_path):  # noqa: F811
    spans = run_instrumented(venv, ARQ_APP, redis_server.port, sink, tmp_path)
    assert ours(spans) == [
        (names.SPAN_STATE_INIT, "arq:job:zc-job", "created"),
        (names.SPAN_STATE_INIT, "arq:result:zc-job", "created"),
        (names.SPAN_STATE_GET, "arq:result:zc-job", "hit"),
        (names.SPAN_STATE_GET, "arq:result:zc-gone", "miss"),
    ], ours(spans)
    assert causes(spans, "arq:result:zc-gone") == [names.CAUSE_NEVER_WRITTEN]


@pytest.mark.slow
def test_opentelemetry_instrument_with_rq_installed(venv, redis_server, r, sink, tmp_path):  # noqa: F811
    spans = run_instrumented(venv, RQ_APP, redis_server.port, sink, tmp_path)
    seen = ours(spans)
    # the job hash is saved at the enqueue and again by the worker; the result once
    assert {row for row in seen if row[0] == names.SPAN_STATE_INIT} == {
        (names.SPAN_STATE_INIT, "rq:job:zc-job", "created"), (names.SPAN_STATE_INIT, "rq:results:zc-job", "created")}
    assert seen[-3:] == [
        (names.SPAN_STATE_GET, "rq:job:zc-job", "hit"),
        (names.SPAN_STATE_GET, "rq:results:zc-job", "hit"),
        (names.SPAN_STATE_GET, "rq:job:zc-gone", "miss"),
    ], seen
    assert causes(spans, "rq:job:zc-gone") == [names.CAUSE_NEVER_WRITTEN]


@pytest.mark.slow
def test_opentelemetry_instrument_with_celery_installed(venv, redis_server, r, sink, tmp_path):  # noqa: F811
    spans = run_instrumented(venv, CELERY_APP, redis_server.port, sink, tmp_path)
    assert ours(spans) == [
        (names.SPAN_STATE_INIT, "celery-task-meta-zc-task", "created"),
        (names.SPAN_STATE_GET, "celery-task-meta-zc-task", "hit"),
        (names.SPAN_STATE_GET, "celery-task-meta-zc-gone", "miss"),
    ], ours(spans)
    assert causes(spans, "celery-task-meta-zc-gone") == [names.CAUSE_NEVER_WRITTEN]
