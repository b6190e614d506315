"""Futures and the reader that resolves them from a process's reply channel."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any, Union

from ringbus.errors import BusClosed, TaskTimeout, TransportClosed
from ringbus.tasks import envelope as env
from ringbus.transport.base import Transport
from ringbus.transport.task_table import CANCELLED

if TYPE_CHECKING:
    from ringbus.tasks.codec import Codec

__all__ = ["BusFuture", "ProcState", "put_off_loop", "run_reader"]

log = logging.getLogger("ringbus.bus")

# What the reader resolves: a concurrent future, or (loop, asyncio future).
Entry = Union["Future[Any]", tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]"]]

_unpack_result = env.RESULT_HEADER.unpack_from
_monotonic = time.monotonic
_RESULT_MAGIC = env.RESULT_MAGIC
_WAKE = env.WAKE
READ_BATCH = 512
_INF = float("inf")
# How long the reader thread stays parked after a caller read the replies.
_PARK = 0.005
# A reader with at least _NAP_PENDING results to come polls the reply channel
# between naps of _NAP seconds (transports whose poll is a look at memory),
# until _NAP_EMPTY naps in a row found nothing; then it waits in the channel,
# and after each result that wait brings it naps once more to see whether
# results come fast again (see _read_once).
_NAP_PENDING = 64
_NAP = 50e-6
_NAP_EMPTY = 4
_WAITING = frozenset(("PENDING", "RUNNING"))  # concurrent.futures' not-done states
_PENDING = "PENDING"
_FINISHED = "FINISHED"
# Whether Future.__init__ sets exactly the fields BusFuture sets itself.
_PLAIN_FUTURE = set(vars(Future())) == {
    "_condition",
    "_state",
    "_result",
    "_exception",
    "_waiters",
    "_done_callbacks",
}
_OK = env.OK
_CANCELLED = env.CANCELLED
_STATUS_MASK = env.RESULT_STATUS_MASK
_RESULT_HEADER_SIZE = env.RESULT_HEADER_SIZE
_loads = pickle.loads


class ProcState:
    """What one process needs to dispatch with replies.

    Readers of the reply channel: the daemon reader thread, and a thread
    waiting in ``BusFuture.result()`` (at most one at a time, holding
    ``role``).  A waiting caller reads the channel itself instead of
    sleeping until the reader thread wakes it: that saves two thread
    wake-ups (the reader's, for the GIL, and the caller's), which cost tens
    of microseconds each.  While a caller reads, and for ``_PARK`` seconds
    after, the reader thread stays out of the channel (see ``_reader``).
    """

    __slots__ = (
        "caller_last",
        "caller_reading",
        "cancel",
        "closing",
        "codec",
        "cond",
        "empty_naps",
        "encode_new",
        "fast_decode",
        "fast_status",
        "heap",
        "heap_lock",
        "ids",
        "name",
        "naps",
        "pending",
        "pid",
        "reader",
        "reply",
        "results",
        "role",
        "transport",
        "unmatched",
        "wake_at",
    )

    def __init__(
        self, name: str, transport: Transport, reply: bytes, codec: Codec | None = None
    ) -> None:
        self.name = name
        self.codec = codec
        # OK results with this status byte are decoded at once (see Codec).
        self.fast_status = _OK if codec is None else codec.fast_ok_status
        self.fast_decode = _loads if codec is None else codec.fast_ok_decode
        self.transport = transport
        self.pid = os.getpid()
        self.ids = itertools.count(1)
        self.pending: dict[int, Entry] = {}
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
        # Shared by this process's futures (see BusFuture.__init__).
        self.cond = threading.Condition()
        # Results received, and those that matched no pending task (late
        # after a timeout, or a second answer): for stats and tests.
        self.results = 0
        self.unmatched = 0
        # bus.cancel, for Future.cancel() (set by the bus; see control.py).
        self.cancel: Callable[[str], bool] | None = None
        # The bus's encoder for a plain dispatch (control._dispatch_encoder).
        self.encode_new: Callable[[Any, int], tuple[bytes, bytes]] | None = None
        # Naps in a row that found no result (see _read_once); -1: never nap.
        self.empty_naps = 0 if transport.replies_poll_cheaply else -1
        self.naps = 0  # naps taken (stats and tests)


def _set_async(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for afut, ok, value in items:
        if afut.done():  # cancelled by its awaiter
            continue
        if ok:
            afut.set_result(value)
        else:
            afut.set_exception(value)


class BusFuture(Future[Any]):
    """A ``concurrent.futures.Future`` whose waiter reads the reply channel
    itself when no other thread does (see ``ProcState``)."""

    _rb_waiter = 0  # ident of a thread reading replies for this future
    task_id = ""
    """The task's id (``bus.status(fut.task_id)``), set at dispatch."""
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

    def __init__(self, st: ProcState) -> None:
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
                if not _read_once(st, left, self):
                    break
        finally:
            self._rb_waiter = 0
            st.caller_reading = False
            st.caller_last = _monotonic()
            st.role.release()
        return None if end is None else max(0.0, end - _monotonic())

    def cancel(self) -> bool:
        """Cancel the task as ``bus.cancel(task_id)`` does (a queued one never
        runs), then this future."""
        cancel = self._rb_state.cancel
        if self._state == _PENDING and self.task_id and cancel is not None:
            cancel(self.task_id)
        return super().cancel()

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


