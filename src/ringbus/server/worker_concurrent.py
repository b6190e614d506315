"""A worker that runs up to ``concurrency`` tasks at once.

``async def`` handlers run on the worker's event loop; plain handlers in a
thread pool of the same size (blocking I/O overlaps; CPU-bound work wants
processes).  A taker thread waits on the task channel, and only while a
task slot is free (no prefetch beyond ``concurrency``; a transport that
takes batches, Redis, gets one call for every slot free at the time): each
slot of the pool state has its own journal, so a worker killed with 64 tasks running
leaves all 64 for the supervisor to deliver again.

Time limits are the worker's own here: an overrunning coroutine is
cancelled; a thread cannot be, so its caller gets ``TaskTimeout`` at once,
the worker stops taking tasks, lets the others finish and exits with
``EXIT_STUCK_THREAD`` for the supervisor to replace it.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from ringbus.errors import TransportClosed
from ringbus.server.pool_state import (
    IDLE,
    JOURNAL_OFF,
    REPLY_MAX,
    REPLY_OFF,
    RUNNING,
    SLOT_DONE_OFF,
    SLOT_MAXDEL_OFF,
    SLOT_RUN,
    SLOT_RUN_OFF,
    PoolState,
)
from ringbus.server.task_threads import PlainCalls
from ringbus.server.worker_base import EXIT_STUCK_THREAD, StopFlag, WorkerBase
from ringbus.tasks import envelope as env
from ringbus.tasks.bus import TaskBus
from ringbus.tasks.context import TaskContext, set_current
from ringbus.tasks.envelope import FLAG_REPLY
from ringbus.tasks.routing import put_envelope
from ringbus.tasks.tracking import CANCEL_POLL, await_cancellable

__all__ = ["ConcurrentWorker"]

log = logging.getLogger("ringbus.server")

_U16 = struct.Struct("<H")
_ZERO4 = bytes(4)
_CURRENT = bytes((env.TASK_MAGIC,))
_YIELDS = 4  # loop turns a batch's tasks get before the next read


class _Overran(Exception):
    """A task attempt ran past its time limit."""

    def __init__(self, limit: float, stuck: bool) -> None:
        super().__init__(limit)
        self.limit = limit
        self.stuck = stuck  # a thread that still runs


class ConcurrentWorker(WorkerBase):
    """The worker process's loop when its ``concurrency`` is above 1."""

    def __init__(
        self,
        bus: TaskBus,
        pool: PoolState,
        slots: range,
        max_tasks: int | None,
        flag: StopFlag,
        task_timeout: float | None,
    ) -> None:
        super().__init__(bus, pool, slots[0], flag)
        self.slots = list(slots)
        stride = pool.stride
        self.recs = [memoryview(pool.mm)[pool.offset(s) : pool.offset(s) + stride] for s in slots]
        self.journals = [r[JOURNAL_OFF : pool.journal_end] for r in self.recs]
        self.max_tasks = max_tasks
        self.task_timeout = task_timeout
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(self.slots)):
            self.free.put(i)
        self.loop = asyncio.new_event_loop()
        # Plain handlers: task threads, outcomes back on the loop in bursts.
        self.calls = PlainCalls(self.loop, len(self.slots))
        self.running = 0
        self.taken = 0
        self.done = 0
        self.exit_code = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._io: Any = None  # a transport's reads on this loop (Redis: redis_loop)
        self._slot_freed = asyncio.Event()
        self._watching: dict[asyncio.Task[Any], TaskContext] = {}  # handlers awaited in
        self._watcher: asyncio.TimerHandle | None = None
        self._quiet = asyncio.Event()
        self._taker_done = asyncio.Event()
        self._types: dict[type, tuple[Callable[[Any], Any], Any, str, int, bool]] = {}
        # Tasks the taker thread hands to the loop; one call_soon_threadsafe per burst.
        self._inbox: collections.deque[tuple[int, bytes, int, object]] = collections.deque()
        self._drain_due = False
        self._put: Callable[[bytes, bool], object] | None = None
        self._put_addr = b""
        self._permits: list[tuple[type, int] | None] = [None] * len(self.slots)  # limits
        # (taken at, enqueued at, type, envelope[, succeeded]) of the task in slot i
        self._began: list[tuple[Any, ...] | None] = [None] * len(self.slots)

    # -------------------------------------------------------- lifecycle

    def wake_taker(self) -> None:
        """Called from the stop signal handler: the taker may wait for a free slot."""
        self.free.put(-1)

    def run(self) -> int:
        """Serve until stopped (or recycled); returns the exit status."""
        asyncio.set_event_loop(self.loop)
        self._quiet.set()
        t = self.transport
        make = getattr(t, "loop_taker", None) if t.takes_batches else None
        taker: Any = None
        if make is not None:  # the loop reads itself: no taker thread (redis_loop)
            self._io = make(self.loop, lambda: self.running)
            taker = self.loop.create_task(self._take_on_loop())
        else:
            taker = threading.Thread(target=self._take_loop, name="ringbus-taker", daemon=True)
            taker.start()
        try:
            self.loop.run_until_complete(self._until_drained())
        finally:
            if self._io is not None:
                self._io.close()
            self.calls.shutdown(wait=not self.exit_code)
            self.loop.close()
        return self.exit_code

    async def _until_drained(self) -> None:
        await self._taker_done.wait()
        await self._quiet.wait()

    def release(self) -> None:
        for view in (*self.journals, *self.recs):
            view.release()
        super().release()

    def _stop_taking(self) -> None:
        self.flag.stop = True
        self.transport.interrupt()
        self.free.put(-1)
        self._slot_freed.set()

    # -------------------------------------------------------- taking on the loop

    async def _take_on_loop(self) -> None:
        """The taker of a transport that reads on the worker's loop: entries
        start as tasks at once, and the loop yields to them before the next
        read, which carries the results they made (``redis_loop``)."""
        io, counts = self._io, self.transport.redelivers_lost_tasks
        try:
            while not self.flag.stop:
                slots = await self._free_on_loop()
                if slots is None or self.flag.stop:
                    break
                try:
                    got = await io.take([self.journals[s] for s in slots])
                except TransportClosed:
                    break
                for s in slots[len(got) :]:
                    self.free.put(s)
                before = self.running
                for s, (data, deliveries, tag) in zip(slots, got, strict=False):
                    self._start(s, data, deliveries if counts else 1, tag)
                self.taken += len(got)
                if self.max_tasks and self.taken >= self.max_tasks:
                    break  # recycled once these finish
                # The tasks just started run first (a handler is a task of its
                # own, a few steps away): what they finish rides the next read.
                for _ in range(_YIELDS):
                    if self.running <= before:
                        break
                    await asyncio.sleep(0)
        except Exception:
            log.exception("ringbus worker %d: the task taker failed", os.getpid())
        finally:
            self._taker_done.set()

    async def _free_on_loop(self) -> list[int] | None:
        """Every slot free now, waiting for one (None: stop taking)."""
        while True:
            try:
                i = self.free.get_nowait()
            except queue.Empty:
                if self.flag.stop:
                    return None
                self._slot_freed.clear()
                self._io.waiting = True  # what is queued goes now: no read comes soon
                self._io.kick()
                try:  # a stop signal only sets the flag: looked at twice a second
                    await asyncio.wait_for(self._slot_freed.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
                finally:
                    self._io.waiting = False
                continue
            return None if i < 0 else self._free_slots(i)

    # -------------------------------------------------------- the taker thread

    def _take_loop(self) -> None:
        transport = self.transport
        if transport.takes_batches:
            self._take_batches()
            return
        counts = transport.redelivers_lost_tasks
        takers = [transport.task_taker(j) for j in self.journals]
        call = self.loop.call_soon_threadsafe
        try:
            while not self.flag.stop:
                i = self.free.get()
                if i < 0 or self.flag.stop:
                    break
                try:
                    data = takers[i]()
                except TransportClosed:
                    self.free.put(i)
                    if self.flag.stop or not transport.rescanning():
                        break
                    takers = [transport.task_taker(j) for j in self.journals]  # a new ring
                    continue
                except queue.Empty:  # idle: is the channel still the bus's?
                    self.free.put(i)
                    transport.check_channel()
                    takers = [transport.task_taker(j) for j in self.journals]
                    continue
                deliveries = transport.deliveries if counts else 1
                self._inbox.append((i, data, deliveries, transport.delivery_tag))
                if not self._drain_due:  # one wake-up of the loop for a burst of tasks
                    self._drain_due = True
                    call(self._drain)
                self.taken += 1
                if self.max_tasks and self.taken >= self.max_tasks:
                    break  # recycled once these finish
        except BaseException:
            log.exception("ringbus worker %d: the task taker failed", os.getpid())
        finally:
            call(self._taker_done.set)

    def _free_slots(self, first: int) -> list[int] | None:
        """``first`` and every other slot free now (None: stop taking)."""
        slots = [first]
        while True:
            try:
                i = self.free.get_nowait()
            except queue.Empty:
                break
            if i < 0:
                for j in slots:
                    self.free.put(j)
                return None
            slots.append(i)
        if self.max_tasks:
            for j in slots[max(1, self.max_tasks - self.taken) :]:
                self.free.put(j)
            del slots[max(1, self.max_tasks - self.taken) :]
        return slots

    def _take_batches(self) -> None:
        """The taker of a transport that takes batches (a broker): as many
        envelopes in one call as slots are free (never more: no prefetch)."""
        transport = self.transport
        counts = transport.redelivers_lost_tasks
        call = self.loop.call_soon_threadsafe
        try:
            while not self.flag.stop:
                i = self.free.get()
                if i < 0 or self.flag.stop:
                    break
                slots = self._free_slots(i)
                if slots is None or self.flag.stop:
                    break
                try:
                    got = transport.take_tasks([self.journals[s] for s in slots])
                except TransportClosed:
                    break
                except queue.Empty:
                    got = []
                for s in slots[len(got) :]:
                    self.free.put(s)
                if not got:
                    transport.check_channel()
                    continue
                for s, (data, deliveries, tag) in zip(slots, got, strict=False):
                    self._inbox.append((s, data, deliveries if counts else 1, tag))
                if not self._drain_due:  # one wake-up of the loop for the batch
                    self._drain_due = True
                    call(self._drain)
                self.taken += len(got)
                if self.max_tasks and self.taken >= self.max_tasks:
                    break  # recycled once these finish
        except BaseException:
            log.exception("ringbus worker %d: the task taker failed", os.getpid())
        finally:
            call(self._taker_done.set)

    # -------------------------------------------------------- tasks on the loop

    def _drain(self) -> None:
        self._drain_due = False  # first: a task appended from now on schedules another drain
        inbox = self._inbox
        while inbox:
            self._start(*inbox.popleft())

    def _start(self, i: int, data: bytes, deliveries: int, tag: object) -> None:
        self.running += 1
        self._quiet.clear()
        task = self.loop.create_task(self._run(i, data, deliveries, tag))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, i: int, data: bytes, deliveries: int, tag: object) -> None:
        release = True
        try:
            release = await self._process(i, data, deliveries)
        except BaseException:
            log.exception("ringbus worker %d: a task failed outside its handler", os.getpid())
        finally:
            held, self._permits[i] = self._permits[i], None
            if held is not None and release:  # -- limits (a stuck thread keeps its permit)
                self.limiter.release(*held)
            began, self._began[i] = self._began[i], None
            if began is not None:  # its handler ran: run time, queue wait, outcome
                self.pool.observe(self.slot, *began)
            rec = self.recs[i]
            self.journals[i][0:4] = _ZERO4  # finished: a kill from now on does not redeliver
            if self.ack is not None:
                self.ack(tag)
            rec[SLOT_DONE_OFF] = IDLE
            self.done += 1
            self.count_done(self.done)
            self.running -= 1
            if release:
                self.free.put(i)
                self._slot_freed.set()
            if not self.running:
                self._quiet.set()

    async def _watched(self, ctx: TaskContext | None, aw: Any) -> Any:
        """``await aw`` in this task; a cancel request raises CancelledError
        in it.  One timer looks at every handler awaited so (not a task and
        a watcher task per handler, as ``await_cancellable``)."""
        me = asyncio.current_task(self.loop)  # the loop given: no getpid() system call
        if ctx is None or me is None:  # (a task without an id is never cancelled: harmless)
            return await aw
        self._watching[me] = ctx
        if self._watcher is None:
            self._watcher = self.loop.call_later(CANCEL_POLL, self._watch)
        try:
            return await aw
        finally:
            self._watching.pop(me, None)

    def _watch(self) -> None:
        self._watcher = None
        for task, ctx in list(self._watching.items()):
            if ctx.cancelled:
                del self._watching[task]
                task.cancel()  # raised where the handler awaits (_process catches it)
        if self._watching:
            self._watcher = self.loop.call_later(CANCEL_POLL, self._watch)

    def _handler(self, cls: type) -> tuple[Callable[[Any], Any], Any, str, int, bool]:
        entry = self._types.get(cls)
        if entry is None:
            fn = self.bus.resolve(cls)
            policy = self.bus.policy(cls)
            entry = (
                fn,
                policy,
                f"{cls.__module__}.{cls.__qualname__}",
                policy.max_deliveries,
                inspect.iscoroutinefunction(fn),
            )
            self.limiter.limited(cls)  # -- limits: a segment that cannot open fails the task
            self._types[cls] = entry
        return entry

    async def _process(self, i: int, data: bytes, deliveries: int) -> bool:
        """One task in slot ``i``; False when its slot must stay taken (a
        thread that overran still uses it)."""
        rec, slot = self.recs[i], self.slots[i]
        if data[:1] != _CURRENT:  # earlier layouts (other producers, older versions)
            data = self._legacy(data)
        try:
            magic, flags, attempt, dpid, tid, deadline, wall, rlen, gid, enq = (
                env.TASK_HEADER.unpack_from(data)
            )
        except struct.error:
            magic = rlen = -1
            gid = env.NO_ID
        start = env.TASK_HEADER_SIZE + rlen if magic == env.TASK_MAGIC else 0
        if magic != env.TASK_MAGIC or start > len(data):
            self._malformed_header(data, magic, rlen)
            return True
        verify = self.codec.verify_task
        if verify is not None and (why := verify(data, flags)) is not None:
            self._malformed(data, why)  # forged or foreign: no reply, nothing decoded
            return True
        attempt += deliveries - 1
        if wall and self.transport.spans_hosts:
            deadline = wall - time.time() + time.monotonic()
        reply = data[env.TASK_HEADER_SIZE : start]
        now = time.monotonic()
        if deadline and now > deadline:
            self._late(flags, reply, dpid, tid, now - deadline, data)
            return True
        if rlen <= REPLY_MAX:
            rec[REPLY_OFF : REPLY_OFF + rlen] = reply
        SLOT_RUN.pack_into(
            rec, SLOT_RUN_OFF, dpid, tid, now, deadline, attempt, flags, rlen, RUNNING
        )
        type_name = ""
        try:
            task = self.codec.decode_task(data, start, flags, True)  # True: verified above
            fn, policy, type_name, max_del, is_async = self._handler(type(task))
        except Exception as exc:
            self._fail(data, tid, flags, reply, dpid, exc, attempt, type_name)
            return True
        if self.mw is not None:  # the task's message for the hooks; the handler in them
            msg = self.mw.received(self.bus, data, task, gid, type_name, attempt)
            fn = self.mw.wrap(fn, msg, is_async)
        self.pool.set_type(slot, type_name)
        _U16.pack_into(rec, SLOT_MAXDEL_OFF, max_del)
        if attempt > max_del:
            self._too_many_deliveries(data, tid, flags, reply, dpid, attempt, type_name, max_del)
            return True
        # -- limits: refused now -> back to the timer store (server/limiter.py)
        permit = self.limiter.acquire(type(task))
        if permit < 0:
            self.limiter.hand_back(self.transport, data, attempt)
            self.tracker.later(data, attempt, True)
            return True
        if permit:
            self._permits[i] = (type(task), permit)  # given back by _run
        # -- end limits
        keep = policy.dead_letter
        ctx = self.tracker.begin(
            gid, attempt, type_name, policy.max_attempts, deadline, policy.keep_result
        )
        if ctx is None:  # cancelled while it waited: never run
            self._cancelled(gid, flags, reply, dpid, tid)
            return True
        set_current(ctx)  # this asyncio task's own context
        self._began[i] = (now, enq, type_name, data)  # observed by _run (histograms)
        while True:
            try:
                value = await self._attempt(fn, task, is_async, deadline, ctx)
                if ctx.cancelled:  # told to stop: what it returned is not a result
                    raise asyncio.CancelledError
            except asyncio.CancelledError:
                if not ctx.cancelled:
                    raise  # the worker itself is being torn down
                self._cancelled(gid, flags, reply, dpid, tid)
                return True
            except _Overran as over:
                self._timed_out(data, tid, flags, reply, dpid, attempt, type_name, over.limit)
                if over.stuck:
                    self.exit_code = EXIT_STUCK_THREAD
                    log.error(
                        "ringbus worker %d: a thread of task #%d still runs past its limit: "
                        "taking no more tasks, replaced once the others finish",
                        os.getpid(),
                        tid,
                    )
                    self._stop_taking()
                    return False
                return True
            except Exception as exc:
                if ctx.cancelled:  # told to stop: it stopped
                    self._cancelled(gid, flags, reply, dpid, tid)
                    return True
                delay = self._retry_delay(exc, attempt, policy, deadline, tid, type_name, data)
                if delay is None:
                    self._fail(data, tid, flags, reply, dpid, exc, attempt, type_name, keep)
                    return True
                attempt += 1
                del exc
                if self._retry_later(data, attempt, delay):
                    return True  # finished here; the retry is queued when due
                SLOT_RUN.pack_into(
                    rec, SLOT_RUN_OFF, dpid, tid, time.monotonic(), deadline, attempt, flags,
                    rlen, RUNNING,
                )  # fmt: skip
                ctx.attempt = attempt
                await asyncio.sleep(delay)
                if self.flag.stop:  # stopping: hand the retry to the next worker or server
                    put_envelope(self.transport, env.with_attempt(data, attempt))
                    return True
                try:
                    task = self.codec.decode_task(data, start, flags, True)  # fresh copy
                except Exception as uexc:
                    self._fail(data, tid, flags, reply, dpid, uexc, attempt, type_name, keep)
                    return True
                continue
            except BaseException as exc:  # SystemExit and the like: not retried
                self._fail(data, tid, flags, reply, dpid, exc, attempt, type_name, keep)
                return True
            out = (
                await self._answer(reply, dpid, tid, value, flags) if flags & FLAG_REPLY else None
            )
            self.tracker.done(gid, tid, value, policy.keep_result, out)
            began = self._began[i]
            if began is not None:  # succeeded (histograms)
                self._began[i] = (*began, True)
            return True

    async def _attempt(
        self,
        fn: Callable[[Any], Any],
        task: Any,
        is_async: bool,
        deadline: float,
        ctx: TaskContext | None = None,
    ) -> Any:
        limit = self.task_timeout
        if deadline:
            left = max(0.0, deadline - time.monotonic())
            limit = left if limit is None else min(limit, left)
        if is_async:
            if limit is None:
                return await self._watched(ctx, fn(task))
            try:
                return await asyncio.wait_for(await_cancellable(ctx, fn(task)), limit)
            except asyncio.TimeoutError:
                raise _Overran(limit, stuck=False) from None
        fut = self.calls.submit(ctx, fn, task)
        if limit is None:
            value = await fut
        else:
            try:
                value = await asyncio.wait_for(asyncio.shield(fut), limit)
            except asyncio.TimeoutError:
                raise _Overran(limit, stuck=not fut.done()) from None
        if inspect.isawaitable(value):  # a plain function that returned an awaitable
            try:
                value = await asyncio.wait_for(await_cancellable(ctx, value), limit)
            except asyncio.TimeoutError:
                raise _Overran(limit or 0.0, stuck=False) from None
        return value

    async def _answer(self, reply: bytes, dpid: int, tid: int, value: Any, flags: int) -> bytes:
        out = self.codec.encode_ok(tid, value, flags)  # an encoding error: a FAILED result
        if reply != self._put_addr:  # the same dispatcher as last time: its handle is kept
            self._put, self._put_addr = self.transport.reply_putter(reply), reply
        put = self._put
        if put is not None:
            try:
                put(out, False)
                return out
            except Exception:  # full, too large, closed: the careful way, off the loop
                self._put_addr = b""  # ask again next time: the handle may be gone
        await self.loop.run_in_executor(None, self._reply, reply, dpid, out, tid)
        return out
