"""TaskServer: the worker pool (Swoole's ``task_worker_num``).

A supervisor thread in the server process starts the workers, reaps them,
replaces any that die (their caller gets ``WorkerLost``), kills those whose
task overran ``task_timeout`` (their caller gets ``TaskTimeout``) and drains
the pool on ``stop()``.

Each worker records what it is doing in a small shared-memory *pool state*
segment (``/dev/shm/ringbus-<bus>-pool-<server pid>``), one slot per worker:
the supervisor reads it when a worker dies, ``ringbus stats`` can read it
from outside, and each slot has room for the whole envelope of the task in
hand (for redelivery, issue 4).

Stopping a worker never loses the task it took: SIGTERM (or SIGUSR1) only
sets a flag and closes the worker's own task-channel handle, which wakes a
worker blocked in ``get`` (it then exits) and is noticed by a worker running
a task after it has sent the result.  No exception is ever raised from the
signal handler, so a task returned by ``get`` an instant before the signal
cannot be dropped.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import mmap
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.util  # before our atexit hook is registered (see below)
import os
import pickle
import signal
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any, NamedTuple

from ringbus import envelope as env
from ringbus.bus import TaskBus
from ringbus.deadletter import describe_envelope
from ringbus.envelope import FLAG_REPLY, Unrecoverable
from ringbus.errors import RingClosed
from ringbus.transport import SHM_DIR, MessageTooLarge, Transport, TransportClosed, pid_alive

__all__ = ["PoolState", "TaskServer", "WorkerInfo"]

log = logging.getLogger("ringbus.server")

EXIT_INIT_FAILED = 75
"""Exit status of a worker whose initializer raised."""

# ---------------------------------------------------------------- pool state

POOL_MAGIC = b"RBPOOL01"
POOL_VERSION = 1
# magic, version, slots, stride, server pid, created (Unix), bus name length (name at 64)
POOL_HEADER = struct.Struct("<8sIIIIdH")
POOL_HEADER_SIZE = 4096
SLOT_HEAD = 512
REPLY_OFF, REPLY_MAX = 64, 256
TYPE_OFF, TYPE_MAX = 320, 128
DEFAULT_ENVELOPE_AREA = 1 << 20

EMPTY, STARTING, IDLE, RUNNING, EXITED = range(5)
STATE_NAMES = ("empty", "starting", "idle", "running", "exited")

# The whole fixed head of a slot (readers):
#   0 u32 worker pid        4 u32 dispatcher pid   8 u64 task id
#  16 f64 started (monotonic)  24 f64 deadline (monotonic, 0 none)
#  32 u16 attempt   34 u8 flags   35 u16 reply len   37 u8 state
#  38 u64 tasks done  46 u16 type len  48 f64 worker started (monotonic)
#  56 u32 in-flight envelope length (0: no task in hand)   60 u32 reserved
#  64 reply address [256]   320 task type [128]
# 448 u32 tasks failed  452 u32 tasks retried  456 u32 dead-lettered
# 460 u16 deliveries allowed for the task in hand (0: not known yet)
# 512 in-flight record: the whole envelope of the task in hand, written
#     before the ring frees its slots (Ring.get_bytes_recorded), so a worker
#     killed at any instant leaves its task either in the ring or here.
SLOT = struct.Struct("<IIQddHBHBQHdII")
# What a worker writes when it takes a task (offset 4) and when it finishes (offset 37).
SLOT_RUN = struct.Struct("<IQddHBHB")
SLOT_RUN_OFF = 4
SLOT_DONE = struct.Struct("<BQ")
SLOT_DONE_OFF = 37
SLOT_TYPE_LEN = struct.Struct("<H")
SLOT_WORKER = struct.Struct("<I")
SLOT_STARTED = struct.Struct("<d")
SLOT_INFLIGHT_OFF = 56
SLOT_COUNTERS = struct.Struct("<IIIH")
SLOT_COUNTERS_OFF = 448
SLOT_MAXDEL_OFF = 460
_U16 = struct.Struct("<H")
_ZERO4 = bytes(4)


class WorkerInfo(NamedTuple):
    """One worker slot of a pool, as read from the pool state segment."""

    slot: int
    worker_pid: int
    state: str
    task_id: int
    dispatcher_pid: int
    started: float
    deadline: float
    attempt: int
    flags: int
    reply: bytes
    task_type: str
    tasks_done: int
    worker_started: float
    tasks_failed: int = 0
    tasks_retried: int = 0
    dead_lettered: int = 0
    max_deliveries: int = 0
    inflight: int = 0
    """Length of the envelope in the worker's in-flight record (0: none)."""


