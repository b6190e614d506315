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

import contextlib
import functools
import logging
import os
import queue
import signal
import struct
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from ringbus._proc import die_with_parent
from ringbus.errors import MessageTooLarge, TransportClosed, Unrecoverable
from ringbus.server.pool_state import (
    EXITED,
    IDLE,
    JOURNAL_OFF,
    REPLY_MAX,
    REPLY_OFF,
    RUNNING,
    SLOT_COUNTERS,
    SLOT_COUNTERS_OFF,
    SLOT_DONE,
    SLOT_DONE_OFF,
    SLOT_MAXDEL_OFF,
    SLOT_RUN,
    SLOT_RUN_OFF,
    PoolState,
)
from ringbus.tasks import envelope as env
from ringbus.tasks.bus import TaskBus
from ringbus.tasks.dead_letters import DeadLetterStore
from ringbus.tasks.envelope import FLAG_REPLY
from ringbus.transport.base import Transport

__all__ = ["EXIT_INIT_FAILED", "worker_main"]

log = logging.getLogger("ringbus.server")

EXIT_INIT_FAILED = 75
"""Exit status of a worker whose initializer raised."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
BLOCK_AT_FORK = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}

_U16 = struct.Struct("<H")
_ZERO4 = bytes(4)


class _StopFlag:
    __slots__ = ("stop",)

    def __init__(self) -> None:
        self.stop = False


def worker_main(
    bus: TaskBus,
    slot: int,
    pool_path: str,
    max_tasks: int | None,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    parent_pid: int = 0,
) -> None:
    """Entry point of a worker process (signals arrive blocked: see TaskServer._spawn)."""
    flag = _StopFlag()
    transport = bus.transport

    def on_stop(signum: int, frame: FrameType | None) -> None:
        flag.stop = True
        transport.interrupt()  # wakes a take; never raises into the task in hand

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_stop)
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)  # an inherited wakeup fd would write into the parent's loop
    if parent_pid:
        # A SIGKILLed server leaves no orphan workers: they get a graceful stop.
        die_with_parent(parent_pid, signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCK_AT_FORK)
    pool = PoolState.attach(pool_path)
    pool.worker_up(slot, os.getpid())
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException:
            log.exception("ringbus worker %d: initializer failed", os.getpid())
            pool.set_state(slot, EXITED)
            pool.close()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INIT_FAILED)
    rec = memoryview(pool.mm)[pool.offset(slot) : pool.offset(slot) + pool.stride]
    try:
        _WorkerLoop(bus, pool, slot, rec, max_tasks, flag).run()
    finally:
        rec.release()
        pool.set_state(slot, EXITED)
        pool.close()
        bus.close()  # a worker that dispatched owns a reply channel: remove it


class _WorkerLoop:
    __slots__ = (
        "ack",
        "bus",
        "codec",
        "counters",
        "dead",
        "flag",
        "journal",
        "max_tasks",
        "pool",
        "rec",
        "send",
        "slot",
        "transport",
    )

    def __init__(
        self,
        bus: TaskBus,
        pool: PoolState,
        slot: int,
        rec: memoryview,
        max_tasks: int | None,
        flag: _StopFlag,
    ) -> None:
        self.bus = bus
        self.codec = bus.codec
        self.pool = pool
        self.slot = slot
        self.rec = rec
        self.journal = rec[JOURNAL_OFF:]
        self.max_tasks = max_tasks
        self.flag = flag
        self.transport = t = bus.transport
        # Acknowledging is a no-op on shared memory: skip the call.
        self.ack = None if type(t).ack_tasks is Transport.ack_tasks else t.ack_tasks
        self.send = t.send_reply
        self.dead = DeadLetterStore(t)
        self.counters = [0, 0, 0]  # failed, retried, dead-lettered

    # -------------------------------------------------------- rare paths

    def _count(self, failed: int = 0, retried: int = 0, dead: int = 0) -> None:
        c = self.counters
        c[0] += failed
        c[1] += retried
        c[2] += dead
        SLOT_COUNTERS.pack_into(self.rec, SLOT_COUNTERS_OFF, c[0], c[1], c[2], 0)

    def _dead_letter(self, data: bytes, reason: str, task_type: str = "", attempt: int = 0) -> None:
        try:
            self.dead.add(data, reason, task_type, attempt)
        except Exception:
            log.exception(
                "ringbus worker %d: could not keep a dead letter (%s)", os.getpid(), reason
            )
            return
        self._count(dead=1)

    def _reply(self, reply: bytes, dpid: int, out: bytes, tid: int) -> None:
        try:
            self.send(reply, dpid, out)
        except MessageTooLarge as big:
            self.send(reply, dpid, self.codec.encode_text(tid, env.FAILED, f"task #{tid}: {big}"))
        except Exception:
            log.exception("ringbus worker %d: could not send a result", os.getpid())

    def _malformed(self, data: bytes, why: str) -> None:
        log.error(
            "ringbus worker %d: dead-lettering a malformed task envelope: %s", os.getpid(), why
        )
        self._dead_letter(data, f"malformed task envelope: {why}")

    def _fail(
        self,
        data: bytes,
        tid: int,
        flags: int,
        reply: bytes,
        dpid: int,
        exc: BaseException,
        attempt: int,
        type_name: str,
        keep: bool = True,
    ) -> None:
        """The last attempt failed: keep a dead letter, then answer the caller
        (who may look for the letter as soon as its future fails)."""
        self._count(failed=1)
        if keep:
            self._dead_letter(
                env.with_attempt(data, attempt),
                f"{type(exc).__name__}: {exc} (attempt {attempt})",
                type_name,
                attempt,
            )
        if flags & FLAG_REPLY:
            self._reply(reply, dpid, self.codec.encode_error(tid, exc, flags), tid)
        else:
            log.error("ringbus: fire-and-forget task #%d failed", tid, exc_info=exc)

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
            self.ack(1)

    # -------------------------------------------------------- the loop

    def run(self) -> None:
        bus, pool, slot, rec, flag = self.bus, self.pool, self.slot, self.rec, self.flag
        transport = self.transport
        take = transport.task_taker(self.journal)
        finish_task = self._finish
        counts_deliveries = transport.redelivers_lost_tasks
        wall_clock = transport.spans_hosts
        reply_putter = transport.reply_putter
        put_reply: Callable[[bytes, bool], object] | None = None
        put_addr = None
        send = self.send
        resolve = bus.resolve
        policy_of = bus.policy
        run = functools.partial(SLOT_RUN.pack_into, rec, SLOT_RUN_OFF)
        finish = functools.partial(SLOT_DONE.pack_into, rec, SLOT_DONE_OFF)
        unpack = env.TASK_HEADER.unpack_from
        hsize = env.TASK_HEADER_SIZE
        monotonic = time.monotonic
        codec = self.codec
        encode_ok, encode_text = codec.encode_ok, codec.encode_text
        decode, verify = codec.decode_task, codec.verify_task
        magic_ok = env.TASK_MAGIC
        maxdel_at, maxdel_end = SLOT_MAXDEL_OFF, SLOT_MAXDEL_OFF + 2
        zero2 = _ZERO4[:2]
        pack_u16 = _U16.pack
        max_tasks = self.max_tasks
        last_reply = b""
        last_type: type | None = None
        fn: Callable[[Any], Any] | None = None
        type_name = ""
        policy = None
        max_del = 0
        max_del_packed = b"\0\0"
        done = 0
        while not flag.stop:
            try:
                data = take()
            except TransportClosed:
                break
            except queue.Empty:  # idle: is the channel still the bus's?
                transport.check_channel()
                take = transport.task_taker(self.journal)
                continue
            try:
                magic, flags, attempt, dpid, tid, deadline, wall, rlen = unpack(data)
            except struct.error:
                magic = -1
            start = hsize + rlen if magic == magic_ok else 0
            if magic != magic_ok or start > len(data):
                self._malformed(
                    data,
                    f"{len(data)} bytes starting {bytes(data[:8]).hex()}"
                    if magic != magic_ok
                    else f"reply address of {rlen} bytes runs past the end",
                )
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
                if flags & FLAG_REPLY:
                    send(
                        reply,
                        dpid,
                        encode_text(
                            tid,
                            env.TIMEOUT,
                            f"task #{tid} reached its deadline {now - deadline:.3f} s before "
                            f"a worker took it; it was not run",
                        ),
                    )
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
                task = decode(data, start, flags, True)  # True: verified above
                cls = type(task)
                if cls is not last_type:
                    fn = resolve(cls)
                    policy = policy_of(cls)
                    max_del = policy.max_deliveries
                    max_del_packed = pack_u16(max_del)
                    type_name = f"{cls.__module__}.{cls.__qualname__}"
                    pool.set_type(slot, type_name)
                    last_type = cls
            except Exception as exc:
                # Not retried: decoding and handler lookup fail the same way again.
                self._fail(data, tid, flags, reply, dpid, exc, attempt, "")
                last_type = None
                finish_task()
                continue
            assert policy is not None and fn is not None
            keep = policy.dead_letter
            rec[maxdel_at:maxdel_end] = max_del_packed
            if attempt > max_del:
                text = (
                    f"task #{tid} ({type_name}) reached attempt {attempt} of at most "
                    f"{policy.max_deliveries}: the workers running it died each time"
                )
                log.error("ringbus: %s; it goes to dead letters", text)
                self._count(failed=1)
                self._dead_letter(env.with_attempt(data, attempt), text, type_name, attempt)
                if flags & FLAG_REPLY:
                    send(reply, dpid, encode_text(tid, env.LOST, text))
                finish_task()
                continue
            while True:
                try:
                    value = fn(task)
                except Exception as exc:
                    if isinstance(exc, Unrecoverable) or attempt >= policy.max_attempts:
                        self._fail(data, tid, flags, reply, dpid, exc, attempt, type_name, keep)
                        break
                    delay = policy.delay(attempt)
                    if deadline and monotonic() + delay >= deadline:
                        self._fail(data, tid, flags, reply, dpid, exc, attempt, type_name, keep)
                        break
                    attempt += 1
                    self._count(retried=1)
                    log.warning(
                        "ringbus: task #%d (%s) raised %s: attempt %d of %d in %.3f s",
                        tid,
                        type_name,
                        type(exc).__name__,
                        attempt,
                        policy.max_attempts,
                        delay,
                    )
                    del exc
                    # The slot's attempt first: a crash from here on redelivers
                    # this attempt (the journal keeps the envelope as taken).
                    run(dpid, tid, monotonic(), deadline, attempt, flags, rlen, RUNNING)
                    if not self._backoff(delay):
                        # Stopping: hand the retry to the next worker or server.
                        transport.put_task(env.with_attempt(data, attempt))
                        break
                    try:
                        task = decode(data, start, flags, True)  # fresh: the handler may mutate it
                    except Exception as uexc:
                        self._fail(data, tid, flags, reply, dpid, uexc, attempt, type_name, keep)
                        break
                    continue
                except BaseException as exc:  # SystemExit and the like: not retried
                    self._fail(data, tid, flags, reply, dpid, exc, attempt, type_name, keep)
                    break
                else:
                    if flags & FLAG_REPLY:
                        out = encode_ok(tid, value, flags)  # an encoding error: a FAILED result
                    del value
                    break
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
            finish_task()
            done += 1
            finish(IDLE, done)
            if max_tasks and done >= max_tasks:
                break