def _expire(st: ProcState) -> float | None:
    """Fail the futures whose deadline passed; seconds to the next deadline."""
    heap = st.heap
    if not heap:
        return None
    expired: list[tuple[Entry, TaskTimeout]] = []
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
        fail_entry(entry, exc)
        waiter = getattr(entry, "_rb_waiter", 0)
        if waiter and waiter != threading.get_ident():
            wake = True  # its waiter blocks in the channel: wake it
    if wake:
        st.transport.send_reply(st.reply, st.pid, env.WAKE_MESSAGE)
    return left


def _read_once(st: ProcState, timeout: float | None, fut: BusFuture | None = None) -> bool:
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
    napping = 0 <= st.empty_naps < _NAP_EMPTY and len(st.pending) >= _NAP_PENDING
    if napping:
        # Many results to come: a waiter spinning on the channel would take a
        # core from the workers that make them (on 2 cores, a third of the
        # CPU), and sleeping in it would cost each worker a wake-up call per
        # result.  Poll, nap, poll: they wait here in batches.
        timeout = 0.0
    try:
        batch = st.transport.recv_replies(READ_BATCH, timeout)
    except queue.Empty:
        if napping:
            st.empty_naps += 1
            st.naps += 1
            time.sleep(_NAP)
        return True
    except TransportClosed:
        return False
    if st.empty_naps >= 0:
        # From a poll: results come fast, nap on.  From a wait: they came
        # slowly; one nap next time tells whether that changed.
        st.empty_naps = 0 if napping else _NAP_EMPTY - 1
    _resolve(st, batch)
    return True