class PoolState:
    """The pool state segment: a header page, then one slot per worker."""

    def __init__(self, path: str, mm: mmap.mmap, slots: int, stride: int, owner: bool) -> None:
        self.path = path
        self.mm = mm
        self.slots = slots
        self.stride = stride
        self.owner = owner

    @classmethod
    def create(
        cls, bus_name: str, slots: int, envelope_area: int = DEFAULT_ENVELOPE_AREA
    ) -> PoolState:
        stride = -(-(SLOT_HEAD + envelope_area) // 4096) * 4096
        size = POOL_HEADER_SIZE + slots * stride
        base = f"{SHM_DIR}/ringbus-{bus_name}-pool-{os.getpid()}"
        path, n = base, 1
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileExistsError:
                n += 1
                path = f"{base}-{n}"
        try:
            os.ftruncate(fd, size)  # sparse: untouched envelope areas cost nothing
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        name = bus_name.encode()
        POOL_HEADER.pack_into(
            mm, 0, POOL_MAGIC, POOL_VERSION, slots, stride, os.getpid(), time.time(), len(name)
        )
        mm[64 : 64 + len(name)] = name
        return cls(path, mm, slots, stride, owner=True)

    @classmethod
    def attach(cls, path: str, writable: bool = True) -> PoolState:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < POOL_HEADER_SIZE:
                raise ValueError(f"{path} is not a ringbus pool state segment (too small)")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        magic, version, slots, stride, _, _, _ = POOL_HEADER.unpack_from(mm, 0)
        if magic != POOL_MAGIC or version != POOL_VERSION:
            mm.close()
            raise ValueError(f"{path} is not a ringbus pool state segment")
        if POOL_HEADER_SIZE + slots * stride > size:
            mm.close()
            raise ValueError(f"{path} is truncated")
        return cls(path, mm, slots, stride, owner=False)

    @property
    def server_pid(self) -> int:
        return int(POOL_HEADER.unpack_from(self.mm, 0)[4])

    @property
    def bus_name(self) -> str:
        n = POOL_HEADER.unpack_from(self.mm, 0)[6]
        return bytes(self.mm[64 : 64 + n]).decode("utf-8", "replace")

    def offset(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} out of range 0..{self.slots - 1}")
        return POOL_HEADER_SIZE + slot * self.stride

    def reset(self, slot: int, worker_pid: int = 0) -> None:
        """Supervisor: a fresh slot for a new worker."""
        off = self.offset(slot)
        self.mm[off : off + SLOT_HEAD] = bytes(SLOT_HEAD)
        SLOT_WORKER.pack_into(self.mm, off, worker_pid)
        self.mm[off + SLOT_DONE_OFF] = STARTING

    def set_state(self, slot: int, state: int) -> None:
        self.mm[self.offset(slot) + SLOT_DONE_OFF] = state

    def worker_up(self, slot: int, pid: int) -> None:
        """Worker: record its pid and start time, and go idle."""
        off = self.offset(slot)
        SLOT_WORKER.pack_into(self.mm, off, pid)
        SLOT_STARTED.pack_into(self.mm, off + 48, time.monotonic())
        self.mm[off + SLOT_DONE_OFF] = IDLE

    def set_type(self, slot: int, name: str) -> None:
        off = self.offset(slot)
        b = name.encode("utf-8", "replace")[:TYPE_MAX]
        self.mm[off + TYPE_OFF : off + TYPE_OFF + len(b)] = b
        SLOT_TYPE_LEN.pack_into(self.mm, off + 46, len(b))

    def read(self, slot: int) -> WorkerInfo:
        """A consistent snapshot of a slot (re-read while a live worker changes it)."""
        off = self.offset(slot)
        raw = bytes(self.mm[off : off + SLOT_HEAD])
        for _ in range(4):
            again = bytes(self.mm[off : off + SLOT_HEAD])
            if again == raw:
                break
            raw = again
        fields = SLOT.unpack_from(raw)
        (wpid, dpid, tid, started, deadline, attempt, flags, rlen, state, done, tlen, wstart) = (
            fields[:12]
        )
        inflight = fields[12]
        failed, retried, dead, maxdel = SLOT_COUNTERS.unpack_from(raw, SLOT_COUNTERS_OFF)
        rlen = min(rlen, REPLY_MAX)
        tlen = min(tlen, TYPE_MAX)
        return WorkerInfo(
            slot=slot,
            worker_pid=wpid,
            state=STATE_NAMES[state] if state < len(STATE_NAMES) else f"unknown({state})",
            task_id=tid,
            dispatcher_pid=dpid,
            started=started,
            deadline=deadline,
            attempt=attempt,
            flags=flags,
            reply=raw[REPLY_OFF : REPLY_OFF + rlen],
            task_type=raw[TYPE_OFF : TYPE_OFF + tlen].decode("utf-8", "replace"),
            tasks_done=done,
            worker_started=wstart,
            tasks_failed=failed,
            tasks_retried=retried,
            dead_lettered=dead,
            max_deliveries=maxdel,
            inflight=inflight,
        )

    def inflight(self, slot: int) -> bytes | None:
        """The envelope in a worker's in-flight record, if it holds one."""
        off = self.offset(slot)
        (n,) = SLOT_WORKER.unpack_from(self.mm, off + SLOT_INFLIGHT_OFF)
        if not n or n > self.stride - SLOT_HEAD:
            return None
        return bytes(self.mm[off + SLOT_HEAD : off + SLOT_HEAD + n])

    def snapshot(self) -> list[WorkerInfo]:
        return [self.read(i) for i in range(self.slots)]

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.mm.close()

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# ---------------------------------------------------------------- worker process

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_BLOCK_AT_FORK = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}


