"""Middleware: hooks around a task's life, and headers that travel with it.

``bus.add_middleware(m)`` (or ``TaskBus(name, middleware=[...])``) adds an
object with any of the hooks of ``Middleware`` (subclassing it is optional:
missing hooks are skipped, and so are the base class's no-ops).  Each hook
runs in the process where its event happens:

- the dispatching process: ``before_dispatch`` (may add ``headers``) and
  ``after_dispatch`` (the task was queued, or ``exception`` says why not);
- the worker process: ``worker_start`` / ``worker_stop``, and for each
  attempt ``before_process`` / ``after_process`` (on the handler's thread,
  with ``current_task()`` set), then ``on_retry`` or ``on_dead_letter``.

``before_*``, ``on_*`` and ``worker_start`` hooks run in the order the
middleware was added; ``after_*`` and ``worker_stop`` in reverse (the first
added wraps the others, as in Dramatiq).  A hook that raises is logged and
skipped: the task goes on as if it had returned.

Headers (str -> str, ``envelope.MAX_HEADER_BYTES`` in all) travel in the
envelope's headers trailer (``envelope.with_headers``), under the same
signature as the task; a task without headers carries no trailer.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

from ringbus._ids import format_id
from ringbus.errors import EnvelopeError, TaskFailed
from ringbus.tasks import envelope as env
from ringbus.tasks.context import current_context
from ringbus.tasks.control import TaskControl

__all__ = ["HOOKS", "BusMiddleware", "Middleware", "MiddlewareStack", "TaskMessage"]

log = logging.getLogger("ringbus.middleware")

HOOKS = (
    "before_dispatch",
    "after_dispatch",
    "before_process",
    "after_process",
    "on_retry",
    "on_dead_letter",
    "worker_start",
    "worker_stop",
)
_REVERSED = frozenset(("after_dispatch", "after_process", "worker_stop"))


class TaskMessage:
    """What a hook sees of one task (one object per task and process)."""

    __slots__ = (
        "_key",
        "_token",
        "attempt",
        "bus",
        "headers",
        "id",
        "queue",
        "state",
        "task",
        "type",
    )

    def __init__(
        self,
        bus: Any,
        task: Any,
        task_id: str,
        task_type: str,
        attempt: int,
        queue: str,
        headers: dict[str, str],
    ) -> None:
        self.bus = bus
        self.task = task
        """The task object (None in ``on_dead_letter`` when it could not be decoded)."""
        self.id = task_id
        """The task's id (``bus.status(id)``; "" for envelopes without one)."""
        self.type = task_type
        """``module.QualName`` of the task's type."""
        self.attempt = attempt
        self.queue = queue
        self.headers = headers
        """Travels with the task; ``before_dispatch`` may add to it (str -> str)."""
        self.state: dict[str, Any] = {}
        """Scratch space for middleware, between hooks of one process."""
        self._key = b""
        self._token: contextvars.Token[TaskMessage | None] | None = None

    def __repr__(self) -> str:
        return f"<TaskMessage {self.id or '-'} {self.type} attempt {self.attempt}>"


class Middleware:
    """Base class with every hook as a no-op (see the module docstring)."""

    def before_dispatch(self, message: TaskMessage) -> None:
        """Before the task is queued; may add ``message.headers``."""

    def after_dispatch(self, message: TaskMessage, exception: BaseException | None = None) -> None:
        """The task was queued (``exception`` None) or refused."""

    def before_process(self, message: TaskMessage) -> None:
        """In the worker, before each attempt of the handler."""

    def after_process(
        self, message: TaskMessage, result: Any = None, exception: BaseException | None = None
    ) -> None:
        """In the worker, after each attempt: its value or its exception."""

    def on_retry(self, message: TaskMessage, exception: BaseException, delay: float) -> None:
        """Attempt ``message.attempt`` raised; the next one runs in ``delay`` s."""

    def on_dead_letter(self, message: TaskMessage, reason: str) -> None:
        """The task failed for good and was kept in dead letters."""

    def worker_start(self, bus: Any) -> None:
        """In each worker process, before it takes tasks."""

    def worker_stop(self, bus: Any) -> None:
        """In each worker process, when it stops taking tasks."""


_current: contextvars.ContextVar[TaskMessage | None] = contextvars.ContextVar(
    "ringbus_middleware_message", default=None
)