def _resolve(st: ProcState, batch: list[bytes]) -> None:
    """Resolve the futures answered by ``batch`` (any reader thread)."""
    pending = st.pending
    async_items: dict[asyncio.AbstractEventLoop, list[Any]] | None = None
    cond = st.cond
    plain: list[tuple[Any, bool, Any]] | None = [] if _PLAIN_FUTURE else None
    wake = False
    unmatched = wakes = 0
    fast_status, fast_decode = st.fast_status, st.fast_decode
    decode = env.decode_result if st.codec is None else st.codec.decode_result
    for data in batch:
        try:
            magic, status, tid = _unpack_result(data)
        except Exception:
            magic = status = tid = -1
        if magic != _RESULT_MAGIC:
            log.error("ringbus reader of bus %r: dropping a malformed result", st.name)
            continue
        if status == _WAKE:
            wakes += 1
            continue
        entry = pending.pop(tid, None)
        if entry is None:  # timed out, or answered already (e.g. WorkerLost after)
            unmatched += 1
            continue
        if status & _STATUS_MASK == _CANCELLED:  # bus.cancel from any process: it stopped
            _cancel_entry(entry)
            wake = wake or _reads_channel(entry)  # its waiter may block in the channel
            continue
        if status == fast_status and len(data) < 4096:
            try:
                ok, value = True, fast_decode(data[_RESULT_HEADER_SIZE:])
            except Exception:
                ok, value = decode(data, status)
        else:
            ok, value = decode(data, status)
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
        # Only a caller inside the channel can be waiting there; it says so
        # (caller_reading) before it looks at its future's state, and the
        # states are set above before this look: no per-future scan otherwise.
        if not wake and st.caller_reading:
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
        st.transport.send_reply(st.reply, st.pid, env.WAKE_MESSAGE)


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


def _cancel_entry(entry: Entry) -> None:
    if type(entry) is tuple:
        try:
            entry[0].call_soon_threadsafe(entry[1].cancel)
        except RuntimeError:  # its loop is closed
            pass
    else:
        Future.cancel(entry)  # type: ignore[arg-type]


def fail_entry(entry: Entry, exc: BaseException) -> None:
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


def run_reader(st: ProcState) -> None:
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
            if not _read_once(st, None):
                break
    except BaseException:  # never let the reader die silently
        log.exception("ringbus reader of bus %r failed", st.name)
        raise
    finally:
        # Closed: nothing will answer the futures still pending.
        pending = st.pending
        for tid in list(pending):
            entry = pending.pop(tid, None)
            if entry is not None:
                msg = f"bus {st.name!r} was closed before task #{tid} answered"
                fail_entry(entry, BusClosed(msg))


def cancel_queued(st: ProcState) -> int:
    """Take this process's tasks still queued off the task channel and cancel
    their futures; tasks of other processes are put back."""
    cancelled = 0
    others: list[bytes] = []
    table = st.transport.task_table()
    while True:
        try:
            batch = st.transport.get_tasks(READ_BATCH, 0)
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
            if table is not None and hdr.gid != env.NO_ID:
                table.finish(hdr.gid, CANCELLED, 0.0, None)
            _cancel_entry(entry)
    if others:
        st.transport.put_tasks(others)
    return cancelled



def put_off_loop(
    bus: Any, loop: asyncio.AbstractEventLoop, afut: Any, st: ProcState, task: tuple[Any, ...]
) -> Any:
    """``dispatch_async`` on a broker (``Transport.puts_off_loop``): the put
    waits for a network round trip, so it runs in a thread of the loop's
    default executor, never on the loop, and puts of coroutines dispatching
    meanwhile share round trips.  An error queueing the task (such as
    ``BrokerUnavailable``) fails the future instead of the call, and tasks of
    one loop dispatched without an await in between may reach the channel in
    any order.  ``task``: (gid, tid, envelope, timeout, deadline, priority, cls)."""
    from ringbus.tasks.routing import put_for

    gid, tid, data, timeout, deadline, priority, cls = task

    def put() -> None:
        if priority or cls in bus._off_default:
            put_for(bus, cls, priority, data, timeout)
        else:
            bus.transport.put_task(data, timeout)
        bus._dispatched(gid)  # after_dispatch hooks (tasks/middleware.py)
        if timeout is not None:
            bus._arm(st, deadline, tid, timeout, cls)

    def done(f: asyncio.Future[None]) -> None:
        exc = f.exception()
        if exc is not None:
            st.pending.pop(tid, None)
            bus._drop_task(gid, exc)
            if not afut.done():
                afut.set_exception(exc)

    loop.run_in_executor(None, put).add_done_callback(done)
    return afut
