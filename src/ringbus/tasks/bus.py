"""TaskBus: dispatch -> Future, results by a reader thread.

Any process that imports a bus can dispatch (web workers that never created
the server): the first dispatch in a process creates its reply channel and
starts one daemon reader thread that resolves futures (``results.py``).
Everything per process (task ids, pending futures, reply channel, reader)
is re-created after ``fork()``.  Handlers and their policies live in
``handlers.py``; the bytes of a task in ``envelope.py``.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import Any

from ringbus._ids import format_id
from ringbus._names import validate_bus_name
from ringbus.tasks import envelope as env
from ringbus.tasks.codec import Codec
from ringbus.tasks.control import BusAsyncFuture
from ringbus.tasks.dead_letters import BusDeadLetters
from ringbus.tasks.dispatch_many import dispatch_list
from ringbus.tasks.envelope import FLAG_REPLY
from ringbus.tasks.handlers import DEFAULT_POLICY, HandlerRegistry, RetryPolicy
from ringbus.tasks.limits import HandlerLimits
from ringbus.tasks.middleware import BusMiddleware
from ringbus.tasks.results import BusFuture, ProcState, cancel_queued, put_off_loop, run_reader
from ringbus.tasks.routing import put_envelope, put_for, route_for, routed
from ringbus.tasks.schedules import Schedule, check_due, make_schedule
from ringbus.tasks.signing import Secret, load_secret
from ringbus.transport.base import Transport
from ringbus.transport.registry import make_transport

__all__ = ["TaskBus"]

_monotonic = time.monotonic
_format_id = format_id

_buses: weakref.WeakSet[TaskBus] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for bus in list(_buses):
        bus._reset_process_state()


os.register_at_fork(after_in_child=_after_fork_in_child)


class TaskBus(HandlerRegistry, BusDeadLetters, BusMiddleware):
    """A named bus: register handlers per task type, dispatch tasks to workers.

    ``name`` derives the transport's channels (shared-memory rings
    ``/ringbus-<name>-...`` by default).  ``transport`` is None (shared
    memory), a ``Transport`` or a URL (``redis://...``, issue 6).

    ``serializer``: ``"pickle"`` (any object), ``"msgpack"`` or ``"json"``
    (msgspec: tasks travel by type name and are decoded, validated, into the
    handler's registered type; see ``serializers.py``).  ``secret`` (str or
    bytes, or a list: the first signs, any verifies) signs every envelope;
    ``$RINGBUS_SECRET`` is used when it is not given.  A bus over a
    transport that spans hosts refuses unsigned pickle (to dispatch and to
    serve) unless ``allow_unsigned_pickle=True``.  ``middleware``: see ``add_middleware``.
    """

    def __init__(
        self,
        name: str,
        *,
        transport: Transport | str | None = None,
        serializer: str = "pickle",
        secret: Secret | None = None,
        allow_unsigned_pickle: bool = False,
        middleware: Iterable[Any] = (),
    ) -> None:
        super().__init__()
        self._schedules: dict[str, Schedule] = {}
        self.name = validate_bus_name(name)
        self.transport = make_transport(transport)
        self.transport.bind(name)
        self.transport.router = env.route_of  # due delayed tasks go back to their queue
        self._keys = load_secret(secret)
        self._allow_unsigned_pickle = bool(allow_unsigned_pickle)
        self.codec = Codec(
            self,
            serializer,
            self._keys or None,
            spans_hosts=self.transport.spans_hosts,
            allow_unsigned_pickle=self._allow_unsigned_pickle,
            where=f"bus {self.name!r} on {self.transport.describe()}",
        )
        adopt = getattr(self.transport, "adopt_bus", None)
        if adopt is not None:  # the inline transport runs this bus's handlers itself
            adopt(self)
        for m in middleware:
            self.add_middleware(m)
        self._reset_process_state()
        _buses.add(self)

    def _registry_changed(self) -> None:
        codec = getattr(self, "codec", None)
        if codec is not None:
            codec.clear()

    def check_serving(self) -> None:
        """Raise ``UnsignedPickleError`` when this bus may not serve tasks
        (unsigned pickle over a transport that spans hosts)."""
        self.codec.check_serving()

    def _reset_process_state(self) -> None:
        self._st: ProcState | None = None
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        # For spawn/forkserver workers: handlers travel by reference.
        config = {
            "serializer": self.codec.serializer,
            "secret": list(self._keys) or None,
            "allow_unsigned_pickle": self._allow_unsigned_pickle,
            "names": dict(self._type_names),
            "queues": dict(self._queues),
            "middleware": self.middleware,
        }
        return (
            _rebuild_bus,
            (
                self.name,
                self.transport,
                dict(self._handlers),
                dict(self._policies),
                config,
                dict(self._limits),  # rate_limit / max_concurrency
            ),
        )

    def __repr__(self) -> str:
        return (
            f"<TaskBus {self.name!r} {self.transport.describe()} {self.codec.serializer}"
            f"{' signed' if self.codec.signer else ''} handlers={len(self._handlers)}>"
        )

    # ------------------------------------------------------------ dispatch

    def _state(self) -> ProcState:
        st = self._st
        if st is not None:
            return st
        with self._lock:
            if self._st is None:
                self.codec.check_serving()  # before a reply channel is made
                st = ProcState(
                    self.name, self.transport, self.transport.reply_address(), self.codec
                )
                st.cancel = self.cancel  # Future.cancel() of a queued task (identity)
                st.encode_new = self._dispatch_encoder(st.reply)
                reader = threading.Thread(
                    target=run_reader, args=(st,), name=f"ringbus-reader-{self.name}", daemon=True
                )
                st.reader = reader
                self._st = st
                reader.start()
            return self._st

    def dispatch(
        self,
        task: Any,
        timeout: float | None = None,
        *,
        delay: float | timedelta | None = None,
        eta: datetime | None = None,
        priority: int = 0,
    ) -> BusFuture:
        """Queue ``task`` for a worker; its handler's result resolves the future
        (a ``concurrent.futures.Future``; ``fut.task_id`` is the task's id).

        ``timeout`` (seconds) sets a deadline: a task still queued then is not
        run, and the future fails with ``TaskTimeout`` when it passes.  Raises
        ``NoHandlerError`` (nothing queued) when no handler matches, and
        ``queue.Full`` if the task channel stays full until the deadline.
        ``delay`` (seconds or a timedelta) or ``eta`` (an aware datetime) hold
        the task until then, durably; ``timeout`` then counts from that time.
        ``priority`` (0..9, higher first) orders tasks within their queue.
        """
        if delay is not None or eta is not None:
            due = check_due(delay, eta, time.time())
            return self._later(task, timeout, due, None, priority)  # type: ignore[return-value]
        cls = type(task)
        if cls not in self._resolved:
            self.resolve(cls)
        st = self._st or self._state()
        tid = next(st.ids)
        if timeout is None:
            encode = st.encode_new
            if encode is not None and self._mw is None:
                gid, data = encode(task, tid)
            else:
                gid, data = self._encode_new(task, tid, FLAG_REPLY, st.reply)
            fut = BusFuture(st)
            fut.task_id = gid.hex()  # format_id(), inline
            st.pending[tid] = fut
            try:
                if priority or cls in self._off_default:
                    put_for(self, cls, priority, data, None)
                else:
                    self.transport.put_task(data)
            except BaseException:
                st.pending.pop(tid, None)
                self._drop_task(gid)
                raise
            if self._mw is not None:
                self._dispatched(gid)
            return fut
        deadline = self._deadline(timeout)
        wall = time.time() + timeout
        gid, data = self._encode_new(task, tid, FLAG_REPLY, st.reply, deadline, wall)
        fut = BusFuture(st)
        fut.task_id = _format_id(gid)
        st.pending[tid] = fut
        try:
            if priority or cls in self._off_default:
                put_for(self, cls, priority, data, timeout)
            else:
                self.transport.put_task(data, timeout)
        except BaseException:
            st.pending.pop(tid, None)
            self._drop_task(gid)
            raise
        if self._mw is not None:
            self._dispatched(gid)
        self._arm(st, deadline, tid, timeout, cls)
        return fut

    @staticmethod
    def _deadline(timeout: float) -> float:
        if timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        return _monotonic() + timeout

    def _arm(self, st: ProcState, deadline: float, tid: int, timeout: float, cls: type) -> None:
        with st.heap_lock:
            heapq.heappush(st.heap, (deadline, tid, timeout, cls.__qualname__))
        # Order matters (see _reader): push first, then compare with wake_at.
        if deadline < st.wake_at:
            st.wake_at = deadline
            self.transport.send_reply(st.reply, st.pid, env.WAKE_MESSAGE)

    def dispatch_async(
        self,
        task: Any,
        timeout: float | None = None,
        *,
        delay: float | timedelta | None = None,
        eta: datetime | None = None,
        priority: int = 0,
    ) -> BusAsyncFuture:
        """Like ``dispatch`` but returns an asyncio future of the running loop,
        resolved by the reader thread (a broker queues it off the loop: ``put_off_loop``)."""
        loop = asyncio.get_running_loop()
        if delay is not None or eta is not None:
            due = check_due(delay, eta, time.time())
            return self._later(task, timeout, due, loop, priority)  # type: ignore[return-value]
        cls = type(task)
        if cls not in self._resolved:
            self.resolve(cls)
        st = self._st or self._state()
        tid = next(st.ids)
        deadline = wall = 0.0
        if timeout is not None:
            deadline = self._deadline(timeout)
            wall = time.time() + timeout
        gid, data = self._encode_new(task, tid, FLAG_REPLY, st.reply, deadline, wall)
        afut = BusAsyncFuture(loop=loop)
        afut.task_id = _format_id(gid)
        st.pending[tid] = (loop, afut)
        if self.transport.puts_off_loop:  # a broker's round trip never blocks the loop
            job = (gid, tid, data, timeout, deadline, priority, cls)
            return put_off_loop(self, loop, afut, st, job)
        try:
            if priority or cls in self._off_default:
                put_for(self, cls, priority, data, timeout)
            else:
                self.transport.put_task(data, timeout)
        except BaseException:
            st.pending.pop(tid, None)
            self._drop_task(gid)
            raise
        if self._mw is not None:
            self._dispatched(gid)
        if timeout is not None:
            self._arm(st, deadline, tid, timeout, cls)
        return afut

    def dispatch_many(
        self,
        tasks: Iterable[Any],
        timeout: float | None = None,
        *,
        delay: float | timedelta | None = None,
        eta: datetime | None = None,
        priority: int = 0,
    ) -> list[Future[Any]]:
        """Dispatch several tasks in few transport calls (``taskWaitMulti``).

        Every task is resolved and encoded before any is queued.  If the
        channel (or the task table) stays full until the deadline, the
        futures of the tasks that did not make it fail with ``TaskTimeout``.
        A list longer than the task table waits for earlier tasks to finish
        (``tasks/dispatch_many.py``).
        """
        tasks = list(tasks)
        if delay is not None or eta is not None:
            due = check_due(delay, eta, time.time())
            for t in tasks:
                self.resolve(type(t))
            return [self._later(t, timeout, due, None, priority) for t in tasks]  # type: ignore[misc]
        for t in tasks:
            if type(t) not in self._resolved:
                self.resolve(type(t))
        chans = None  # channels of the tasks, when any is not the default one
        if priority or any(type(t) in self._off_default for t in tasks):
            chans = [route_for(self, type(t), priority) for t in tasks]
        return dispatch_list(self, tasks, timeout, chans)

    def _arm_all(
        self,
        st: ProcState,
        deadline: float,
        timeout: float | None,
        tids: list[int],
        tasks: list[Any],
    ) -> None:
        if timeout is not None:
            for tid, t in zip(tids, tasks, strict=True):
                self._arm(st, deadline, tid, timeout, type(t))

    def send(
        self,
        task: Any,
        timeout: float | None = None,
        *,
        delay: float | timedelta | None = None,
        eta: datetime | None = None,
        priority: int = 0,
    ) -> str:
        """Fire and forget: queue ``task`` with no result path; returns its id.

        A handler's exception is only logged by the worker (``bus.status`` /
        ``bus.result`` by id, with ``keep_result``).  ``timeout`` drops the
        task if it is still queued that many seconds from now (from its due
        time with ``delay``/``eta``).
        """
        cls = type(task)
        if cls not in self._resolved:
            self.resolve(cls)
        due = 0.0
        if delay is not None or eta is not None:
            due = check_due(delay, eta, time.time())
        deadline = wall = 0.0
        if timeout is not None:
            later = max(0.0, due - time.time()) if due else 0.0
            deadline = self._deadline(timeout) + later
            wall = time.time() + later + timeout
        self.codec.check_serving()
        gid, data = self._encode_new(task, 0, 0, b"", deadline, wall, due)
        try:
            if due:
                self.transport.put_delayed(routed(self, cls, priority, data), due)
            elif priority or cls in self._off_default:
                put_for(self, cls, priority, data, timeout)
            else:
                self.transport.put_task(data, timeout)
        except BaseException:
            self._drop_task(gid)
            raise
        if self._mw is not None:
            self._dispatched(gid)
        return _format_id(gid)

    def _later(
        self,
        task: Any,
        timeout: float | None,
        due: float,
        loop: asyncio.AbstractEventLoop | None,
        priority: int = 0,
    ) -> BusFuture | BusAsyncFuture:
        """Dispatch held until ``due`` (Unix seconds; 0 = now)."""
        cls = type(task)
        if cls not in self._resolved:
            self.resolve(cls)
        st = self._st or self._state()
        tid = next(st.ids)
        later = max(0.0, due - time.time()) if due else 0.0
        deadline = wall = 0.0
        if timeout is not None:
            deadline = self._deadline(timeout) + later
            wall = time.time() + later + timeout
        gid, data = self._encode_new(task, tid, FLAG_REPLY, st.reply, deadline, wall, due)
        data = routed(self, cls, priority, data)
        fut: BusFuture | BusAsyncFuture
        if loop is None:
            fut = BusFuture(st)
            st.pending[tid] = fut
        else:
            fut = BusAsyncFuture(loop=loop)
            st.pending[tid] = (loop, fut)
        fut.task_id = _format_id(gid)
        try:
            if due:
                self.transport.put_delayed(data, due)
            else:
                put_envelope(self.transport, data, timeout)
        except BaseException:
            st.pending.pop(tid, None)
            self._drop_task(gid)
            raise
        if self._mw is not None:
            self._dispatched(gid)
        if timeout is not None:
            self._arm(st, deadline, tid, timeout + later, cls)
        return fut

    # ------------------------------------------------------------ periodic

    @property
    def schedules(self) -> dict[str, Schedule]:
        """The periodic schedules declared with ``periodic`` (name -> schedule)."""
        return dict(self._schedules)

    def periodic(
        self,
        task: Any = None,
        *,
        every: float | timedelta | None = None,
        cron: str | None = None,
        name: str | None = None,
    ) -> Any:
        """Send ``task`` (an object, or a zero-argument callable returning one)
        ``every`` seconds or at each ``cron`` time, once per due time however
        many servers run: the bus's leader fires it.  Without ``task`` it is a
        decorator for the callable.  Declare schedules in the app module, so
        that ``ringbus worker app:bus`` has them."""
        if task is None:

            def deco(fn: Any) -> Any:
                self.periodic(fn, every=every, cron=cron, name=name)
                return fn

            return deco
        sch = make_schedule(task, every, cron, name)
        if not callable(task) or isinstance(task, type):
            self.resolve(type(task))  # NoHandlerError now, not at the first run
        if sch.name in self._schedules:
            raise ValueError(f"a periodic schedule named {sch.name!r} exists: pass name=")
        self._schedules[sch.name] = sch
        return task

    # ------------------------------------------------------------ control

    def outstanding(self) -> list[Future[Any]]:
        """Concurrent futures of this process still waiting for a result."""
        st = self._st
        if st is None:
            return []
        return [e for e in list(st.pending.values()) if type(e) is not tuple]  # type: ignore[misc]

    def cancel_queued(self) -> int:
        """Take this process's tasks still queued off the task channel and
        cancel their futures (tasks of other processes are put back);
        returns how many were cancelled."""
        st = self._st
        return 0 if st is None else cancel_queued(st)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close this process's dispatching side: the reader stops, futures
        still pending fail with ``BusClosed``, handles are released.  The bus
        can dispatch again afterwards (a new reply channel is made)."""
        with self._lock:
            st, self._st = self._st, None
        if st is not None:
            st.closing.set()
        self.transport.close()
        if st is not None and st.reader is not None and st.reader is not threading.current_thread():
            st.reader.join(timeout=10)

    def destroy(self, *, force: bool = False) -> None:
        """``close()``, then remove the bus's channels (queued tasks are dropped).

        On shared memory it is refused (``RingError``) while other live
        processes use the task ring (a TaskServer, dispatchers), as ``ringbus
        rm`` refuses: they would go on with a ring nobody else sees.  ``force``
        removes it anyway; workers then move to the new ring within a second.
        """
        self.close()
        self.transport.destroy(force=force)

    unlink = destroy

    def pending_tasks(self) -> int:
        """Tasks waiting in the task channel (all dispatchers)."""
        return self.transport.pending_tasks()

    def __enter__(self) -> TaskBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rebuild_bus(
    name: str,
    transport: Transport,
    handlers: dict[type, Callable[[Any], Any]],
    policies: dict[type, RetryPolicy] | None = None,
    config: dict[str, Any] | None = None,
    limits: dict[type, HandlerLimits] | None = None,
) -> TaskBus:
    config = dict(config or {})
    names: dict[type, str] = config.pop("names", {})
    queues: dict[type, str] = config.pop("queues", {})
    bus = TaskBus(name, transport=transport, **config)
    for t, fn in handlers.items():
        policy = (policies or {}).get(t, DEFAULT_POLICY)
        bus._register(t, fn, policy, names.get(t), (limits or {}).get(t), queues.get(t, "default"))
    return bus
