"""What every worker loop shares: counters, dead letters, answers, failures.

The hot path of each loop lives in its own module (``worker.py`` for one task
at a time, ``worker_concurrent.py`` for many); the rare paths are here, once.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from typing import Any

from ringbus.errors import MessageTooLarge, Unrecoverable
from ringbus.server import histograms as hist
from ringbus.server.limiter import Limiter
from ringbus.server.pool_state import (
    JOURNAL_OFF,
    SLOT_COUNTERS,
    SLOT_COUNTERS_OFF,
    PoolState,
)
from ringbus.tasks import envelope as env
from ringbus.tasks.bus import TaskBus
from ringbus.tasks.dead_letters import DeadLetterStore
from ringbus.tasks.envelope import FLAG_REPLY
from ringbus.tasks.tracking import Tracker
from ringbus.transport.base import Transport

__all__ = ["EXIT_INIT_FAILED", "EXIT_STUCK_THREAD", "StopFlag", "WorkerBase"]

log = logging.getLogger("ringbus.server")

EXIT_INIT_FAILED = 75
"""Exit status of a worker whose initializer raised."""
EXIT_STUCK_THREAD = 76
"""Exit status of a worker replaced because a handler thread overran its time
limit (a thread cannot be cancelled: its other tasks finished first)."""

DONE_OFF = 38  # u64 tasks done, in a worker's first slot
_U64 = struct.Struct("<Q")


class StopFlag:
    __slots__ = ("stop",)

    def __init__(self) -> None:
        self.stop = False


class WorkerBase:
    """A worker process's state shared by its loop: the bus, its first pool
    slot (counters), and the rare paths of a task."""

    def __init__(self, bus: TaskBus, pool: PoolState, slot: int, flag: StopFlag) -> None:
        self.bus = bus
        self.pool = pool
        self.slot = slot
        self.flag = flag
        self.rec = memoryview(pool.mm)[pool.offset(slot) : pool.offset(slot) + pool.stride]
        self.journal = self.rec[JOURNAL_OFF : pool.journal_end]  # histograms follow
        self.transport: Transport = bus.transport
        self.codec = bus.codec  # the bus's serializer and signer: answers are encoded by it
        t = self.transport
        # Acknowledging is a no-op on shared memory: skip the call.
        no_ack = type(t).ack_task is Transport.ack_task and type(t).ack_tasks is Transport.ack_tasks
        self.ack = None if no_ack else t.ack_task
        self.send = t.send_reply
        self.dead = DeadLetterStore(t)
        self.limiter = Limiter(bus)  # rate_limit / max_concurrency of handlers
        self.counters = [0, 0, 0]  # failed, retried, dead-lettered
        self.tally = pool.tally(slot)  # the same, by task type and queue (histograms.py)
        # Status records, current_task(); kept results are encoded by the codec.
        self.tracker = Tracker(t.task_table(), bus.name, bus.codec)
        mw = bus._mw  # middleware hooks (tasks/middleware.py); None: no calls per task
        self.mw = mw if mw is not None and mw.in_worker else None

    def release(self) -> None:
        self.journal.release()
        self.rec.release()

    def count_done(self, done: int) -> None:
        _U64.pack_into(self.rec, DONE_OFF, done)

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
        if attempt:  # attempt 0: a malformed envelope, not a task
            self.tally(task_type, data, hist.DEAD_LETTERED)
        if self.mw is not None and attempt:  # attempt 0: a malformed envelope, not a task
            self.mw.dead_letter(self.bus, data, reason, task_type, attempt)

    def _reply(self, reply: bytes, dpid: int, out: bytes, tid: int) -> None:
        try:
            self.send(reply, dpid, out)
        except MessageTooLarge as big:
            self.send(reply, dpid, self.codec.encode_text(tid, env.FAILED, f"task #{tid}: {big}"))
        except Exception:
            log.exception("ringbus worker %d: could not send a result", os.getpid())

    def _legacy(self, data: bytes) -> bytes:
        """An envelope of an earlier layout (0xB3, 0xB1) in today's (see envelope.py);
        any other comes back unchanged (and is refused as malformed)."""
        return env.from_legacy(data, self.codec.signer)

    def _malformed(self, data: bytes, why: str) -> None:
        log.error(
            "ringbus worker %d: dead-lettering a malformed task envelope: %s", os.getpid(), why
        )
        self._dead_letter(data, f"malformed task envelope: {why}")

    def _malformed_header(self, data: bytes, magic: int, rlen: int) -> None:
        self._malformed(
            data,
            f"{len(data)} bytes starting {bytes(data[:8]).hex()}"
            if magic != env.TASK_MAGIC
            else f"reply address of {rlen} bytes runs past the end",
        )

    def _late(
        self, flags: int, reply: bytes, dpid: int, tid: int, late: float, data: bytes = b""
    ) -> None:
        """The task's deadline passed while it was queued: answer, never run it."""
        out = self.codec.encode_text(
            tid,
            env.TIMEOUT,
            f"task #{tid} reached its deadline {late:.3f} s before a worker took it; "
            "it was not run",
        )
        self.tracker.failed(data, out)
        if flags & FLAG_REPLY:
            self.send(reply, dpid, out)

    def _cancelled(self, gid: bytes, flags: int, reply: bytes, dpid: int, tid: int) -> None:
        """The task was cancelled (``bus.cancel``): its caller's future is cancelled."""
        self.tracker.cancelled(gid)
        if flags & FLAG_REPLY:
            self._reply(reply, dpid, self.codec.encode_text(tid, env.CANCELLED, "cancelled"), tid)

    def _too_many_deliveries(
        self, data: bytes, tid: int, flags: int, reply: bytes, dpid: int, attempt: int, *a: Any
    ) -> None:
        """Every worker that took it died: a poison task goes to dead letters."""
        type_name, allowed = a
        text = (
            f"task #{tid} ({type_name}) reached attempt {attempt} of at most "
            f"{allowed}: the workers running it died each time"
        )
        log.error("ringbus: %s; it goes to dead letters", text)
        self._count(failed=1)
        self.tally(type_name, data, hist.FAILED)
        self._dead_letter(env.with_attempt(data, attempt), text, type_name, attempt)
        out = self.codec.encode_text(tid, env.LOST, text)
        self.tracker.failed(data, out)
        if flags & FLAG_REPLY:
            self.send(reply, dpid, out)

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
        self.tally(type_name, data, hist.FAILED)
        if keep:
            self._dead_letter(
                env.with_attempt(data, attempt),
                f"{type(exc).__name__}: {exc} (attempt {attempt})",
                type_name,
                attempt,
            )
        out = self.codec.encode_error(tid, exc, flags)
        self.tracker.failed(data, out)
        if flags & FLAG_REPLY:
            self._reply(reply, dpid, out, tid)
        else:
            log.error("ringbus: fire-and-forget task #%d failed", tid, exc_info=exc)

    def _retry_later(self, data: bytes, attempt: int, delay: float) -> bool:
        """Hand the next attempt to the timer store: no worker waits out the
        backoff.  False where the transport holds no delayed tasks (or the
        store refused it): the worker then waits itself."""
        if not self.transport.holds_delayed:
            return False
        try:
            due = time.time() + delay  # its queue wait counts from then (metrics)
            self.transport.put_delayed(env.with_enqueued(env.with_attempt(data, attempt), due), due)
        except Exception as exc:
            log.warning("ringbus: a retry waits in the worker: the timer store refused it: %s", exc)
            return False
        self.tracker.later(data, attempt, True)
        return True

    def _retry_delay(
        self,
        exc: Exception,
        attempt: int,
        policy: Any,
        deadline: float,
        tid: int,
        name: str,
        data: bytes = b"",
    ) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (counted and logged),
        or None when the failed attempt was the last one allowed."""
        if isinstance(exc, Unrecoverable) or attempt >= policy.max_attempts:
            return None
        delay: float = policy.delay(attempt)
        if deadline and time.monotonic() + delay >= deadline:
            return None
        self._count(retried=1)
        self.tally(name, data, hist.RETRIED)
        if self.mw is not None:
            self.mw.retry(self.bus, exc, attempt, delay)
        log.warning(
            "ringbus: task #%d (%s) raised %s: attempt %d of %d in %.3f s",
            tid,
            name,
            type(exc).__name__,
            attempt + 1,
            policy.max_attempts,
            delay,
        )
        return delay

    def _timed_out(
        self,
        data: bytes,
        tid: int,
        flags: int,
        reply: bytes,
        dpid: int,
        attempt: int,
        type_name: str,
        limit: float,
    ) -> None:
        """The task ran past its time limit (the worker's own enforcement)."""
        text = f"task #{tid} ({type_name}) ran longer than {limit:g} s"
        log.warning("ringbus: %s", text)
        self._count(failed=1)
        self.tally(type_name, data, hist.FAILED)
        self._dead_letter(env.with_attempt(data, attempt), text, type_name, attempt)
        out = self.codec.encode_text(tid, env.TIMEOUT, text)
        self.tracker.failed(data, out)
        if flags & FLAG_REPLY:
            self._reply(reply, dpid, out, tid)
