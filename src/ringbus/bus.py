"""TaskBus: handlers per task type, dispatch -> Future, results by a reader thread.

Any process that imports a bus can dispatch (web workers that never created
the server): the first dispatch in a process creates its reply channel and
starts one daemon reader thread that resolves futures.  Everything per
process (task ids, pending futures, reply channel, reader) is re-created
after ``fork()``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import pickle
import queue
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from typing import Any, NamedTuple, TypeVar, Union

from ringbus import envelope as env
from ringbus.envelope import (
    FLAG_REPLY,
    BusClosed,
    NoHandlerError,
    TaskTimeout,
)
from ringbus.transport import Transport, TransportClosed, make_transport, validate_bus_name

__all__ = ["DEFAULT_REDELIVERIES", "RetryPolicy", "TaskBus"]

log = logging.getLogger("ringbus.bus")

F = TypeVar("F", bound=Callable[..., Any])
# What the reader resolves: a concurrent future, or (loop, asyncio future).
_Entry = Union["Future[Any]", tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]"]]

_dumps = pickle.dumps
_pack_task = env.TASK_HEADER.pack
_unpack_result = env.RESULT_HEADER.unpack_from
_monotonic = time.monotonic
_TASK_MAGIC = env.TASK_MAGIC
_RESULT_MAGIC = env.RESULT_MAGIC
_WAKE = env.WAKE
_READ_BATCH = 512
_INF = float("inf")
# How long the reader thread stays parked after a caller read the replies.
_PARK = 0.005
_WAITING = frozenset(("PENDING", "RUNNING"))  # concurrent.futures' not-done states
_PENDING = "PENDING"
_FINISHED = "FINISHED"
# Whether Future.__init__ sets exactly the fields _BusFuture sets itself.
_PLAIN_FUTURE = set(vars(Future())) == {
    "_condition",
    "_state",
    "_result",
    "_exception",
    "_waiters",
    "_done_callbacks",
}
_OK = env.OK
_RESULT_HEADER_SIZE = env.RESULT_HEADER_SIZE
_loads = pickle.loads

_buses: weakref.WeakSet[TaskBus] = weakref.WeakSet()
_pid = os.getpid()

DEFAULT_REDELIVERIES = 3
"""Deliveries after a worker death, for handlers registered without ``retries``."""


class RetryPolicy(NamedTuple):
    """How often a handler's task may be attempted.

    ``retries`` counts extra attempts after the first, shared by handler
    exceptions and worker deaths (one attempt counter travels in the
    envelope).  ``None`` means: exceptions are not retried, but a task whose
    worker died is delivered again up to ``DEFAULT_REDELIVERIES`` times
    (at-least-once).  The delay before retry *n* is
    ``min(max_backoff, backoff * 2**(n-1))`` scaled by a random factor in
    [0.5, 1.5) so failing tasks do not retry in lockstep.
    """

    retries: int | None = None
    backoff: float = 0.1
    max_backoff: float = 30.0
    dead_letter: bool = True
    """Keep tasks whose last attempt raised in dead letters (worker deaths,
    timeouts and malformed envelopes always are)."""

    @property
    def max_attempts(self) -> int:
        """Attempts allowed when handlers raise."""
        return 1 + (self.retries or 0)

    @property
    def max_deliveries(self) -> int:
        """Attempts allowed when workers die (a poison task stops here)."""
        return 1 + (DEFAULT_REDELIVERIES if self.retries is None else self.retries)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.backoff * 2.0 ** max(0, attempt - 1))
        return base * (0.5 + random.random())


_DEFAULT_POLICY = RetryPolicy()


def _check_policy(
    retries: int | None, backoff: float, max_backoff: float, dead_letter: bool = True
) -> RetryPolicy:
    if retries is not None and (
        isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 1000
    ):
        raise ValueError(f"retries must be None or an int in 0..1000, not {retries!r}")
    for label, v in (("backoff", backoff), ("max_backoff", max_backoff)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 86400:
            raise ValueError(f"{label} must be a number of seconds in [0, 86400), not {v!r}")
    return RetryPolicy(retries, float(backoff), float(max_backoff), bool(dead_letter))


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()
    for bus in list(_buses):
        bus._reset_process_state()


os.register_at_fork(after_in_child=_after_fork_in_child)


_DISPATCH_CHUNK = 512  # tasks per transport call in dispatch_many


class _ProcState:
    """What one process needs to dispatch with replies.

    Readers of the reply channel: the daemon reader thread, and a thread
    waiting in ``_BusFuture.result()`` (at most one at a time, holding
    ``role``).  A waiting caller reads the channel itself instead of
    sleeping until the reader thread wakes it: that saves two thread
    wake-ups (the reader's, for the GIL, and the caller's), which cost tens
    of microseconds each.  While a caller reads, and for ``_PARK`` seconds
    after, the reader thread stays out of the channel (see ``_reader``).
    """

    __slots__ = (
        "bus",
        "caller_last",
        "caller_reading",
        "closing",
        "cond",
        "heap",
        "heap_lock",
        "ids",
        "pending",
        "pid",
        "reader",
        "reply",
        "results",
        "role",
        "unmatched",
        "wake_at",
    )

    def __init__(self, bus: TaskBus, reply: bytes) -> None:
        self.bus = bus
        self.pid = os.getpid()
        self.ids = itertools.count(1)
        self.pending: dict[int, _Entry] = {}
        self.reply = reply
        # (deadline, task id, seconds, type name): futures to fail at their deadline.
        self.heap: list[tuple[float, int, float, str]] = []
        self.heap_lock = threading.Lock()
        # When a reader will next look at the heap by itself (see _reader).
        self.wake_at = _INF
        self.reader: threading.Thread | None = None
        self.role = threading.Lock()
        self.caller_reading = False
        self.caller_last = 0.0
        self.closing = threading.Event()
        # Shared by this process's futures (see _BusFuture.__init__).
        self.cond = threading.Condition()
        # Results received, and those that matched no pending task (late
        # after a timeout, or a second answer): for stats and tests.
        self.results = 0
        self.unmatched = 0


def _set_async(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for afut, ok, value in items:
        if afut.done():  # cancelled by its awaiter
            continue
        if ok:
            afut.set_result(value)
        else:
            afut.set_exception(value)


class _BusFuture(Future[Any]):
    """A ``concurrent.futures.Future`` whose waiter reads the reply channel
    itself when no other thread does (see ``_ProcState``)."""

    _rb_waiter = 0  # ident of a thread reading replies for this future
    # Future's two lists, made on first use: most futures never get a waiter
    # from wait()/as_completed() nor a callback, and two fewer containers per
    # dispatch mean fewer garbage-collector passes over every pending future
    # (a fifth of a dispatch when many are outstanding).
    _rb_w: list[Any] | None = None
    _rb_cb: list[Callable[[Future[Any]], object]] | None = None

    @property
    def _waiters(self) -> list[Any]:
        w = self._rb_w
        if w is None:
            w = self._rb_w = []
        return w

    @_waiters.setter
    def _waiters(self, value: list[Any]) -> None:
        self._rb_w = value

    @property
    def _done_callbacks(self) -> list[Callable[[Future[Any]], object]]:
        cb = self._rb_cb
        if cb is None:
            cb = self._rb_cb = []
        return cb

    @_done_callbacks.setter
    def _done_callbacks(self, value: list[Callable[[Future[Any]], object]]) -> None:
        self._rb_cb = value

    def __init__(self, st: _ProcState) -> None:
        if _PLAIN_FUTURE:
            # One condition per process instead of one per future: building
            # a threading.Condition was an eighth of a dispatch.  Our waits
            # loop on the state, so a notify meant for another future only
            # costs a re-check (concurrent.futures.wait() takes the shared
            # RLock once per future, which an RLock allows).
            self._condition = st.cond
            self._state = _PENDING
            self._result = None
            self._exception = None
        else:
            super().__init__()
        self._rb_state = st

    def _wait_state(self, timeout: float | None) -> None:
        end = None if timeout is None else _monotonic() + timeout
        with self._condition:
            while self._state in _WAITING:
                if end is None:
                    self._condition.wait()
                    continue
                left = end - _monotonic()
                if left <= 0:
                    return
                self._condition.wait(left)

    def _rb_wait(self, timeout: float | None) -> float | None:
        """Read replies until this future is done or ``timeout`` passes;
        return the time left for the ordinary wait."""
        st = self._rb_state
        if st.closing.is_set() or not st.role.acquire(False):
            return timeout
        end = None if timeout is None else _monotonic() + timeout
        try:
            st.caller_reading = True
            self._rb_waiter = threading.get_ident()
            while self._state in _WAITING:
                left = None if end is None else end - _monotonic()
                if left is not None and left <= 0:
                    break
                if not _read_once(st.bus, st, left, self):
                    break
        finally:
            self._rb_waiter = 0
            st.caller_reading = False
            st.caller_last = _monotonic()
            st.role.release()
        return None if end is None else max(0.0, end - _monotonic())

    # ``_state`` is only a hint here (read without the condition); the base
    # class methods called afterwards decide.
    def result(self, timeout: float | None = None) -> Any:
        state = self._state
        if state == _FINISHED and self._exception is None:
            # Set before _state under the condition and never changed after:
            # no need to take the (shared, busy) lock to read it.
            return self._result
        if state in _WAITING:
            self._wait_state(self._rb_wait(timeout))
        return super().result(0)  # done, or TimeoutError at once

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state in _WAITING:
            self._wait_state(self._rb_wait(timeout))
        return super().exception(0)


class TaskBus:
    """A named bus: register handlers per task type, dispatch tasks to workers.

    ``name`` derives the transport's channels (shared-memory rings
    ``/ringbus-<name>-...`` by default).  ``transport`` is None (shared
    memory), a ``Transport`` or a URL (``redis://...``, issue 6).
    """

    def __init__(self, name: str, *, transport: Transport | str | None = None) -> None:
        self.name = validate_bus_name(name)
        self.transport = make_transport(transport)
        self.transport.bind(name)
        self._handlers: dict[type, Callable[[Any], Any]] = {}
        self._policies: dict[type, RetryPolicy] = {}
        self._resolved: dict[type, Callable[[Any], Any]] = {}
        self._resolved_policy: dict[type, RetryPolicy] = {}
        self._reset_process_state()
        _buses.add(self)

    def _reset_process_state(self) -> None:
        self._st: _ProcState | None = None
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        # For spawn/forkserver workers: handlers travel by reference.
        return (
            _rebuild_bus,
            (self.name, self.transport, dict(self._handlers), dict(self._policies)),
        )

    def __repr__(self) -> str:
        return f"<TaskBus {self.name!r} {self.transport.describe()} handlers={len(self._handlers)}>"

    # ------------------------------------------------------------ handlers

    def handler(
        self,
        task_type: type,
        *,
        retries: int | None = None,
        backoff: float = 0.1,
        max_backoff: float = 30.0,
        dead_letter: bool = True,
    ) -> Callable[[F], F]:
        """Decorator: ``@bus.handler(SendEmail)`` registers the function for
        ``SendEmail`` and its subclasses (returns the function unchanged).

        ``retries``/``backoff``/``max_backoff``/``dead_letter``: see ``RetryPolicy``.
        """
        policy = _check_policy(retries, backoff, max_backoff, dead_letter)

        def deco(fn: F) -> F:
            self._register(task_type, fn, policy)
            return fn

        return deco

    def register(
        self,
        task_type: type,
        fn: Callable[[Any], Any],
        *,
        retries: int | None = None,
        backoff: float = 0.1,
        max_backoff: float = 30.0,
        dead_letter: bool = True,
    ) -> None:
        """Register ``fn`` for tasks of ``task_type`` (a class or an ABC)."""
        self._register(task_type, fn, _check_policy(retries, backoff, max_backoff, dead_letter))

    def _register(self, task_type: type, fn: Callable[[Any], Any], policy: RetryPolicy) -> None:
        if not isinstance(task_type, type):
            raise TypeError(f"task_type must be a class, not {task_type!r}")
        if not callable(fn):
            raise TypeError(f"handler for {task_type.__qualname__} is not callable: {fn!r}")
        self._handlers[task_type] = fn
        self._policies[task_type] = policy
        self._resolved.clear()
        self._resolved_policy.clear()

    def policy(self, task_type: type) -> RetryPolicy:
        """The retry policy of the handler that serves ``task_type``."""
        p = self._resolved_policy.get(task_type)
        if p is None:
            p = self._policies.get(self._lookup(task_type), _DEFAULT_POLICY)
            self._resolved_policy[task_type] = p
        return p

    def resolve(self, task_type: type) -> Callable[[Any], Any]:
        """The handler for ``task_type``: the first class of its MRO that has
        one (most specific wins), else a registered ABC it is a virtual
        subclass of, else a handler for ``object``.  Cached per type."""
        fn = self._resolved.get(task_type)
        if fn is not None:
            return fn
        fn = self._handlers[self._lookup(task_type)]
        self._resolved[task_type] = fn
        return fn

    def _lookup(self, task_type: type) -> type:
        """The registered type whose handler serves ``task_type``."""
        handlers = self._handlers
        found: type | None = None
        for base in task_type.__mro__:
            if base is not object and base in handlers:
                found = base
                break
        if found is None:
            virtual = [k for k in handlers if k is not object and issubclass(task_type, k)]
            # Most specific: an ABC no other match is a subclass of.
            for k in virtual:
                if not any(o is not k and issubclass(o, k) for o in virtual):
                    found = k
                    break
        if found is None and object in handlers:
            found = object
        if found is None:
            raise NoHandlerError(
                f"no handler registered on bus {self.name!r} for "
                f"{task_type.__module__}.{task_type.__qualname__} or any of its bases"
            )
        return found

    @property
    def handlers(self) -> dict[type, Callable[[Any], Any]]:
        """A copy of the registry (type -> handler)."""
        return dict(self._handlers)

    # ------------------------------------------------------------ dispatch

    def _state(self) -> _ProcState:
        st = self._st
        if st is not None:
            return st
        with self._lock:
            if self._st is None:
                st = _ProcState(self, self.transport.reply_address())
                reader = threading.Thread(
                    target=self._reader, args=(st,), name=f"ringbus-reader-{self.name}", daemon=True
                )
                st.reader = reader
                self._st = st
                reader.start()
            return self._st

    def dispatch(self, task: Any, timeout: float | None = None) -> Future[Any]:
        """Queue ``task`` for a worker; its handler's result resolves the future.

        ``timeout`` (seconds) sets a deadline: a task still queued then is not
        run, and the future fails with ``TaskTimeout`` when it passes.  Raises
        ``NoHandlerError`` (nothing queued) when no handler matches, and
        ``queue.Full`` if the task channel stays full until the deadline.
        """
        cls = type(task)
        if cls not in self._resolved:
            self.resolve(cls)
        st = self._st or self._state()
        payload = _dumps(task, 5)
        fut: Future[Any] = _BusFuture(st)
        tid = next(st.ids)
        if timeout is None:
            data = (
                _pack_task(_TASK_MAGIC, FLAG_REPLY, 1, _pid, tid, 0.0, 0.0, len(st.reply))
                + st.reply
                + payload
            )
            st.pending[tid] = fut
            try:
                self.transport.put_task(data)
            except BaseException:
                st.pending.pop(tid, None)
                raise
            return fut
        deadline = self._deadline(timeout)
        data = (
            _pack_task(
                _TASK_MAGIC,
                FLAG_REPLY,
                1,
                _pid,
                tid,
                deadline,
                time.time() + timeout,
                len(st.reply),
            )
            + st.reply
            + payload
        )
        st.pending[tid] = fut
        try:
            self.transport.put_task(data, timeout)
        except BaseException:
            st.pending.pop(tid, None)
            raise
        self._arm(st, deadline, tid, timeout, cls)
        return fut

    @staticmethod
    def _deadline(timeout: float) -> float:
        if timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        return _monotonic() + timeout

    def _arm(self, st: _ProcState, deadline: float, tid: int, timeout: float, cls: type) -> None:
        with st.heap_lock:
            heapq.heappush(st.heap, (deadline, tid, timeout, cls.__qualname__))
        # Order matters (see _reader): push first, then compare with wake_at.
        if deadline < st.wake_at:
            st.wake_at = deadline
            self.transport.send_reply(st.reply, st.pid, env.WAKE_MESSAGE)

    def dispatch_async(self, task: Any, timeout: float | None = None) -> asyncio.Future[Any]:
        """Like ``dispatch`` but returns an asyncio future of the running loop.

        The reader thread resolves it through ``loop.call_soon_threadsafe``.
        """
        loop = asyncio.get_running_loop()
        cls = type(task)
        if cls not in self._resolved:
            self.resolve(cls)
        st = self._st or self._state()
        payload = _dumps(task, 5)
        afut: asyncio.Future[Any] = loop.create_future()
        tid = next(st.ids)
        deadline = wall = 0.0
        if timeout is not None:
            deadline = self._deadline(timeout)
            wall = time.time() + timeout
        data = (
            _pack_task(_TASK_MAGIC, FLAG_REPLY, 1, _pid, tid, deadline, wall, len(st.reply))
            + st.reply
            + payload
        )
        st.pending[tid] = (loop, afut)
        try:
            self.transport.put_task(data, timeout)
        except BaseException:
            st.pending.pop(tid, None)
            raise
        if timeout is not None:
            self._arm(st, deadline, tid, timeout, cls)
        return afut

    def dispatch_many(
        self, tasks: Iterable[Any], timeout: float | None = None
    ) -> list[Future[Any]]:
        """Dispatch several tasks in few transport calls (``taskWaitMulti``).

        Every task is resolved and pickled before any is queued.  If the
        channel stays full until the deadline, the futures of the tasks that
        did not make it fail with ``TaskTimeout``.
        """
        tasks = list(tasks)
        for t in tasks:
            if type(t) not in self._resolved:
                self.resolve(type(t))
        payloads = [_dumps(t, 5) for t in tasks]
        st = self._st or self._state()
        deadline = wall = 0.0
        if timeout is not None:
            deadline = self._deadline(timeout)
            wall = time.time() + timeout
        reply, rlen, pending = st.reply, len(st.reply), st.pending
        futs: list[Future[Any]] = []
        # Queued a chunk at a time: workers start on the first tasks while the
        # envelopes and futures of the rest are built (one call for 100,000
        # tasks kept the pool idle that long: 190k against 315k tasks/s).
        for at in range(0, len(payloads), _DISPATCH_CHUNK):
            part = payloads[at : at + _DISPATCH_CHUNK]
            datas: list[bytes] = []
            tids: list[int] = []
            for payload in part:
                tid = next(st.ids)
                fut: Future[Any] = _BusFuture(st)
                datas.append(
                    _pack_task(_TASK_MAGIC, FLAG_REPLY, 1, _pid, tid, deadline, wall, rlen)
                    + reply
                    + payload
                )
                futs.append(fut)
                tids.append(tid)
                pending[tid] = fut
            left = None if timeout is None else max(0.0, deadline - _monotonic())
            try:
                self.transport.put_tasks(datas, left)
            except queue.Full as exc:
                done = getattr(exc, "done", 0)
                why = "not queued: the task channel stayed full"
                for tid, fut in zip(tids[done:], futs[at + done :], strict=True):
                    pending.pop(tid, None)
                    fut.set_exception(TaskTimeout(why))
                for _ in payloads[at + len(part) :]:
                    fut = _BusFuture(st)
                    fut.set_exception(TaskTimeout(why))
                    futs.append(fut)
                tids = tids[:done]
                self._arm_all(st, deadline, timeout, tids, tasks[at : at + done])
                return futs
            except BaseException:
                for tid in tids:  # earlier chunks are queued: their results still come
                    pending.pop(tid, None)
                raise
            self._arm_all(st, deadline, timeout, tids, tasks[at : at + len(part)])
        return futs

    def _arm_all(
        self,
        st: _ProcState,
        deadline: float,
        timeout: float | None,
        tids: list[int],
        tasks: list[Any],
    ) -> None:
        if timeout is not None:
            for tid, t in zip(tids, tasks, strict=True):
                self._arm(st, deadline, tid, timeout, type(t))

    def send(self, task: Any, timeout: float | None = None) -> None:
        """Fire and forget: queue ``task`` with no result path.

        A handler's exception is only logged by the worker.  ``timeout``
        drops the task if it is still queued that many seconds from now.
        """
        cls = type(task)
        if cls not in self._resolved:
            self.resolve(cls)
        deadline = wall = 0.0
        if timeout is not None:
            deadline = self._deadline(timeout)
            wall = time.time() + timeout
        data = _pack_task(_TASK_MAGIC, 0, 1, _pid, 0, deadline, wall, 0) + _dumps(task, 5)
        self.transport.put_task(data, timeout)

    # ------------------------------------------------------------ results

    def _reader(self, st: _ProcState) -> None:
        """The reader thread: drain this process's reply channel, resolve futures.

        Deadlines: before blocking, a reader sets ``wake_at`` to +inf, reads
        the earliest deadline, then publishes it as ``wake_at``.  A dispatcher
        pushes its deadline first and then sends a wake message if it is
        earlier than ``wake_at``; either the reader saw the new deadline or
        the dispatcher saw a ``wake_at`` that made it send a wake message.
        """
        try:
            while not st.closing.is_set():
                if st.caller_reading or _monotonic() - st.caller_last < _PARK:
                    # A caller reads for us: stay out of its way (and of the GIL).
                    st.wake_at = _monotonic() + _PARK
                    _expire(st)
                    st.closing.wait(_PARK)
                    continue
                if not _read_once(self, st, None):
                    break
        except BaseException:  # never let the reader die silently
            log.exception("ringbus reader of bus %r failed", self.name)
            raise
        finally:
            # Closed: nothing will answer the futures still pending.
            pending = st.pending
            for tid in list(pending):
                entry = pending.pop(tid, None)
                if entry is not None:
                    msg = f"bus {self.name!r} was closed before task #{tid} answered"
                    _fail(entry, BusClosed(msg))

    def _outstanding(self) -> list[Future[Any]]:
        """Concurrent futures of this process still waiting for a result."""
        st = self._st
        if st is None:
            return []
        return [e for e in list(st.pending.values()) if type(e) is not tuple]  # type: ignore[misc]

    def _cancel_queued(self) -> int:
        """Take this process's tasks still queued off the channel and cancel
        their futures (RingExecutor.shutdown(cancel_futures=True)).  Tasks of
        other processes are put back."""
        st = self._st
        if st is None:
            return 0
        cancelled = 0
        others: list[bytes] = []
        while True:
            try:
                batch = self.transport.get_tasks(_READ_BATCH, 0)
            except (queue.Empty, TransportClosed):
                break
            for data in batch:
                try:
                    hdr, _, _ = env.decode_task_header(data)
                except env.EnvelopeError:
                    continue
                entry = st.pending.pop(hdr.task_id, None) if hdr.pid == st.pid else None
                if entry is None:
                    others.append(data)
                    continue
                cancelled += 1
                if type(entry) is tuple:
                    entry[0].call_soon_threadsafe(entry[1].cancel)
                else:
                    entry.cancel()  # type: ignore[union-attr]
        if others:
            self.transport.put_tasks(others)
        return cancelled

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

    def destroy(self) -> None:
        """``close()``, then remove the bus's channels (queued tasks are dropped)."""
        self.close()
        self.transport.destroy()

    unlink = destroy

    def pending_tasks(self) -> int:
        """Tasks waiting in the task channel (all dispatchers)."""
        return self.transport.pending_tasks()

    def __enter__(self) -> TaskBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _expire(st: _ProcState) -> float | None:
    """Fail the futures whose deadline passed; seconds to the next deadline."""
    heap = st.heap
    if not heap:
        return None
    expired: list[tuple[_Entry, TaskTimeout]] = []
    with st.heap_lock:
        now = _monotonic()
        while heap and heap[0][0] <= now:
            _, tid, secs, tname = heapq.heappop(heap)
            entry = st.pending.pop(tid, None)
            if entry is not None:
                msg = f"task #{tid} ({tname}): no result within {secs} s"
                expired.append((entry, TaskTimeout(msg)))
        left = max(0.0, heap[0][0] - now) if heap else None
    wake = False
    for entry, exc in expired:  # outside the lock: callbacks may dispatch
        _fail(entry, exc)
        waiter = getattr(entry, "_rb_waiter", 0)
        if waiter and waiter != threading.get_ident():
            wake = True  # its waiter blocks in the channel: wake it
    if wake:
        st.bus.transport.send_reply(st.reply, st.pid, env.WAKE_MESSAGE)
    return left


def _read_once(
    bus: TaskBus, st: _ProcState, timeout: float | None, fut: _BusFuture | None = None
) -> bool:
    """One wait on the reply channel (at most ``timeout`` s, and no later than
    the next deadline) and the results it brought.  False once closed.

    ``fut``: the future a caller waits for (no wait once it is done).
    """
    st.wake_at = _INF
    nxt = _expire(st)
    if fut is not None and fut._state not in _WAITING:
        return True
    if nxt is not None:
        st.wake_at = _monotonic() + nxt
        if timeout is None or nxt < timeout:
            timeout = nxt
    try:
        batch = bus.transport.recv_replies(_READ_BATCH, timeout)
    except queue.Empty:
        return True
    except TransportClosed:
        return False
    _resolve(bus, st, batch)
    return True


def _resolve(bus: TaskBus, st: _ProcState, batch: list[bytes]) -> None:
    """Resolve the futures answered by ``batch`` (any reader thread)."""
    pending = st.pending
    async_items: dict[asyncio.AbstractEventLoop, list[Any]] | None = None
    cond = st.cond
    plain: list[tuple[Any, bool, Any]] | None = [] if _PLAIN_FUTURE else None
    wake = False
    unmatched = wakes = 0
    for data in batch:
        try:
            magic, status, tid = _unpack_result(data)
        except Exception:
            magic = status = tid = -1
        if magic != _RESULT_MAGIC:
            log.error("ringbus reader of bus %r: dropping a malformed result", bus.name)
            continue
        if status == _WAKE:
            wakes += 1
            continue
        entry = pending.pop(tid, None)
        if entry is None:  # timed out, or answered already (e.g. WorkerLost after)
            unmatched += 1
            continue
        if status == _OK and len(data) < 4096:
            try:
                ok, value = True, _loads(data[_RESULT_HEADER_SIZE:])
            except Exception:
                ok, value = env.decode_result(data, status)
        else:
            ok, value = env.decode_result(data, status)
        if type(entry) is tuple:
            if async_items is None:
                async_items = {}
            async_items.setdefault(entry[0], []).append((entry[1], ok, value))
            continue
        if plain is not None and entry._condition is cond:  # type: ignore[union-attr]
            plain.append((entry, ok, value))
            continue  # its waiter is checked once it is finished (below)
        try:
            if ok:
                entry.set_result(value)  # type: ignore[union-attr]
            else:
                entry.set_exception(value)  # type: ignore[union-attr]
        except InvalidStateError:  # cancelled by its caller
            pass
        if _reads_channel(entry):
            wake = True  # its waiter blocks in the channel: wake it
    if plain:
        # Finish first, then look for waiters: a caller sets _rb_waiter and
        # then reads the state, so either it sees the future finished or we
        # see its mark (checking the mark first lost that wake-up).
        _finish_all(cond, plain)
        if not wake:
            wake = any(_reads_channel(f) for f, _, _ in plain)
    with st.heap_lock:  # two readers may overlap for a moment: += is not atomic
        st.results += len(batch) - wakes
        st.unmatched += unmatched
    if async_items:
        for loop, items in async_items.items():
            try:
                loop.call_soon_threadsafe(_set_async, items)
            except RuntimeError:  # loop closed: nobody awaits these
                pass
    if wake:
        bus.transport.send_reply(st.reply, st.pid, env.WAKE_MESSAGE)


def _reads_channel(entry: Any) -> bool:
    """Whether another thread waits for ``entry`` inside the reply channel."""
    waiter = getattr(entry, "_rb_waiter", 0)
    return bool(waiter) and waiter != threading.get_ident()


def _finish_all(cond: threading.Condition, items: list[tuple[Any, bool, Any]]) -> None:
    """``set_result``/``set_exception`` for a batch of futures that share
    ``cond``: one lock round and one notify for the batch instead of one per
    future (the same steps as ``concurrent.futures.Future``'s own methods)."""
    called: list[Any] = []
    with cond:
        for f, ok, value in items:
            if f._state not in _WAITING:  # cancelled by its caller
                continue
            if ok:
                f._result = value
            else:
                f._exception = value
            f._state = _FINISHED
            if f._rb_w:
                for w in f._rb_w:
                    if ok:
                        w.add_result(f)
                    else:
                        w.add_exception(f)
            if f._rb_cb:
                called.append(f)
        cond.notify_all()
    for f in called:
        f._invoke_callbacks()


def _fail(entry: _Entry, exc: BaseException) -> None:
    if type(entry) is tuple:
        loop, afut = entry
        try:
            loop.call_soon_threadsafe(_set_async, [(afut, False, exc)])
        except RuntimeError:
            pass
        return
    try:
        entry.set_exception(exc)  # type: ignore[union-attr]
    except InvalidStateError:
        pass


def _rebuild_bus(
    name: str,
    transport: Transport,
    handlers: dict[type, Callable[[Any], Any]],
    policies: dict[type, RetryPolicy] | None = None,
) -> TaskBus:
    bus = TaskBus(name, transport=transport)
    for t, fn in handlers.items():
        bus._register(t, fn, (policies or {}).get(t, _DEFAULT_POLICY))
    return bus
