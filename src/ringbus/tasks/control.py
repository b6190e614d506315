"""Task identity and control on the bus: ``status``, ``result``, ``cancel``.

A mixin of ``TaskBus``: every dispatch registers its task in the
transport's task table (``transport/task_table.py``) and gets an id; these
methods look the id up from any process of the bus.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import signal
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import TYPE_CHECKING, Any

from ringbus._ids import current_pid, new_id, parse_id
from ringbus.tasks import envelope as env
from ringbus.tasks.status import TaskStatus, status_of
from ringbus.transport.task_table import (
    CANCELLED,
    DONE,
    FINAL,
    QUEUED,
    RUNNING,
    SCHEDULED,
    TaskRecord,
    TaskTable,
)

if TYPE_CHECKING:
    from ringbus.tasks.codec import Codec
    from ringbus.tasks.results import ProcState
    from ringbus.transport.base import Transport

__all__ = ["BusAsyncFuture", "TaskControl"]

_POLL_MIN, _POLL_MAX = 0.001, 0.05  # result(): look again after this long, growing
DEFAULT_GRACE = 5.0


class BusAsyncFuture(asyncio.Future):
    """The asyncio future of ``dispatch_async``, with the task's id."""

    task_id = ""


class TaskControl:
    """``status`` / ``result`` / ``result_async`` / ``cancel`` by task id."""

    transport: Transport
    name: str
    codec: Codec
    _st: ProcState | None

    def _table(self) -> TaskTable | None:
        return self.transport.task_table()

    @functools.cached_property
    def _records(self) -> TaskTable | None:
        """The transport's task table, looked up once (dispatch uses it each time)."""
        return self.transport.task_table()

    def _encode_new(
        self,
        task: Any,
        tid: int,
        flags: int,
        reply: bytes,
        deadline: float = 0.0,
        wall: float = 0.0,
        due: float = 0.0,
    ) -> tuple[bytes, bytes]:
        """(id, envelope) of a new task: its status record, then its bytes
        (the record is dropped again if the task cannot be encoded).
        ``due``: when a delayed task is due (Unix seconds; 0: now)."""
        pid = current_pid()
        table = self._records
        if table is None:
            gid = new_id()
        else:
            gid = table.add(SCHEDULED if due else QUEUED, pid, tid)
        try:
            data = self.codec.encode_task(task, tid, flags, pid, reply, deadline, wall, gid=gid)
        except BaseException:
            self._drop_task(gid)
            raise
        if due:  # its queue wait counts from when it is due (metrics)
            data = env.with_enqueued(data, due)
        return gid, data

    def _dispatch_encoder(self, reply: bytes) -> Callable[[Any, int], tuple[bytes, bytes]]:
        """``_encode_new`` for dispatch's common case, a reply and no
        deadline: the status record and the envelope in one frame (the
        general path's three frames were a fifth of a dispatch); unsigned
        pickle inline, with one clock read.  The bus calls it only without
        middleware (which adds its headers in ``_encode_new``)."""
        table = self._records
        add = None if table is None else table.adder()
        flags, drop = env.FLAG_REPLY, self._drop_task
        if not self.codec.plain_pickle:
            encode_task = self.codec.encode_task

            def encode_other(task: Any, tid: int) -> tuple[bytes, bytes]:
                pid = current_pid()
                gid = new_id() if add is None else add(QUEUED, pid, tid)
                try:
                    return gid, encode_task(task, tid, flags, pid, reply, 0.0, 0.0, gid)
                except BaseException:
                    drop(gid)
                    raise

            return encode_other
        pack, dumps, clock = env.TASK_HEADER.pack, pickle.dumps, time.time
        magic, rlen = env.TASK_MAGIC, len(reply)

        def encode(task: Any, tid: int) -> tuple[bytes, bytes]:
            pid = current_pid()
            gid = new_id() if add is None else add(QUEUED, pid, tid)
            try:  # the same bytes as codec._encode_new
                return gid, pack(magic, flags, 1, pid, tid, 0.0, 0.0, rlen, gid, clock()) + (
                    reply + dumps(task, 5)
                )
            except BaseException:
                drop(gid)
                raise

        return encode

    def _drop_task(self, gid: bytes) -> None:
        """The task was not queued after all (the channel refused it)."""
        table = self.transport.task_table()
        if table is not None:
            table.drop(gid)

    # ------------------------------------------------------------ status

    def status(self, task_id: str) -> TaskStatus:
        """Where the task is: state ``scheduled``, ``queued``, ``running``,
        ``done``, ``failed``, ``cancelled`` or ``unknown`` (never dispatched
        here, or finished and its record dropped: without ``keep_result`` at
        once, with it after that many seconds).  ``ValueError`` for a
        malformed id."""
        gid = parse_id(task_id)
        table = self._table()
        return status_of(task_id, None if table is None else table.get(gid))

    def _final(self, task_id: str) -> TaskRecord | None:
        """The finished record of the task; None while it is not finished."""
        gid = parse_id(task_id)
        table = self._table()
        rec = None if table is None else table.get(gid)
        if rec is None:
            raise LookupError(
                f"task {task_id}: unknown on bus {self.name!r} (never dispatched here, or it "
                "finished and its result was not kept: the handler has no keep_result, "
                "or keep_result seconds have passed, or the store evicted it)"
            )
        return rec if rec.state in FINAL else None

    def _value(self, task_id: str, rec: TaskRecord) -> Any:
        if rec.state == CANCELLED:
            raise CancelledError(f"task {task_id} was cancelled")
        if rec.result is None:
            raise LookupError(
                f"task {task_id} finished ({'done' if rec.state == DONE else 'failed'}) "
                f"but its result is not kept: {rec.result_dropped or 'no result stored'}"
            )
        ok, value = self.codec.decode_result(rec.result, rec.result[1])  # signed or not
        if ok:
            return value
        raise value

    def result(self, task_id: str, timeout: float | None = None) -> Any:
        """The task's value (or its exception raised here), from any process,
        waiting up to ``timeout`` seconds (``TimeoutError``) for it to finish.
        ``LookupError`` when the result is not kept (see ``status``);
        ``concurrent.futures.CancelledError`` for a cancelled task."""
        end = None if timeout is None else time.monotonic() + timeout
        pause = _POLL_MIN
        while True:
            rec = self._final(task_id)
            if rec is not None:
                return self._value(task_id, rec)
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"task {task_id}: not finished within {timeout} s")
            left = pause if end is None else min(pause, max(0.0, end - time.monotonic()))
            time.sleep(left)
            pause = min(_POLL_MAX, pause * 2)

    async def result_async(self, task_id: str, timeout: float | None = None) -> Any:
        """``result`` for coroutines: waits without blocking the event loop."""
        end = None if timeout is None else time.monotonic() + timeout
        pause = _POLL_MIN
        while True:
            rec = self._final(task_id)
            if rec is not None:
                return self._value(task_id, rec)
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"task {task_id}: not finished within {timeout} s")
            left = pause if end is None else min(pause, max(0.0, end - time.monotonic()))
            await asyncio.sleep(left)
            pause = min(_POLL_MAX, pause * 2)

    # ------------------------------------------------------------ cancel

    def cancel(self, task_id: str, terminate: bool = False, grace: float = DEFAULT_GRACE) -> bool:
        """Cancel the task: a queued or delayed one never runs (its future is
        cancelled); a running ``async def`` handler gets ``CancelledError``; a
        running plain one sees ``current_task().cancelled`` become true.
        ``terminate``: a running task still running after ``grace`` seconds
        has its worker killed (the worker's other tasks are delivered again).
        True if the task will not run or was told to stop; False if it is
        unknown or already finished."""
        gid = parse_id(task_id)
        table = self._table()
        if table is None:
            return False
        before = table.request_cancel(gid, terminate)
        if before is None:
            return False
        if before.state in FINAL:
            return before.state == CANCELLED
        if before.state in (QUEUED, SCHEDULED):
            self._cancel_local(before)
            return True
        if terminate and before.state == RUNNING and table.same_host:
            self._terminate(table, gid, grace)
        return True

    def _cancel_local(self, rec: TaskRecord) -> None:
        """This process dispatched it: cancel its future now."""
        st = self._st
        if st is None or rec.dispatcher_pid != st.pid:
            return
        entry = st.pending.pop(rec.counter, None)
        if entry is None:
            return
        if type(entry) is tuple:
            loop, afut = entry
            try:
                loop.call_soon_threadsafe(afut.cancel)
            except RuntimeError:  # its loop is closed
                pass
        else:
            Future.cancel(entry)  # type: ignore[arg-type]

    def _terminate(self, table: TaskTable, gid: bytes, grace: float) -> None:
        """Kill the worker of a task that did not stop within ``grace`` seconds."""
        end = time.monotonic() + grace
        while time.monotonic() < end:
            rec = table.get(gid)
            if rec is None or rec.state != RUNNING:
                return
            time.sleep(0.01)
        rec = table.get(gid)
        if rec is None or rec.state != RUNNING or not rec.worker_pid:
            return
        try:
            os.kill(rec.worker_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
