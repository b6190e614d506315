"""Time on shared memory: delayed envelopes, the bus's leader, its schedule state.

- **Delayed envelopes** wait in ``/dev/shm/ringbus-<bus>-timers``, a record
  file (``record_file.py``: CRC per record, ``flock``, 0600, capped) whose
  records are ``f64 due (Unix seconds)`` + the envelope.  A producer appends
  and rings a doorbell, a one-slot ring ``/ringbus-<bus>-bell``, so the
  leader sleeping until its next due time wakes at once for an earlier one.
- **The leader** holds ``flock`` on ``/dev/shm/ringbus-<bus>-leader``; the
  kernel drops it when the holder dies, and the next server's scheduler
  takes it within its retry interval.  Only the leader moves due envelopes
  to the task ring (in due order, each put before its record is tombstoned:
  a leader killed between the two moves that one envelope twice).
- **Schedule state** (periodic tasks' last and next runs, who leads) is a
  small file the leader rewrites whole (``rename``), for ``ringbus stats``.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import queue
import struct
import time
from collections.abc import Callable

from ringbus import _names
from ringbus._proc import mapped_pids
from ringbus.errors import RingError
from ringbus.queue import Queue
from ringbus.transport.record_file import RecordFile

__all__ = [
    "Doorbell",
    "LeaderLock",
    "ShmTime",
    "TimerStore",
    "read_small_file",
    "write_small_file",
]

_DUE = struct.Struct("<d")
_MOVE_BATCH = 512
_COMPACT_FROM = 1 << 20  # bytes of dead records before the file is rewritten


class Doorbell:
    """A one-slot ring: ``ring()`` never blocks; ``wait()`` sleeps on its futex."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._q: Queue | None = None

    def _queue(self) -> Queue:
        if self._q is None:
            self._q = Queue.open(self.name, 1, slot_size=64, max_message_size=64)
        return self._q

    def ring(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue().put_bytes(b"!", False)

    def wait(self, timeout: float) -> None:
        q = self._queue()
        with contextlib.suppress(queue.Empty):
            q.get_bytes(True, max(0.0, timeout))
            while True:  # every ring before now is answered by this wake
                q.get_bytes(False)

    def close(self) -> None:
        if self._q is not None:
            self._q.close()
            self._q = None


class TimerStore:
    """Delayed envelopes of one bus (see the module docstring)."""

    def __init__(self, path: str, bell: Doorbell, max_bytes: int) -> None:
        self.file = RecordFile(path, max_bytes)
        self.bell = bell
        # The leader's view: what it has read of the file, due-ordered.
        self._heap: list[tuple[float, int, bytes]] = []
        self._offset = 0
        self._dead = 0

    def put(self, data: bytes, due: float) -> None:
        self.file.add(_DUE.pack(due) + data)
        self.bell.ring()

    def forget(self) -> None:
        """Drop the leader's view (a new leader reads the file from the start)."""
        self._heap.clear()
        self._offset = 0
        self._dead = 0

    def _read_new(self) -> None:
        found, self._offset = self.file.scan_from(self._offset)
        for off, (_, body) in found:
            (due,) = _DUE.unpack_from(body)
            heapq.heappush(self._heap, (due, off, body[_DUE.size :]))

    def move_due(self, now: float, put_tasks: Callable[[list[bytes]], object]) -> float | None:
        """Leader: queue every envelope due by ``now`` (Unix seconds) in due
        order; returns when the next one is due (None: nothing waits)."""
        self._read_new()
        heap = self._heap
        while heap and heap[0][0] <= now:
            batch: list[tuple[float, int, bytes]] = []
            while heap and heap[0][0] <= now and len(batch) < _MOVE_BATCH:
                batch.append(heapq.heappop(heap))
            try:
                put_tasks([data for _, _, data in batch])
            except BaseException:
                for item in batch:  # not queued: they stay due
                    heapq.heappush(heap, item)
                raise
            self._dead += sum(len(d) + 32 for _, _, d in batch)
            if self.file.kill([off for _, off, _ in batch]):
                self.forget()  # the file was emptied: offsets start again at 0
                self._read_new()
        if self._dead > _COMPACT_FROM and self._dead * 2 > self.file.size():
            self.file.compact()
            self.forget()
            self._read_new()
        return heap[0][0] if heap else None

    def pending(self) -> tuple[int, float | None]:
        """(count, next due) from the file itself (any process)."""
        dues = [_DUE.unpack_from(body)[0] for _, body in self.file.records()]
        return len(dues), (min(dues) if dues else None)


class LeaderLock:
    """``flock`` on the bus's leader file: held until released or death."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def try_acquire(self) -> bool:
        if self._fd >= 0:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise RingError(f"{self.path} is not this user's private file: refusing to lead")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # drops the flock

    def holder(self) -> int | None:
        """Pid of the process that leads now, if one does."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None  # nobody holds it
        finally:
            os.close(fd)


def write_small_file(path: str, data: bytes) -> None:
    """Replace ``path`` whole (readers see the old or the new content)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def read_small_file(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


class ShmTime:
    """The time methods of ``ShmTransport`` (a mixin: see ``Transport``)."""

    holds_delayed = True
    bus_name: str
    record_max_bytes: int
    put_tasks: Callable[..., None]
    _put_due: Callable[[list[bytes]], None]

    def _reset_time(self) -> None:
        """At start, and in a forked child: the parent's flock stays the parent's
        (the child closes its copy of the descriptor, which keeps the lock)."""
        lead: LeaderLock | None = getattr(self, "_lead", None)
        if lead is not None and lead.held:
            lead.release()
        self._timers: TimerStore | None = None
        self._lead: LeaderLock | None = None

    def _timer_store(self) -> TimerStore:
        if self._timers is None:
            bell = Doorbell(_names.bell_name(self.bus_name))
            path = _names.timers_path(self.bus_name)
            self._timers = TimerStore(path, bell, self.record_max_bytes)
        return self._timers

    def put_delayed(self, data: bytes, due: float) -> None:
        self._timer_store().put(data, due)

    def move_due(self) -> float | None:
        # Each due envelope goes back to its own (queue, priority): shm_queues.py.
        return self._timer_store().move_due(time.time(), self._put_due)

    def wait_timers(self, timeout: float) -> None:
        self._timer_store().bell.wait(timeout)

    def scheduled(self) -> tuple[int, float | None]:
        return self._timer_store().pending()

    def _leader_lock(self) -> LeaderLock:
        if self._lead is None:
            self._lead = LeaderLock(_names.leader_path(self.bus_name))
        return self._lead

    def try_lead(self) -> bool:
        lock = self._leader_lock()
        was = lock.held
        if lock.try_acquire() and not was:
            self._timer_store().forget()  # read what the last leader left, from the start
        return lock.held

    def resign(self) -> None:
        if self._lead is not None:
            self._lead.release()

    def leader(self) -> str | None:
        pid = self._leader_lock().holder()
        return None if pid is None else str(pid)

    def write_schedule_state(self, data: bytes) -> None:
        write_small_file(_names.schedule_path(self.bus_name), data)

    def read_schedule_state(self) -> bytes | None:
        return read_small_file(_names.schedule_path(self.bus_name))

    def retire(self, keep_state: bool) -> None:
        """A server stops: leave no leader file, bell or empty timer file of its
        own behind (other servers make them anew when they need them)."""
        lock = self._lead
        if lock is not None and lock.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock.path)  # still ours: we hold the flock
            lock.release()
        timers = _names.timers_path(self.bus_name)
        with contextlib.suppress(OSError):
            if os.stat(timers).st_size == 0:
                os.unlink(timers)
        bell = _names.bell_name(self.bus_name)
        if self._timers is not None:
            self._timers.bell.close()
        if not mapped_pids(_names.SHM_DIR).get(bell):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_names.shm_path(bell))
        if not keep_state:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_names.schedule_path(self.bus_name))

    def _close_time(self) -> None:
        if self._timers is not None:
            self._timers.bell.close()
        self._timers = None
        self.resign()
        self._lead = None

    def _destroy_time(self) -> None:
        for path in (
            _names.timers_path(self.bus_name),
            _names.leader_path(self.bus_name),
            _names.schedule_path(self.bus_name),
            _names.shm_path(_names.bell_name(self.bus_name)),
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
