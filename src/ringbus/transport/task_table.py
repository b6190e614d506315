"""The task table: one status record per task, kept by the transport.

The task layer writes it at each step of a task's life (dispatch, start,
progress, end) and reads it for ``bus.status`` / ``bus.result`` /
``bus.cancel``.  A record is a fixed set of fields plus, for handlers with
``keep_result``, the task's result message (opaque bytes: ``envelope.py``
owns them).  Records of finished tasks stay until ``expires_at``; records
of tasks not finished never expire.

``MemoryTaskTable`` keeps it in this process (the inline transport);
``ShmTaskTable`` (``shm_results.py``) in shared memory; a Redis one in
``redis_status.py``.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ringbus.errors import RingbusError

__all__ = [
    "CANCEL",
    "DONE",
    "EMPTY",
    "FINAL",
    "Bound",
    "LocalSteps",
    "MemoryTaskTable",
    "StoreFull",
    "TaskRecord",
    "TaskTable",
]

EMPTY, SCHEDULED, QUEUED, RUNNING, DONE, FAILED, CANCELLED = range(7)
STATE_NAMES = ("unknown", "scheduled", "queued", "running", "done", "failed", "cancelled")
FINAL = frozenset((DONE, FAILED, CANCELLED))
CANCEL, TERMINATE = 1, 2  # cancel flag values
CANCELLED_HOLD = 30 * 86400.0
"""How long the record of a task cancelled while still queued or delayed is
kept (it must outlive the envelope, which a worker drops on sight)."""


Bound = tuple[Callable[..., int], Callable[..., None], int | None]
"""What ``TaskTable.begin`` gives a running task: (cancel flag, progress, arg)."""
LocalSteps = tuple[
    Callable[[bytes, int, int, float], int],
    Callable[[bytes, int, float, float, "bytes | None"], object],
    Callable[[int], int],
    Callable[[int, "float | None", str], None],
]
"""See ``TaskTable.local_steps``."""


class StoreFull(RingbusError):
    """The task table has no room: every record belongs to a task not yet finished."""


@dataclass(frozen=True)
class TaskRecord:
    gid: bytes
    state: int
    cancel: int = 0
    attempt: int = 0
    worker_pid: int = 0
    dispatcher_pid: int = 0
    counter: int = 0
    """The dispatcher's own number for the task (matches results to futures)."""
    queued_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    expires_at: float = 0.0
    progress: float | None = None
    message: str = ""
    result: bytes | None = None
    result_dropped: str = ""
    """Why a kept result is missing (too large for the store)."""


class TaskTable(abc.ABC):
    """Status records by 16-byte task id (see the module docstring)."""

    same_host = True
    """Whether a record's worker pid is a process of this machine (a cancel
    with ``terminate`` may kill it); False for a table shared across hosts."""

    slots: int | None = None
    """How many records it holds at most (None: no fixed bound)."""

    @abc.abstractmethod
    def add(self, state: int, dispatcher_pid: int, counter: int) -> bytes:
        """A record for a new task (``SCHEDULED`` or ``QUEUED``); returns its id.
        ``StoreFull`` when there is no room."""

    def adder(self) -> Callable[[int, int, int], bytes]:
        """``add`` for one process's dispatches (a table may hand out a
        quicker path valid in this process; it falls back to ``add``)."""
        return self.add

    @abc.abstractmethod
    def get(self, gid: bytes) -> TaskRecord | None:
        """The record of ``gid``; None if unknown or expired."""

    @abc.abstractmethod
    def start(self, gid: bytes, attempt: int, worker_pid: int) -> bool:
        """A worker took the task: ``RUNNING``.  False when it was cancelled
        (it must not run; the record is left as it is)."""

    @abc.abstractmethod
    def set_state(self, gid: bytes, state: int, attempt: int = 0) -> None:
        """Back to ``QUEUED``/``SCHEDULED`` (a retry, a redelivery)."""

    @abc.abstractmethod
    def progress(self, gid: bytes, fraction: float | None, message: str) -> None: ...

    @abc.abstractmethod
    def finish(self, gid: bytes, state: int, keep: float, result: bytes | None) -> None:
        """The task ended in ``state``; with ``keep`` > 0 the record (and
        ``result``) stays that many seconds, else it is dropped now."""

    @abc.abstractmethod
    def request_cancel(self, gid: bytes, terminate: bool = False) -> TaskRecord | None:
        """Mark the task cancelled: a queued or delayed one becomes
        ``CANCELLED`` at once, a running one gets its cancel flag.  Returns
        the record as it was before (None: unknown)."""

    def drop(self, gid: bytes) -> None:
        """The task's dispatch failed (not queued): forget its record.  A
        table may do it lazily (Redis: with the next dispatch's round trip)."""
        self.finish(gid, CANCELLED, 0.0, None)

    def cancel_flag(self, gid: bytes) -> int:
        rec = self.get(gid)
        return 0 if rec is None else rec.cancel

    def accessors(
        self, gid: bytes
    ) -> tuple[Callable[[], int], Callable[[float | None, str], None]]:
        """(read the cancel flag, write progress) of a running task, for its
        handler's ``current_task()`` (a table may bind them to the record)."""
        return (lambda: self.cancel_flag(gid)), (lambda f, m: self.progress(gid, f, m))

    def begin(self, gid: bytes, attempt: int, worker_pid: int) -> Bound | None:
        """``start`` and ``accessors`` in one step (a table may do it with one
        lookup): None when the task was cancelled and must not run.  Returns
        ``(flag, progress, arg)``: with ``arg`` None, ``accessors``; else
        ``flag(arg)`` and ``progress(arg, fraction, message)`` (a table can
        hand out the same two functions for every task, and no closures)."""
        if not self.start(gid, attempt, worker_pid):
            return None
        flag, progress = self.accessors(gid)
        return flag, progress, None

    def local_steps(self) -> LocalSteps | None:
        """A worker's per-task steps as direct calls, valid in this process
        while the table is open: ``begin(gid, attempt, pid, now) -> offset``
        (-1: not held here, -2: cancelled), ``finish(gid, state, now, keep,
        result)``, and ``flag(offset)`` / ``progress(offset, fraction,
        message)`` for the handler.  None (the default): use ``begin`` and
        ``finish``."""
        return None

    def sweep(self) -> int:
        """Drop expired records now (they are reused lazily anyway); how many."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release this process's handles."""

    def destroy(self) -> None:  # noqa: B027 - optional hook
        """Remove the table."""