class _StopFlag:
    __slots__ = ("stop",)

    def __init__(self) -> None:
        self.stop = False


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send SIGTERM (a graceful stop) if the server process dies,
    so a SIGKILLed server leaves no orphan workers behind."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before prctl: stop now
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(
    bus: TaskBus,
    slot: int,
    pool_path: str,
    max_tasks: int | None,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    parent_pid: int = 0,
) -> None:
    """Entry point of a worker process (signals arrive blocked: see _spawn)."""
    flag = _StopFlag()
    transport = bus.transport

    def on_stop(signum: int, frame: FrameType | None) -> None:
        flag.stop = True
        transport.interrupt()  # wakes get(); never raises into the task in hand

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_stop)
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)  # an inherited wakeup fd would write into the parent's loop
    if parent_pid:
        _die_with_parent(parent_pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _BLOCK_AT_FORK)
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
    try:
        _serve(bus, pool, slot, max_tasks, flag)
    finally:
        pool.set_state(slot, EXITED)
        pool.close()
        bus.close()  # a worker that dispatched owns a reply ring: remove it


def _serve(
    bus: TaskBus, pool: PoolState, slot: int, max_tasks: int | None, flag: _StopFlag
) -> None:
    """The worker loop: one task at a time, so a stop or a crash strands nothing
    in this process but the task in hand, which sits in the in-flight record."""
    rec = memoryview(pool.mm)[pool.offset(slot) : pool.offset(slot) + pool.stride]
    try:
        _WorkerLoop(bus, pool, slot, rec, max_tasks, flag).run()
    finally:
        rec.release()


