"""An app traced with OpenTelemetry, for tests/test_otel.py
(``ringbus worker _otel_app:bus``; bus name from ``RINGBUS_TEST_OTEL_BUS``).

In the worker, spans are exported to the JSON-lines file named by
``RINGBUS_TEST_SPANS`` (the SDK's exporter interface, written synchronously
when each span ends), which the test reads; the test's own process keeps
its spans in the SDK's InMemorySpanExporter."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from ringbus import TaskBus
from ringbus.otel import OpenTelemetryMiddleware


@dataclass
class Work:
    n: int


@dataclass
class AsyncWork:
    n: int


@dataclass
class Broken:
    n: int


def work(task: Work) -> int:
    with trace.get_tracer("app").start_as_current_span("inner"):  # nests under the task's span
        return task.n * 2


async def async_work(task: AsyncWork) -> int:
    await asyncio.sleep(0.01)
    with trace.get_tracer("app").start_as_current_span("inner"):
        return task.n * 2


def broken(task: Broken) -> int:
    raise KeyError(f"no item {task.n}")


def make_bus(name: str, tracer_provider: Any = None) -> TaskBus:
    bus = TaskBus(name, middleware=[OpenTelemetryMiddleware(tracer_provider)])
    bus.handler(Work)(work)
    bus.handler(AsyncWork)(async_work)
    bus.handler(Broken, retries=0)(broken)
    return bus


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


class JsonFileExporter(SpanExporter):
    """One JSON object per finished span, appended to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a", encoding="utf-8") as f:
            for s in spans:
                ctx = s.get_span_context()
                assert ctx is not None
                doc = {
                    "name": s.name,
                    "kind": s.kind.name,
                    "trace_id": _hex(ctx.trace_id, 32),
                    "span_id": _hex(ctx.span_id, 16),
                    "parent_id": _hex(s.parent.span_id, 16) if s.parent else None,
                    "attributes": dict(s.attributes or {}),
                    "status": s.status.status_code.name,
                    "events": [e.name for e in s.events],
                    "pid": os.getpid(),
                }
                f.write(json.dumps(doc) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


if os.environ.get("RINGBUS_TEST_SPANS"):  # the worker process
    _provider = TracerProvider()
    _provider.add_span_processor(
        SimpleSpanProcessor(JsonFileExporter(os.environ["RINGBUS_TEST_SPANS"]))
    )
    trace.set_tracer_provider(_provider)

bus = make_bus(os.environ.get("RINGBUS_TEST_OTEL_BUS", "test-otel-default"))