class MemoryTaskTable(TaskTable):
    """A task table in this process (the inline transport)."""

    def __init__(self, max_records: int = 1 << 20) -> None:
        from ringbus._ids import new_id

        self._new_id = new_id
        self._lock = threading.Lock()
        self._recs: dict[bytes, TaskRecord] = {}
        self.max_records = max_records

    def add(self, state: int, dispatcher_pid: int, counter: int) -> bytes:
        gid = self._new_id()
        with self._lock:
            if len(self._recs) >= self.max_records and not self._sweep_locked():
                raise StoreFull(f"the task table holds {len(self._recs)} tasks not finished")
            self._recs[gid] = TaskRecord(
                gid, state, attempt=1, dispatcher_pid=dispatcher_pid, counter=counter,
                queued_at=time.time(),
            )
        return gid

    def _sweep_locked(self) -> int:
        now = time.time()
        dead = [g for g, r in self._recs.items() if r.state in FINAL and 0 < r.expires_at <= now]
        for g in dead:
            del self._recs[g]
        return len(dead)

    def sweep(self) -> int:
        with self._lock:
            return self._sweep_locked()

    def get(self, gid: bytes) -> TaskRecord | None:
        rec = self._recs.get(gid)
        if rec is None or (rec.state in FINAL and 0 < rec.expires_at <= time.time()):
            return None
        return rec

    def _update(self, gid: bytes, **fields: object) -> TaskRecord | None:
        with self._lock:
            rec = self._recs.get(gid)
            if rec is not None:
                self._recs[gid] = replace(rec, **fields)  # type: ignore[arg-type]
            return rec

    def start(self, gid: bytes, attempt: int, worker_pid: int) -> bool:
        rec = self._recs.get(gid)
        if rec is not None and rec.cancel:
            return False
        self._update(
            gid, state=RUNNING, attempt=attempt, worker_pid=worker_pid, started_at=time.time()
        )
        return True

    def set_state(self, gid: bytes, state: int, attempt: int = 0) -> None:
        if attempt:
            self._update(gid, state=state, attempt=attempt)
        else:
            self._update(gid, state=state)

    def progress(self, gid: bytes, fraction: float | None, message: str) -> None:
        self._update(gid, progress=fraction, message=message)

    def finish(self, gid: bytes, state: int, keep: float, result: bytes | None) -> None:
        now = time.time()
        if keep <= 0:
            with self._lock:
                self._recs.pop(gid, None)
            return
        self._update(gid, state=state, finished_at=now, expires_at=now + keep, result=result)

    def request_cancel(self, gid: bytes, terminate: bool = False) -> TaskRecord | None:
        flag = TERMINATE if terminate else CANCEL
        with self._lock:
            rec = self.get(gid)
            if rec is None or rec.state in FINAL:
                return rec
            if rec.state in (QUEUED, SCHEDULED):
                now = time.time()
                new = replace(
                    rec, cancel=flag, state=CANCELLED, finished_at=now,
                    expires_at=now + CANCELLED_HOLD,
                )  # fmt: skip
            else:
                new = replace(rec, cancel=flag)
            self._recs[gid] = new
            return rec

    def __len__(self) -> int:
        return len(self._recs)