def _key(data: bytes) -> bytes:
    """Dispatcher pid, task counter and global id: one task's envelopes."""
    return bytes(data[4:16]) + bytes(data[env.GID_OFFSET : env.GID_OFFSET + 16])


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class MiddlewareStack:
    """The middleware of a bus, with each hook's bound methods in call order."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = list(items)
        self.hooks: dict[str, list[Callable[..., Any]]] = {}
        for name in HOOKS:
            fns = [
                getattr(m, name)
                for m in self.items
                if callable(getattr(m, name, None))
                and getattr(type(m), name, None) is not getattr(Middleware, name)
            ]
            self.hooks[name] = fns[::-1] if name in _REVERSED else fns
        self.sent: dict[bytes, TaskMessage] = {}  # queued, after_dispatch not called yet
        self.processes = bool(self.hooks["before_process"] or self.hooks["after_process"])
        self.dispatches = bool(self.hooks["before_dispatch"] or self.hooks["after_dispatch"])
        self.in_worker = self.processes or bool(
            self.hooks["on_retry"] or self.hooks["on_dead_letter"]
        )
        """Whether a worker has anything to call per task (else it skips the middleware)."""
        self._is_async: dict[Callable[[Any], Any], bool] = {}  # per handler, looked up once

    def call(self, name: str, message: TaskMessage | None, *args: Any) -> None:
        """Run hook ``name`` of each middleware; log and skip what raises."""
        for fn in self.hooks[name]:
            try:
                if message is None:
                    fn(*args)
                else:
                    fn(message, *args)
            except Exception:
                log.exception(
                    "ringbus: middleware %s.%s raised (ignored; %s goes on)",
                    type(getattr(fn, "__self__", fn)).__qualname__,
                    name,
                    f"task {message.id or message.type}" if message is not None else "the worker",
                )

    # ------------------------------------------------------------ dispatching

    def dispatching(self, bus: Any, task: Any, gid: bytes, data: bytes) -> bytes:
        """``before_dispatch``, then the envelope with the headers it added."""
        cls = type(task)
        msg = TaskMessage(bus, task, format_id(gid), _type_name(cls), 1, bus.queue_of(cls), {})
        self.call("before_dispatch", msg)
        if self.hooks["after_dispatch"]:  # also told when the task is refused below
            self.sent[gid] = msg
        if msg.headers:
            signer = bus.codec.signer
            trailer = env.encode_headers(msg.headers)  # HeaderError: nothing is queued
            data = env.with_headers(data, trailer, None if signer is None else signer.tag_task)
        return data

    def dispatched(self, gid: bytes, exception: BaseException | None = None) -> None:
        msg = self.sent.pop(gid, None)
        if msg is not None:
            self.call("after_dispatch", msg, exception)

    # ------------------------------------------------------------ processing

    def received(
        self, bus: Any, data: bytes, task: Any, gid: bytes, type_name: str, attempt: int
    ) -> TaskMessage:
        """The message of a task a worker took (current for ``retry`` and
        ``dead_letter`` until the next one)."""
        try:
            headers = env.headers_of(data)
        except EnvelopeError as exc:
            log.warning("ringbus: task %s: headers ignored: %s", format_id(gid), exc)
            headers = {}
        msg = TaskMessage(
            bus,
            task,
            format_id(gid) if gid != env.NO_ID else "",
            type_name,
            attempt,
            env.route_of(data)[0],
            headers,
        )
        msg._key = _key(data)
        msg._token = _current.set(msg)
        return msg

    def finished(self, msg: TaskMessage) -> None:
        """The worker is done with ``msg``: the message before it is current again."""
        token, msg._token = msg._token, None
        if token is not None:
            try:
                _current.reset(token)
            except ValueError:  # set in another context: nothing to restore here
                pass

    def wrap(
        self, fn: Callable[[Any], Any], msg: TaskMessage, is_async: bool | None = None
    ) -> Callable[[Any], Any]:
        """``fn`` with ``before_process`` / ``after_process`` around each call
        (an ``async def`` handler's hooks run inside its coroutine, a plain
        one's on its thread; ``message.attempt`` is ``current_task()``'s)."""
        if not self.processes:
            return fn
        if is_async is None:
            is_async = self._is_async.get(fn)
            if is_async is None:
                is_async = self._is_async[fn] = inspect.iscoroutinefunction(fn)
        call = self.call

        def begin() -> None:
            ctx = current_context()
            if ctx is not None:
                msg.attempt = ctx.attempt
            call("before_process", msg)

        if is_async:

            async def run_async(task: Any) -> Any:
                begin()
                try:
                    value = await fn(task)
                except BaseException as exc:
                    call("after_process", msg, None, exc)
                    raise
                call("after_process", msg, value, None)
                return value

            return run_async

        def run(task: Any) -> Any:
            begin()
            try:
                value = fn(task)
            except BaseException as exc:
                call("after_process", msg, None, exc)
                raise
            if inspect.isawaitable(value):  # a plain function that returned an awaitable
                return self._after_awaited(msg, value)
            call("after_process", msg, value, None)
            return value

        return run

    async def _after_awaited(self, msg: TaskMessage, awaitable: Any) -> Any:
        try:
            value = await awaitable
        except BaseException as exc:
            self.call("after_process", msg, None, exc)
            raise
        self.call("after_process", msg, value, None)
        return value

    def _message(self, bus: Any, data: bytes | None, type_name: str, attempt: int) -> TaskMessage:
        """The current task's message if ``data`` is its envelope, else one
        read from the envelope (its task not decoded)."""
        msg = _current.get()
        if msg is not None and (data is None or msg._key == _key(data)):
            return msg
        gid = env.task_gid(data) if data is not None else env.NO_ID
        try:
            headers = env.headers_of(data) if data is not None else {}
        except EnvelopeError:
            headers = {}
        queue = env.route_of(data)[0] if data is not None else ""
        return TaskMessage(
            bus, None, format_id(gid) if gid != env.NO_ID else "", type_name, attempt, queue,
            headers,
        )  # fmt: skip

    def retry(self, bus: Any, exception: BaseException, attempt: int, delay: float) -> None:
        """``on_retry`` for the current task: attempt ``attempt`` failed."""
        if self.hooks["on_retry"]:
            msg = self._message(bus, None, "", attempt)
            msg.attempt = attempt
            self.call("on_retry", msg, exception, delay)

    def dead_letter(self, bus: Any, data: bytes, reason: str, type_name: str, attempt: int) -> None:
        """``on_dead_letter`` for the task whose envelope is ``data``."""
        if self.hooks["on_dead_letter"]:
            msg = self._message(bus, data, type_name, attempt)
            msg.attempt = attempt
            self.call("on_dead_letter", msg, reason)


class BusMiddleware(TaskControl):
    """``TaskBus``'s side: ``add_middleware`` and the dispatch hooks (the
    bus calls ``_dispatched`` once a task is queued)."""

    _mw: MiddlewareStack | None = None

    def add_middleware(self, middleware: Any) -> None:
        """Add ``middleware`` (a ``Middleware``, or any object with some of
        its hooks) after those added before (see ``tasks/middleware.py``).
        Add it where the bus is defined: worker processes get the bus's
        middleware with the bus (it must pickle for spawned workers)."""
        if not any(callable(getattr(middleware, h, None)) for h in HOOKS):
            raise TypeError(f"{middleware!r} has none of the middleware hooks ({', '.join(HOOKS)})")
        self._mw = MiddlewareStack([*self.middleware, middleware])

    @property
    def middleware(self) -> list[Any]:
        """The middleware added, in order."""
        return [] if self._mw is None else list(self._mw.items)

    def _encode_new(
        self,
        task: Any,
        tid: int,
        flags: int,
        reply: bytes,
        deadline: float = 0.0,
        wall: float = 0.0,
        due: float = 0.0,
    ) -> tuple[bytes, bytes]:
        gid, data = super()._encode_new(task, tid, flags, reply, deadline, wall, due)
        mw = self._mw
        if mw is None or not mw.dispatches:
            return gid, data
        try:
            return gid, mw.dispatching(self, task, gid, data)
        except BaseException:
            self._drop_task(gid)
            raise

    def _encode_many(self, tasks: list[Any], gids: list[bytes], datas: list[bytes]) -> list[bytes]:
        """``dispatch_many``'s envelopes with their ``before_dispatch`` headers."""
        mw = self._mw
        if mw is None or not mw.dispatches:
            return datas
        return [mw.dispatching(self, t, g, d) for t, g, d in zip(tasks, gids, datas, strict=True)]

    def _drop_task(self, gid: bytes, exception: BaseException | None = None) -> None:
        super()._drop_task(gid)
        mw = self._mw
        if mw is not None:  # called while the error that refused the task is handled
            why = exception or sys.exc_info()[1] or TaskFailed("the task was not queued")
            mw.dispatched(gid, why)

    def _dispatched(self, *gids: bytes) -> None:
        """``after_dispatch`` of tasks now queued."""
        mw = self._mw
        if mw is not None:
            for gid in gids:
                mw.dispatched(gid)