class _WorkerLoop:
    __slots__ = (
        "ack",
        "bus",
        "counters",
        "flag",
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
        self.pool = pool
        self.slot = slot
        self.rec = rec
        self.max_tasks = max_tasks
        self.flag = flag
        self.transport = bus.transport
        # Acknowledging is a no-op on shared memory: skip the call.
        t = self.transport
        self.ack = None if type(t).ack_tasks is Transport.ack_tasks else t.ack_tasks
        self.send = t.send_reply
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
            self.transport.dead_letter(data, reason, task_type, attempt)
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
            self.send(reply, dpid, env.encode_text(tid, env.FAILED, f"task #{tid}: {big}"))
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
            self._reply(reply, dpid, env.encode_error(tid, exc), tid)
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

    # -------------------------------------------------------- the loop

    def run(self) -> None:
        bus, pool, slot, rec, flag = self.bus, self.pool, self.slot, self.rec, self.flag
        transport = self.transport
        take = transport.task_taker()
        reply_putter = transport.reply_putter
        put_reply: Callable[[bytes, bool], object] | None = None
        put_addr = None
        ack = self.ack
        send = self.send
        resolved = bus._resolved
        resolve = bus.resolve
        policy_of = bus.policy
        run = functools.partial(SLOT_RUN.pack_into, rec, SLOT_RUN_OFF)
        finish = functools.partial(SLOT_DONE.pack_into, rec, SLOT_DONE_OFF)
        unpack = env.TASK_HEADER.unpack_from
        hsize = env.TASK_HEADER_SIZE
        loads = pickle.loads
        monotonic = time.monotonic
        encode_ok, encode_text = env.encode_ok, env.encode_text
        result_header = env.RESULT_HEADER.pack
        result_magic, status_ok = env.RESULT_MAGIC, env.OK
        dumps = pickle.dumps
        magic_ok = env.TASK_MAGIC
        inflight_at = SLOT_INFLIGHT_OFF
        inflight_end = SLOT_INFLIGHT_OFF + 4
        maxdel_at, maxdel_end = SLOT_MAXDEL_OFF, SLOT_MAXDEL_OFF + 2
        zero4, zero2 = _ZERO4, _ZERO4[:2]
        pack_u16 = _U16.pack
        max_tasks = self.max_tasks
        last_reply = b""
        last_type: type | None = None
        type_name = ""
        policy = None
        max_del = 0
        max_del_packed = b"\0\0"
        done = 0
        while not flag.stop:
            try:
                data = take(rec, inflight_at, SLOT_HEAD)
            except (TransportClosed, RingClosed):
                break
            try:
                magic, flags, attempt, dpid, tid, deadline, _, rlen = unpack(data)
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
                rec[inflight_at:inflight_end] = zero4
                if ack is not None:
                    ack(1)
                continue
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
                rec[inflight_at:inflight_end] = zero4
                if ack is not None:
                    ack(1)
                continue
            # Reply address first, then the head that refers to it (see PoolState.read).
            if reply != last_reply and rlen <= REPLY_MAX:
                rec[REPLY_OFF : REPLY_OFF + rlen] = reply
                last_reply = reply
            rec[maxdel_at:maxdel_end] = zero2
            run(dpid, tid, now, deadline, attempt, flags, rlen, RUNNING)
            out: bytes | None = None
            try:
                task = (
                    loads(data[start:])
                    if len(data) - start < 4096
                    else env.load_payload(data, start)
                )
                cls = type(task)
                if cls is not last_type:
                    fn = resolved.get(cls) or resolve(cls)
                    policy = policy_of(cls)
                    max_del = policy.max_deliveries
                    max_del_packed = pack_u16(max_del)
                    type_name = f"{cls.__module__}.{cls.__qualname__}"
                    pool.set_type(slot, type_name)
                    last_type = cls
                else:
                    fn = resolved.get(cls) or resolve(cls)
            except Exception as exc:
                # Not retried: unpickling and handler lookup fail the same way again.
                self._fail(data, tid, flags, reply, dpid, exc, attempt, type_name)
                last_type = None
                rec[inflight_at:inflight_end] = zero4
                if ack is not None:
                    ack(1)
                continue
            assert policy is not None
            keep = policy.dead_letter
            rec[maxdel_at:maxdel_end] = max_del_packed
            if attempt > max_del:
                text = (
                    f"task #{tid} ({type_name}) reached attempt {attempt} of at most "
                    f"{policy.max_deliveries}: the workers running it died each time"
                )
                log.error("ringbus: %s; it goes to dead letters", text)
                self._count(failed=1)
                self._dead_letter(data, text, type_name, attempt)
                if flags & FLAG_REPLY:
                    send(reply, dpid, encode_text(tid, env.LOST, text))
                rec[inflight_at:inflight_end] = zero4
                if ack is not None:
                    ack(1)
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
                    data = env.with_attempt(data, attempt)
                    # The record first: a crash from here on redelivers this attempt.
                    env.set_attempt(rec, SLOT_HEAD, attempt)
                    run(dpid, tid, monotonic(), deadline, attempt, flags, rlen, RUNNING)
                    if not self._backoff(delay):
                        # Stopping: hand the retry to the next worker or server.
                        transport.put_task(data)
                        break
                    try:
                        task = env.load_payload(
                            data, start
                        )  # fresh: the handler may have mutated it
                    except Exception as uexc:
                        self._fail(data, tid, flags, reply, dpid, uexc, attempt, type_name, keep)
                        break
                    continue
                except BaseException as exc:  # SystemExit and the like: not retried
                    self._fail(data, tid, flags, reply, dpid, exc, attempt, type_name, keep)
                    break
                else:
                    if flags & FLAG_REPLY:
                        try:
                            out = result_header(result_magic, status_ok, tid) + dumps(value, 5)
                        except Exception:
                            out = encode_ok(tid, value)  # makes the pickling error a FAILED result
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
            # Only now is the task finished: a kill before this line redelivers it.
            rec[inflight_at:inflight_end] = zero4
            if ack is not None:
                ack(1)
            done += 1
            finish(IDLE, done)
            if max_tasks and done >= max_tasks:
                break


# ---------------------------------------------------------------- the server


class _Worker:
    __slots__ = ("kill_reason", "killed_tid", "pid", "process", "slot", "started")

    def __init__(self, slot: int, process: mp.process.BaseProcess) -> None:
        self.slot = slot
        self.process = process
        self.pid: int = process.pid or 0
        self.started = time.monotonic()
        self.kill_reason: str | None = None
        self.killed_tid = -1


_servers: weakref.WeakSet[TaskServer] = weakref.WeakSet()


@atexit.register
def _stop_servers_at_exit() -> None:
    """Workers are not daemons (handlers may start processes): stop them here,
    before multiprocessing's own exit hook would wait for them forever."""
    for server in list(_servers):
        if server._owner_pid == os.getpid():
            server.stop(timeout=10)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class TaskServer:
    """A pool of ``workers`` processes serving ``bus``'s task channel.

    ``max_tasks_per_child`` recycles a worker after that many tasks;
    ``task_timeout`` (seconds) kills a worker whose task runs longer and
    fails that task with ``TaskTimeout``; ``initializer(*initargs)`` runs in
    each worker before it takes tasks.  ``stop()`` is graceful: workers
    finish the task in hand and take no new one; queued tasks stay queued
    for the next server on the same bus.
    """

    def __init__(
        self,
        bus: TaskBus,
        workers: int | None = None,
        *,
        max_tasks_per_child: int | None = None,
        task_timeout: float | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        start_method: str = "fork",
    ) -> None:
        if not isinstance(bus, TaskBus):
            raise TypeError(f"bus must be a TaskBus, not {type(bus).__name__}")
        if workers is None:
            workers = os.cpu_count() or 1
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, not {workers!r}")
        if max_tasks_per_child is not None and (
            not isinstance(max_tasks_per_child, int) or max_tasks_per_child < 1
        ):
            raise ValueError(f"max_tasks_per_child must be >= 1, not {max_tasks_per_child!r}")
        if task_timeout is not None and not task_timeout > 0:
            raise ValueError(f"task_timeout must be > 0 seconds, not {task_timeout!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be callable")
        self.bus = bus
        self.workers = workers
        self.max_tasks_per_child = max_tasks_per_child
        self.task_timeout = task_timeout
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self.start_method = start_method
        self._ctx = mp.get_context(start_method)
        self._lock = threading.RLock()  # stop() may re-enter from a signal handler
        self._state: PoolState | None = None
        self._workers: list[_Worker | None] = [None] * workers
        self._respawn_at: dict[int, float] = {}
        self._quick_fails = [0] * workers
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._started = False
        self._stopping = False
        self._stopped = False
        self._stop_deadline: float | None = None
        self._term_sent = False
        self._owner_pid = os.getpid()
        self.restarts = 0
        self.lost = 0
        self.timeouts = 0
        self.redelivered = 0
        """Tasks of dead workers queued again (attempt + 1)."""
        self.dead_lettered = 0
        """Tasks this supervisor put in dead letters (workers count their own)."""
        self.on_initializer_failure: Callable[[TaskServer], None] | None = None
        """Called (from the supervisor thread) when a worker's initializer raised."""

    # ------------------------------------------------------------ public

    def start(self) -> TaskServer:
        """Open the task channel, start the workers and the supervisor."""
        with self._lock:
            if self._started:
                raise RuntimeError("TaskServer already started")
            self._started = True
        self.bus.transport.open()
        limit = self.bus.transport.max_task_size()
        self._state = PoolState.create(
            self.bus.name, self.workers, max(4096, limit or DEFAULT_ENVELOPE_AREA)
        )
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        _servers.add(self)
        # The supervisor thread forks every worker, the first ones too: a
        # worker's parent-death signal fires when its forking thread ends,
        # and that thread must live as long as the pool.
        started = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._supervise,
            args=(started, failure),
            name=f"ringbus-supervisor-{self.bus.name}",
            daemon=True,
        )
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            self._stopped = True
            self._cleanup()
            raise failure[0]
        log.info("ringbus: serving bus %r with %d workers", self.bus.name, self.workers)
        return self

    def stop(self, timeout: float | None = None, *, wait: bool = True) -> None:
        """Drain the pool: each worker finishes its task in hand and exits.

        After ``timeout`` seconds the workers still busy are killed and their
        callers get ``WorkerLost``.  Tasks still queued stay in the channel.
        ``wait=False`` only asks (safe from a signal handler); a later
        ``stop()`` waits.
        """
        with self._lock:
            if not self._started or self._stopped:
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            if not self._stopping:
                self._stopping = True
                self._stop_deadline = deadline
            elif deadline is not None and (
                self._stop_deadline is None or deadline < self._stop_deadline
            ):
                self._stop_deadline = deadline
        self._wake()
        if not wait:
            return
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._cleanup()
        log.info("ringbus: pool of bus %r stopped", self.bus.name)

    def kill(self, *, wait: bool = True) -> None:
        """Stop now: kill every worker (their callers get ``WorkerLost``)."""
        self.stop(timeout=0, wait=wait)

    @property
    def running(self) -> bool:
        return self._started and not self._stopped

    @property
    def pids(self) -> list[int]:
        """Pids of the live workers."""
        return [w.pid for w in list(self._workers) if w is not None]

    @property
    def state_path(self) -> str | None:
        """Path of the pool state segment (for ``ringbus stats``)."""
        return self._state.path if self._state is not None else None

    def worker_info(self) -> list[WorkerInfo]:
        """What each worker is doing now (from the pool state segment)."""
        return self._state.snapshot() if self._state is not None and not self._stopped else []

    def __enter__(self) -> TaskServer:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self._stopped else "new")
        return f"<TaskServer bus={self.bus.name!r} workers={self.workers} {state}>"

    # ------------------------------------------------------------ supervisor

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _spawn(self, slot: int) -> None:
        assert self._state is not None
        self._state.reset(slot)
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main,
            args=(
                self.bus,
                slot,
                self._state.path,
                self.max_tasks_per_child,
                self.initializer,
                self.initargs,
                os.getpid(),
            ),
            name=f"ringbus-worker-{self.bus.name}-{slot}",
            daemon=False,
        )
        # The child starts with stop signals blocked, so none can hit it
        # before its own handlers are installed (it unblocks them).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCK_AT_FORK)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        # Readers outside see the pid as soon as the child exists, not only
        # once it has booted (the worker writes the same value in worker_up).
        SLOT_WORKER.pack_into(self._state.mm, self._state.offset(slot), process.pid)
        self._workers[slot] = _Worker(slot, process)

    def _next_timeout(self) -> float | None:
        waits: list[float] = []
        now = time.monotonic()
        if self.task_timeout is not None:
            waits.append(max(0.005, min(0.25, self.task_timeout / 10)))
        if self._respawn_at and not self._stopping:
            waits.append(max(0.0, min(self._respawn_at.values()) - now))
        if self._stopping and self._stop_deadline is not None:
            waits.append(max(0.0, self._stop_deadline - now))
        return min(waits) if waits else None

    def _supervise(self, started: threading.Event, failure: list[BaseException]) -> None:
        try:
            for slot in range(self.workers):
                self._spawn(slot)
        except BaseException as exc:
            failure.append(exc)
            for w in self._workers:
                if w is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGKILL)
                    w.process.join()
            return
        finally:
            started.set()
        try:
            self._supervise_loop()
        except BaseException:
            log.exception("ringbus: the supervisor of bus %r failed", self.bus.name)
            raise

    def _supervise_loop(self) -> None:
        while True:
            if self._stopping and not self._term_sent:
                self._term_sent = True
                self._respawn_at.clear()
                for w in self._workers:
                    if w is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(w.pid, signal.SIGTERM)
            live = [w for w in self._workers if w is not None]
            if self._stopping:
                if not live:
                    return
                if self._stop_deadline is not None and time.monotonic() >= self._stop_deadline:
                    for w in live:
                        if w.kill_reason is None:
                            w.kill_reason = "stop"
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(w.pid, signal.SIGKILL)
            sentinels = {w.process.sentinel: w for w in live}
            ready = mp.connection.wait([*sentinels, self._wake_r], self._next_timeout())
            for obj in ready:
                if obj == self._wake_r:
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.read(self._wake_r, 4096)
                    continue
                w = sentinels.get(obj) if isinstance(obj, int) else None
                if w is not None:
                    self._on_exit(w)
            if not self._stopping and self._respawn_at:
                now = time.monotonic()
                for slot, due in list(self._respawn_at.items()):
                    if due <= now:
                        del self._respawn_at[slot]
                        self._respawn(slot)
            if self.task_timeout is not None:
                self._check_overruns(self.task_timeout)

    def _respawn(self, slot: int) -> None:
        try:
            self._spawn(slot)
            self.restarts += 1
        except Exception:
            log.exception("ringbus: could not start a worker for bus %r", self.bus.name)
            self._respawn_at[slot] = time.monotonic() + 1.0

    def _check_overruns(self, limit: float) -> None:
        assert self._state is not None
        now = time.monotonic()
        for w in self._workers:
            if w is None or w.kill_reason is not None:
                continue
            info = self._state.read(w.slot)
            if info.state == "running" and now - info.started > limit:
                w.kill_reason = "timeout"
                w.killed_tid = info.task_id
                log.warning(
                    "ringbus: task #%d (%s) ran past task_timeout=%s s: killing worker %d",
                    info.task_id,
                    info.task_type,
                    limit,
                    w.pid,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)

    def _on_exit(self, w: _Worker) -> None:
        assert self._state is not None
        w.process.join(timeout=5)
        code = w.process.exitcode
        self._workers[w.slot] = None
        info = self._state.read(w.slot)
        record = self._state.inflight(w.slot) if info.worker_pid in (0, w.pid) else None
        if code is not None and code < 0:
            # A worker killed inside a get may hold claimed slots: hand them back.
            with contextlib.suppress(Exception):
                self.bus.transport.recover()
        if record is not None:
            self._task_in_hand(w, info, record, code)
        elif code not in (0, None) and not (self._stopping and code == -signal.SIGTERM):
            if code == EXIT_INIT_FAILED:
                log.error("ringbus: worker %d of bus %r: initializer failed", w.pid, self.bus.name)
            else:
                log.warning(
                    "ringbus: worker %d of bus %r exited (%s)",
                    w.pid,
                    self.bus.name,
                    _describe_exit(code),
                )
        self._state.reset(w.slot)
        if code == EXIT_INIT_FAILED and self.on_initializer_failure is not None:
            try:
                self.on_initializer_failure(self)
            except Exception:
                log.exception("ringbus: on_initializer_failure hook failed")
        if self._stopping:
            return
        # Back off only for workers that die on their own without a task in
        # hand (a failing start); a poison task ends in dead letters instead.
        quick = (
            code != 0
            and record is None
            and w.kill_reason is None
            and time.monotonic() - w.started < 1.0
        )
        if quick:
            self._quick_fails[w.slot] += 1
            delay = min(5.0, 0.1 * 2 ** (self._quick_fails[w.slot] - 1))
            self._respawn_at[w.slot] = time.monotonic() + delay
        else:
            self._quick_fails[w.slot] = 0
            self._respawn(w.slot)

    def _task_in_hand(self, w: _Worker, info: WorkerInfo, record: bytes, code: int | None) -> None:
        """The worker died holding a task: deliver it again, or fail it for good."""
        transport = self.bus.transport
        try:
            hdr, reply, _ = env.decode_task_header(record)
        except env.EnvelopeError as exc:
            self._bury(
                record, f"malformed envelope in the in-flight record of worker {w.pid}: {exc}"
            )
            return
        same = info.task_id == hdr.task_id and info.state == "running"
        type_name = (info.task_type if same else "") or describe_envelope(record)[0]
        what = f"task #{hdr.task_id} ({type_name or 'unknown type'})"
        status = env.LOST
        if w.kill_reason == "timeout" and w.killed_tid == hdr.task_id:
            self.timeouts += 1
            status = env.TIMEOUT
            text = (
                f"{what} ran longer than task_timeout={self.task_timeout} s; "
                f"worker pid {w.pid} was killed"
            )
        elif w.kill_reason == "stop":
            self.lost += 1
            text = f"worker pid {w.pid} was killed at stop while running {what}"
        else:
            died = f"worker pid {w.pid} died ({_describe_exit(code)}) while running {what}"
            if transport.redelivers_lost_tasks:
                log.warning("ringbus: %s; the transport delivers it again", died)
                return
            allowed = info.max_deliveries if same else 0
            if not allowed or hdr.attempt < allowed:
                try:
                    transport.put_task(env.with_attempt(record, hdr.attempt + 1), timeout=5.0)
                except Exception as exc:
                    log.error("ringbus: %s; could not queue it again: %s", died, exc)
                else:
                    self.redelivered += 1
                    log.warning(
                        "ringbus: %s; delivering it again (attempt %d)", died, hdr.attempt + 1
                    )
                    return
            self.lost += 1
            text = f"{died}, attempt {hdr.attempt} of at most {allowed or hdr.attempt}"
            log.error("ringbus: %s; it goes to dead letters", text)
        self._bury(record, text, type_name, hdr.attempt)
        if hdr.flags & FLAG_REPLY and reply:
            try:
                transport.send_reply(
                    reply, hdr.pid, env.encode_text(hdr.task_id, status, text), patience=5.0
                )
            except Exception:
                log.exception("ringbus: could not answer %s", what)

    def _bury(self, record: bytes, reason: str, type_name: str = "", attempt: int = 0) -> None:
        try:
            self.bus.transport.dead_letter(record, reason, type_name, attempt)
            self.dead_lettered += 1
        except Exception:
            log.exception("ringbus: could not keep a dead letter (%s)", reason)

    def _cleanup(self) -> None:
        _servers.discard(self)
        if self._state is not None:
            self._state.close()
            self._state.unlink()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1


def read_pool_states(bus_name: str) -> dict[str, list[WorkerInfo]]:
    """Worker slots of every live server of ``bus_name`` on this machine
    (path -> slots), for ``ringbus stats``."""
    prefix = f"ringbus-{bus_name}-pool-"
    out: dict[str, list[WorkerInfo]] = {}
    try:
        names = sorted(os.listdir(SHM_DIR))
    except OSError:
        return out
    for name in names:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :].split("-")
        if not rest[0].isdigit() or len(rest) > 2 or not pid_alive(int(rest[0])):
            continue
        try:
            ps = PoolState.attach(f"{SHM_DIR}/{name}", writable=False)
        except (OSError, ValueError):
            continue
        try:
            out[ps.path] = ps.snapshot()
        finally:
            ps.close()
    return out
