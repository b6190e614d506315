"""A worker process of a TaskServer: take a task, run its handler, answer.

One task at a time, so a stop or a crash strands nothing in this process
but the task in hand, which sits in the worker's journal (its slot of the
pool-state segment) until the task is finished.

Stopping a worker never loses the task it took: SIGTERM (or SIGUSR1) only
sets a flag and interrupts the worker's own task-channel handle, which wakes
a worker blocked in a take (it then exits) and is noticed by a worker
running a task after it has answered.  No exception is ever raised from the
signal handler, so a task taken an instant before the signal cannot be
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import inspect
import logging
import os
import pickle
import queue
import signal
import struct
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from ringbus._proc import die_with_parent
from ringbus.errors import TransportClosed
from ringbus.server.pool_state import (
    EXITED,
    IDLE,
    REPLY_MAX,
    REPLY_OFF,
    RUNNING,
    SLOT_DONE,
    SLOT_DONE_OFF,
    SLOT_MAXDEL_OFF,
    SLOT_RUN,
    SLOT_RUN_OFF,
    PoolState,
)
from ringbus.server.worker_base import EXIT_INIT_FAILED, EXIT_STUCK_THREAD, StopFlag, WorkerBase
from ringbus.tasks import envelope as env
from ringbus.tasks.bus import TaskBus
from ringbus.tasks.context import (
    Pending,
    TaskContext,
    pending_attempt,
    pending_cancelled,
    reset_current,
    set_current,
)
from ringbus.tasks.envelope import FLAG_REPLY
from ringbus.tasks.routing import put_envelope
from ringbus.tasks.tracking import await_cancellable
from ringbus.transport.task_table import DONE as TASK_DONE

__all__ = ["EXIT_INIT_FAILED", "EXIT_STUCK_THREAD", "worker_main"]

log = logging.getLogger("ringbus.server")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STACKS_SIGNAL = signal.SIGUSR2
RESCAN_SIGNAL = signal.SIGRTMIN + 2
"""From the supervisor: a new (queue, priority) ring of the served queues
exists; the take in progress wakes and the next one looks for it.  (A
real-time signal: SIGUSR1/2 are taken; its default action kills, so it is
blocked until the handler is in place.)"""
BLOCK_AT_FORK = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, RESCAN_SIGNAL}

_U16 = struct.Struct("<H")
_ZERO4 = bytes(4)


def worker_main(
    bus: TaskBus,
    worker: int,
    pool_path: str,
    max_tasks: int | None,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    parent_pid: int = 0,
    task_timeout: float | None = None,
) -> None:
    """Entry point of a worker process (signals arrive blocked: see TaskServer._spawn)."""
    flag = StopFlag()
    transport = bus.transport
    wake: list[Callable[[], object]] = []  # what else a stop must wake (the concurrent loop)

    def on_stop(signum: int, frame: FrameType | None) -> None:
        flag.stop = True
        transport.interrupt()  # wakes a take; never raises into the task in hand
        for fn in wake:
            fn()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_stop)
    signal.signal(RESCAN_SIGNAL, lambda signum, frame: transport.rescan())
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)  # an inherited wakeup fd would write into the parent's loop
    if parent_pid:
        # A SIGKILLed server leaves no orphan workers: they get a graceful stop.
        die_with_parent(parent_pid, signal.SIGTERM)
    # `ringbus stats NAME --stacks`: every thread's stack to stderr, even while a
    # handler holds the GIL (faulthandler writes from the signal handler, in C).
    # fd 2, not sys.stderr: that may be a capture object with no descriptor.
    faulthandler.register(STACKS_SIGNAL, file=2, all_threads=True)
    pool = PoolState.attach(pool_path)
    transport.serve(pool.queues)  # the server's queues, in its order
    slots = pool.worker_slots(worker)
    for slot in slots:
        pool.worker_up(slot, os.getpid())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCK_AT_FORK)
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException:
            log.exception("ringbus worker %d: initializer failed", os.getpid())
            for slot in slots:
                pool.set_state(slot, EXITED)
            pool.close()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INIT_FAILED)
    code = 0
    mw = bus._mw
    if mw is not None:
        mw.call("worker_start", None, bus)
    try:
        if len(slots) == 1:
            loop = _WorkerLoop(bus, pool, slots[0], max_tasks, flag)
            try:
                loop.run()
            finally:
                loop.release()
        else:
            from ringbus.server.worker_concurrent import ConcurrentWorker

            cw = ConcurrentWorker(bus, pool, slots, max_tasks, flag, task_timeout)
            wake.append(cw.wake_taker)
            try:
                code = cw.run()
            finally:
                cw.release()
    finally:
        if mw is not None:
            mw.call("worker_stop", None, bus)
        for slot in slots:
            pool.set_state(slot, EXITED)
        pool.close()
        bus.close()  # a worker that dispatched owns a reply channel: remove it
    if code:
        # A handler thread that overran cannot be joined: leave without waiting for it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _WorkerLoop(WorkerBase):
    """One task at a time, on the worker's main thread: the fastest path for
    short tasks.  An ``async def`` handler runs on an event loop of its own."""

    def __init__(
        self,
        bus: TaskBus,
        pool: PoolState,
        slot: int,
        max_tasks: int | None,
        flag: StopFlag,
    ) -> None:
        super().__init__(bus, pool, slot, flag)
        self.max_tasks = max_tasks
        self._loop: asyncio.AbstractEventLoop | None = None

    def _backoff(self, seconds: float) -> bool:
        """Sleep before a retry; False when a stop arrived meanwhile."""
        end = time.monotonic() + seconds
        while not self.flag.stop:
            left = end - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.05))
        return False

    def _finish(self) -> None:
        """The task in hand is done with: a kill before this redelivers it."""
        self.journal[0:4] = _ZERO4
        if self.ack is not None:
            self.ack(self.transport.delivery_tag)

    def _await(self, value: Any, ctx: TaskContext | None = None) -> Any:
        """The result of an awaitable handler, run on this worker's own loop
        (a cancel request raises ``CancelledError`` inside it)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(await_cancellable(ctx, value))

    def release(self) -> None:
        if self._loop is not None:
            self._loop.close()
        super().release()

    # -------------------------------------------------------- the loop

    def run(self) -> None:
        bus, pool, slot, rec, flag = self.bus, self.pool, self.slot, self.rec, self.flag
        awaitable = _awaitable_result
        transport = self.transport
        take = transport.task_taker(self.journal)
        finish_task = self._finish
        journal, ack, zero4 = self.journal, self.ack, _ZERO4
        counts_deliveries = transport.redelivers_lost_tasks
        wall_clock = transport.spans_hosts
        reply_putter = transport.reply_putter
        put_reply: Callable[[bytes, bool], object] | None = None
        put_addr = None
        resolve = bus.resolve
        policy_of = bus.policy
        run = functools.partial(SLOT_RUN.pack_into, rec, SLOT_RUN_OFF)
        finish = functools.partial(SLOT_DONE.pack_into, rec, SLOT_DONE_OFF)
        unpack = env.TASK_HEADER.unpack_from
        hsize = env.TASK_HEADER_SIZE
        monotonic = time.monotonic
        codec = self.codec
        encode_ok = codec.encode_ok
        decode, verify = codec.decode_task, codec.verify_task
        # Unsigned pickle: its decode and encode inline (two calls less per task).
        plain = codec.plain_pickle
        not_plain, ser_mask = env.FLAG_SIGNED | env.SER_MASK, env.SER_MASK
        loads, dumps = pickle.loads, pickle.dumps
        pack_ok = functools.partial(env.RESULT_HEADER.pack, env.RESULT_MAGIC, env.OK)
        awaitables = _AWAITABLE
        magic_ok = env.TASK_MAGIC
        maxdel_at, maxdel_end = SLOT_MAXDEL_OFF, SLOT_MAXDEL_OFF + 2
        zero2 = _ZERO4[:2]
        pack_u16 = _U16.pack
        max_tasks = self.max_tasks
        tracker = self.tracker
        # The tracker's common case inline (a task with an id and no
        # keep_result): its C steps called from here, a method call less each.
        begin_c, finish_c, flag_c, progress_c = tracker.quick_steps()
        queue_name, my_pid, wall_time = tracker.queue, tracker.pid, time.time
        no_id = env.NO_ID
        current = bytes((env.TASK_MAGIC,))
        observe = pool.observer(slot)  # run time and queue wait (histograms)
        last_reply = b""
        last_type: type | None = None
        fn: Callable[[Any], Any] | None = None
        type_name = ""
        policy = None
        max_del = max_attempts = 0
        max_del_packed = b"\0\0"
        keep_result = 0.0
        limiter = self.limiter
        gated = False  # the current type's handler has a rate_limit / max_concurrency
        mw = self.mw  # middleware (tasks/middleware.py), None without
        done = 0
        while not flag.stop:
            try:
                data = take()
            except TransportClosed:
                if flag.stop or not transport.rescanning():
                    break
                take = transport.task_taker(self.journal)  # a new ring to take from
                continue
            except queue.Empty:  # idle: is the channel still the bus's?
                transport.check_channel()
                take = transport.task_taker(self.journal)
                continue
            if data[:1] != current:  # earlier layouts (other producers, older versions)
                data = self._legacy(data)
            try:
                magic, flags, attempt, dpid, tid, deadline, wall, rlen, gid, enq = unpack(data)
            except struct.error:
                magic = rlen = -1
                gid = no_id
            start = hsize + rlen if magic == magic_ok else 0
            if magic != magic_ok or start > len(data):
                self._malformed_header(data, magic, rlen)
                finish_task()
                continue
            if verify is not None and (why := verify(data, flags)) is not None:
                self._malformed(data, why)  # forged or foreign: no reply, nothing decoded
                finish_task()
                continue
            if counts_deliveries:
                attempt += transport.deliveries - 1
            if wall and wall_clock:  # another host's monotonic clock means nothing here
                deadline = wall - time.time() + monotonic()
            reply = data[hsize:start]
            now = monotonic()
            if deadline and now > deadline:
                self._late(flags, reply, dpid, tid, now - deadline, data)
                finish_task()
                continue
            # Reply address first, then the head that refers to it (see PoolState.read).
            if reply != last_reply and rlen <= REPLY_MAX:
                rec[REPLY_OFF : REPLY_OFF + rlen] = reply
                last_reply = reply
            rec[maxdel_at:maxdel_end] = zero2
            run(dpid, tid, now, deadline, attempt, flags, rlen, RUNNING)
            out: bytes | None = None
            try:
                if plain and not flags & not_plain and len(data) - start < 4096:
                    task = loads(data[start:])  # codec._decode_plain, inline
                else:
                    task = decode(data, start, flags, True)  # True: verified above
                cls = type(task)
                if cls is not last_type:
                    fn = resolve(cls)
                    policy = policy_of(cls)
                    max_del = policy.max_deliveries
                    max_del_packed = pack_u16(max_del)
                    max_attempts, keep_result = policy.max_attempts, policy.keep_result
                    type_name = f"{cls.__module__}.{cls.__qualname__}"
                    pool.set_type(slot, type_name)
                    gated = limiter.limited(cls)
                    last_type = cls
            except Exception as exc:
                # Not retried: decoding and handler lookup fail the same way again.
                self._fail(data, tid, flags, reply, dpid, exc, attempt, "")
                last_type = None
                finish_task()
                continue
            assert policy is not None and fn is not None
            call = fn
            if mw is not None:  # the task's message for the hooks; the handler in them
                call = mw.wrap(fn, mw.received(bus, data, task, gid, type_name, attempt))
            keep = policy.dead_letter
            rec[maxdel_at:maxdel_end] = max_del_packed
            if attempt > max_del:
                self._too_many_deliveries(
                    data, tid, flags, reply, dpid, attempt, type_name, max_del
                )
                finish_task()
                continue
            # -- limits: a task its handler's limit refuses now goes back to the
            # timer store and this worker takes the next one (server/limiter.py).
            permit = limiter.acquire(cls) if gated else 0
            if permit < 0:
                limiter.hand_back(transport, data, attempt)
                tracker.later(data, attempt, True)
                finish_task()
                finish(IDLE, done)
                continue
            # -- end limits
            # Identity: the status record says running; current_task() is set
            # (as context.Pending: the object is made if the handler asks).
            rel = -1
            if begin_c is not None and not keep_result and gid != no_id:
                rel = begin_c(gid, attempt, my_pid, wall_time())  # tracker.begin_pending, inline
            ctx: Pending | None
            if rel >= 0:
                dl = deadline or None
                ctx = (
                    gid, type_name, attempt, max_attempts, dl, queue_name, flag_c, progress_c, rel
                )
            elif rel == -2:
                ctx = None
            else:
                ctx = tracker.begin_pending(
                    gid, attempt, type_name, max_attempts, deadline, keep_result
                )
            if ctx is None:  # cancelled while it waited: never run
                if permit:
                    limiter.release(cls, permit)
                self._cancelled(gid, flags, reply, dpid, tid)
                finish_task()
                continue
            token = set_current(ctx)
            ok = False  # the handler returned a result (histograms: succeeded)
            while True:
                try:
                    value = call(task)
                    is_awaitable = awaitables.get(type(value))
                    if is_awaitable or (is_awaitable is None and awaitable(value)):
                        value = self._await(value, TaskContext(*ctx))
                except Exception as exc:
                    if pending_cancelled(ctx):  # told to stop: it stopped
                        self._cancelled(gid, flags, reply, dpid, tid)
                        break
                    delay = self._retry_delay(
                        exc, attempt, policy, deadline, tid, type_name, data
                    )
                    if delay is None:
                        self._fail(data, tid, flags, reply, dpid, exc, attempt, type_name, keep)
                        break
                    attempt += 1
                    del exc
                    if self._retry_later(data, attempt, delay):
                        break  # finished here; the retry is queued when due
                    # The slot's attempt first: a crash from here on redelivers
                    # this attempt (the journal keeps the envelope as taken).
                    run(dpid, tid, monotonic(), deadline, attempt, flags, rlen, RUNNING)
                    ctx = pending_attempt(ctx, attempt)
                    reset_current(token)
                    token = set_current(ctx)
                    if not self._backoff(delay):
                        # Stopping: hand the retry to the next worker or server.
                        put_envelope(transport, env.with_attempt(data, attempt))
                        break
                    try:
                        task = decode(data, start, flags, True)  # fresh: the handler may mutate it
                    except Exception as uexc:
                        self._fail(data, tid, flags, reply, dpid, uexc, attempt, type_name, keep)
                        break
                    continue
                except BaseException as exc:  # SystemExit and the like: not retried
                    if pending_cancelled(ctx):  # CancelledError inside an async handler
                        self._cancelled(gid, flags, reply, dpid, tid)
                    else:
                        self._fail(data, tid, flags, reply, dpid, exc, attempt, type_name, keep)
                    break
                else:
                    if pending_cancelled(ctx):  # told to stop: what it returned is not a result
                        self._cancelled(gid, flags, reply, dpid, tid)
                        break
                    if flags & FLAG_REPLY:
                        if plain and not flags & ser_mask:  # codec._encode_ok_plain, inline
                            try:
                                out = pack_ok(tid) + dumps(value, 5)
                            except Exception:
                                out = encode_ok(tid, value, flags)  # a FAILED result
                        else:
                            out = encode_ok(tid, value, flags)  # an encoding error: FAILED
                    if rel >= 0 and finish_c is not None:  # tracker.done, inline
                        finish_c(gid, TASK_DONE, wall_time(), 0.0, None)
                    else:
                        tracker.done(gid, tid, value, keep_result, out)
                    del value
                    ok = True
                    break
            reset_current(token)
            if permit:  # -- limits: the handler is done with its permit
                limiter.release(cls, permit)
            if out is not None:
                if reply != put_addr:
                    put_reply, put_addr = reply_putter(reply), reply
                if put_reply is None:  # no direct put (a broker, a dead address)
                    self._reply(reply, dpid, out, tid)
                else:
                    try:
                        put_reply(out, False)
                    except Exception:  # full, too large, closed: the careful way
                        put_addr = None  # and ask again next time: the handle may be gone
                        self._reply(reply, dpid, out, tid)
            observe(now, enq, type_name, data, ok)  # run time, queue wait, outcome; once answered
            journal[0:4] = zero4  # finish_task(), inline on the hot path
            if ack is not None:
                ack(transport.delivery_tag)
            done += 1
            finish(IDLE, done)
            if max_tasks and done >= max_tasks:
                break


_AWAITABLE: dict[type, bool] = {}


def _awaitable_result(value: Any) -> bool:
    """Whether a handler returned something to await (an ``async def``
    handler's coroutine, or any awaitable): one dict look-up per result type."""
    t = type(value)
    known = _AWAITABLE.get(t)
    if known is None:
        known = _AWAITABLE[t] = inspect.isawaitable(value)
    return known


