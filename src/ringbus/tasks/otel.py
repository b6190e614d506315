"""OpenTelemetry tracing: one trace from the dispatching process to the worker.

``pip install 'ringbus[otel]'`` (opentelemetry-api; an SDK or a distro to
export the spans), then ``bus.add_middleware(OpenTelemetryMiddleware())``
where the bus is defined.  At dispatch a PRODUCER span ``send <queue>`` is
started (a child of the caller's current span) and its W3C trace context
goes into the task's headers (``traceparent``, ``tracestate``); each
attempt in the worker runs in a CONSUMER span ``process <queue>``, the
producer span's child, current while the handler runs (its own spans nest
under it).  Attributes follow the messaging semantic conventions:
``messaging.system`` = ``ringbus``, ``messaging.destination.name`` = the
queue, ``messaging.message.id`` = the task id, ``messaging.operation.type``
and ``.name``; plus ``ringbus.bus``, ``ringbus.task.type`` and
``ringbus.task.attempt``.  A handler's exception is recorded on its span,
whose status is then ERROR; so is a dispatch the channel refused.
"""

from __future__ import annotations

from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "ringbus's OpenTelemetry middleware needs opentelemetry-api: pip install 'ringbus[otel]'"
    ) from exc

from ringbus import __version__
from ringbus.tasks.middleware import Middleware, TaskMessage

__all__ = ["OpenTelemetryMiddleware"]

_SPAN = "otel.span"
_PROCESS = "otel.process"


class OpenTelemetryMiddleware(Middleware):
    """Trace context from sender to worker (see the module docstring).

    ``tracer_provider``: the provider to use in this process (default: the
    global one, ``trace.set_tracer_provider``).  A provider does not travel
    to spawned workers: there the global provider is used, so configure
    tracing in each process (in the module that defines the bus, or with the
    SDK's environment variables and ``opentelemetry-instrument``).
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        self._provider = tracer_provider
        self._tracer: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (OpenTelemetryMiddleware, ())  # the worker's own (global) provider

    def __repr__(self) -> str:
        return "OpenTelemetryMiddleware()"

    @property
    def tracer(self) -> Any:
        if self._tracer is None:
            self._tracer = trace.get_tracer("ringbus", __version__, tracer_provider=self._provider)
        return self._tracer

    @staticmethod
    def _attributes(message: TaskMessage, operation: str) -> dict[str, Any]:
        return {
            "messaging.system": "ringbus",
            "messaging.destination.name": message.queue,
            "messaging.message.id": message.id,
            "messaging.operation.type": operation,
            "messaging.operation.name": operation,
            "ringbus.bus": getattr(message.bus, "name", ""),
            "ringbus.task.type": message.type,
            "ringbus.task.attempt": message.attempt,
        }

    # ------------------------------------------------------------ dispatching side

    def before_dispatch(self, message: TaskMessage) -> None:
        span = self.tracer.start_span(
            f"send {message.queue}",
            kind=SpanKind.PRODUCER,
            attributes=self._attributes(message, "send"),
        )
        message.state[_SPAN] = span
        propagate.inject(message.headers, context=trace.set_span_in_context(span))

    def after_dispatch(self, message: TaskMessage, exception: BaseException | None = None) -> None:
        span = message.state.pop(_SPAN, None)
        if span is None:
            return
        if exception is not None:
            _record(span, exception)
        span.end()

    # ------------------------------------------------------------ worker side

    def before_process(self, message: TaskMessage) -> None:
        parent = propagate.extract(message.headers)
        span = self.tracer.start_span(
            f"process {message.queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=self._attributes(message, "process"),
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        message.state[_PROCESS] = (span, token)

    def after_process(
        self, message: TaskMessage, result: Any = None, exception: BaseException | None = None
    ) -> None:
        entry = message.state.pop(_PROCESS, None)
        if entry is None:
            return
        span, token = entry
        if exception is not None:
            _record(span, exception)
        span.end()
        otel_context.detach(token)


def _record(span: Any, exception: BaseException) -> None:
    span.record_exception(exception)
    span.set_status(Status(StatusCode.ERROR, f"{type(exception).__name__}: {exception}"))
