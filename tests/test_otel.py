"""OpenTelemetry across real processes: the test process dispatches inside a
span of its own (spans kept by the SDK's InMemorySpanExporter); a real
``ringbus worker`` subprocess runs the tasks and exports its spans to a
file.  One trace: request -> PRODUCER ``send default`` -> CONSUMER
``process default`` (in the worker) -> the handler's own span."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="pip install 'ringbus[test]' (opentelemetry-sdk)")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from _cli_worker import start_worker_fixture  # noqa: F401 - fixture
from _ops_support import SHM
from ringbus import TaskBus


@pytest.fixture(name="traced")
def traced_fixture() -> Iterator[tuple[TaskBus, InMemorySpanExporter, TracerProvider]]:
    """The ``_otel_app`` bus under a fresh name, traced by a provider of this test."""
    import _otel_app

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    name = f"test-otel-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    bus = _otel_app.make_bus(name, provider)
    yield bus, exporter, provider
    bus.destroy(force=True)
    for p in SHM.glob(f"ringbus-{name}-*"):
        p.unlink(missing_ok=True)


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_one_trace_from_the_dispatcher_to_the_worker(
    traced: tuple[TaskBus, InMemorySpanExporter, TracerProvider],
    start_worker: Any,
    tmp_path: Path,
    concurrency: int,
) -> None:
    from _otel_app import AsyncWork, Broken, Work

    bus, exporter, provider = traced
    spans_file = tmp_path / "spans.jsonl"
    w = start_worker(
        "_otel_app:bus",
        bus.name,
        *("--workers", "1", "--concurrency", str(concurrency)),
        RINGBUS_TEST_OTEL_BUS=bus.name,
        RINGBUS_TEST_SPANS=str(spans_file),
    )
    with provider.get_tracer("test").start_as_current_span("request") as request:
        futs = [bus.dispatch(Work(1)), bus.dispatch(AsyncWork(2)), bus.dispatch(Broken(3))]
    assert futs[0].result(timeout=60) == 2
    assert futs[1].result(timeout=60) == 4
    with pytest.raises(KeyError):
        futs[2].result(timeout=60)
    assert w.stop() == 0

    trace_id = request.get_span_context().trace_id
    mine = exporter.get_finished_spans()
    producers = {
        s.attributes["messaging.message.id"]: s
        for s in mine
        if s.kind == SpanKind.PRODUCER and s.attributes is not None
    }
    theirs = _read(spans_file)
    consumers = {
        d["attributes"]["messaging.message.id"]: d for d in theirs if d["kind"] == "CONSUMER"
    }
    assert len(producers) == len(consumers) == 3
    for fut, kind in zip(futs, ("Work", "AsyncWork", "Broken"), strict=True):
        task_id = fut.task_id
        p = producers[task_id]
        assert p.name == "send default"
        assert p.context.trace_id == trace_id
        assert p.parent is not None and p.parent.span_id == request.get_span_context().span_id
        assert p.status.status_code != StatusCode.ERROR  # queued
        attrs = dict(p.attributes or {})
        assert attrs["messaging.system"] == "ringbus"
        assert attrs["messaging.destination.name"] == "default"
        assert attrs["messaging.operation.type"] == "send"
        assert attrs["ringbus.task.type"] == f"_otel_app.{kind}"

        c = consumers[task_id]
        assert c["pid"] != os.getpid()  # exported by the worker process
        assert c["name"] == "process default"
        assert c["trace_id"] == _hex(trace_id, 32)  # one trace
        assert c["parent_id"] == _hex(p.context.span_id, 16)  # producer -> consumer
        assert c["attributes"]["messaging.system"] == "ringbus"
        assert c["attributes"]["messaging.destination.name"] == "default"
        assert c["attributes"]["messaging.operation.type"] == "process"
        assert c["attributes"]["ringbus.task.type"] == f"_otel_app.{kind}"
        assert c["attributes"]["ringbus.task.attempt"] == 1
        if kind == "Broken":
            assert c["status"] == "ERROR" and "exception" in c["events"]
        else:
            assert c["status"] != "ERROR"
            (inner,) = [
                d for d in theirs if d["name"] == "inner" and d["parent_id"] == c["span_id"]
            ]
            assert inner["trace_id"] == c["trace_id"]  # the handler's span nests under it
    assert len({d["trace_id"] for d in theirs}) == 1


def test_a_refused_dispatch_ends_its_span_with_the_error() -> None:
    from _mw_tasks import BigHeader, Echo, echo
    from ringbus import HeaderError
    from ringbus.otel import OpenTelemetryMiddleware

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mws = [OpenTelemetryMiddleware(provider), BigHeader(5000)]
    bus = TaskBus(f"test-otel-refused-{os.getpid()}", transport="inline", middleware=mws)
    bus.handler(Echo)(echo)
    with pytest.raises(HeaderError):
        bus.dispatch(Echo(1))
    bus.destroy()
    (span,) = exporter.get_finished_spans()
    assert span.kind == SpanKind.PRODUCER and span.status.status_code == StatusCode.ERROR
    assert "HeaderError" in (span.status.description or "")
    assert [e.name for e in span.events] == ["exception"]
