"""A worker's side of task identity: status records, current_task(), cancel.

The worker loops call ``Tracker`` at each step of a task; everything about
the task table and the handler's context lives here, so that the loops
only gain a line per step.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ringbus.tasks import envelope as env
from ringbus.tasks.context import Pending, TaskContext
from ringbus.transport.task_table import (
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    SCHEDULED,
    Bound,
    TaskTable,
)

if TYPE_CHECKING:
    from ringbus.tasks.codec import Codec

__all__ = ["Tracker", "await_cancellable"]

_NO_ID = env.NO_ID
CANCEL_POLL = 0.05
"""How often a running ``async def`` handler's cancel flag is looked at."""


def _no_flag() -> int:
    return 0


def _no_progress(fraction: float | None, message: str) -> None:
    pass


_UNTRACKED: Bound = (_no_flag, _no_progress, None)
_time = time.time


class Tracker:
    """Status records of the tasks a worker runs (see the module docstring)."""

    def __init__(self, table: TaskTable | None, queue: str, codec: Codec) -> None:
        self.table = table
        self.queue = queue
        self.codec = codec  # encodes a kept result the caller did not ask for
        self.pid = os.getpid()
        self.keeps: dict[bytes, float] = {}  # keep_result of the tasks begun
        # The table's records as direct calls (shared memory: C), for the two
        # steps every task takes; made here, in the worker process that uses them.
        steps = None if table is None else table.local_steps()
        self._begin_c = self._finish_c = None
        self._flag_c: Callable[..., int] = _no_flag
        self._progress_c: Callable[..., None] = _no_progress
        if steps is not None:
            self._begin_c, self._finish_c, self._flag_c, self._progress_c = steps

    def quick_steps(
        self,
    ) -> tuple[
        Callable[..., int] | None,
        Callable[..., object] | None,
        Callable[..., int],
        Callable[..., None],
    ]:
        """``(begin, finish, flag, progress)``: the table's direct calls
        (``TaskTable.local_steps``; begin and finish None without them) for a
        loop that makes the common case's steps itself -- a task with an id
        and no ``keep_result``: ``begin`` answering >= 0 is ``begin_pending``'s
        tuple with these ``flag`` and ``progress``, -2 is its None, -1 asks
        ``begin_pending``; ``finish`` with ``DONE`` is ``done``."""
        return self._begin_c, self._finish_c, self._flag_c, self._progress_c

    def begin(
        self,
        gid: bytes,
        attempt: int,
        type_name: str,
        max_attempts: int,
        deadline: float,
        keep: float = 0.0,
    ) -> TaskContext | None:
        """The task starts; None when it was cancelled (drop it, never run it)."""
        p = self.begin_pending(gid, attempt, type_name, max_attempts, deadline, keep)
        return None if p is None else TaskContext(*p)

    def begin_pending(
        self,
        gid: bytes,
        attempt: int,
        type_name: str,
        max_attempts: int,
        deadline: float,
        keep: float = 0.0,
    ) -> Pending | None:
        """``begin``, with the context's arguments instead of the object
        (context.Pending: the one-task worker loop sets them as current)."""
        table = self.table
        if keep > 0:
            self.keeps[gid] = keep
        bound = _UNTRACKED
        if table is not None and gid != _NO_ID:
            begin_c = self._begin_c
            rel = -1 if begin_c is None else begin_c(gid, attempt, self.pid, _time())
            if rel >= 0:
                bound = (self._flag_c, self._progress_c, rel)
            elif rel == -2:
                return None  # cancelled while it waited
            else:  # no direct calls, or a record the table does not hold
                began = table.begin(gid, attempt, self.pid)
                if began is None:
                    return None
                bound = began
        flag, progress, arg = bound
        dl = deadline or None
        return (gid, type_name, attempt, max_attempts, dl, self.queue, flag, progress, arg)

    def _finish(self, gid: bytes, state: int, keep: float, result: bytes | None) -> None:
        self.keeps.pop(gid, None)
        if self.table is not None and gid != _NO_ID:
            self.table.finish(gid, state, keep, result if keep > 0 else None)

    def done(self, gid: bytes, tid: int, value: Any, keep: float, out: bytes | None) -> None:
        """Success; ``out`` is the result message if one was made for the caller."""
        if keep > 0:
            if out is None:
                out = self.codec.encode_ok(tid, value)
            self._finish(gid, DONE, keep, out)
        elif self.table is not None and gid != _NO_ID:  # the common case: one call
            finish_c = self._finish_c
            if finish_c is not None:
                finish_c(gid, DONE, _time(), 0.0, None)
            else:
                self.table.finish(gid, DONE, 0.0, None)

    def failed(self, data: bytes, out: bytes | None) -> None:
        gid = env.task_gid(data)
        self._finish(gid, FAILED, self.keeps.get(gid, 0.0), out)

    def cancelled(self, gid: bytes) -> None:
        self._finish(gid, CANCELLED, self.keeps.get(gid, 0.0), None)

    def again(self, gid: bytes, attempt: int) -> None:
        """The task runs again at once (a retry without the timer store)."""
        if self.table is not None and gid != _NO_ID:
            self.table.set_state(gid, RUNNING, attempt)

    def later(self, data: bytes, attempt: int, delayed: bool) -> None:
        """The task waits for another attempt (a retry, a redelivery)."""
        gid = env.task_gid(data)
        self.keeps.pop(gid, None)
        if self.table is not None and gid != _NO_ID:
            self.table.set_state(gid, SCHEDULED if delayed else QUEUED, attempt)


async def _watch(ctx: TaskContext, task: asyncio.Future[Any]) -> None:
    while not task.done():
        if ctx.cancelled:
            task.cancel()
            return
        await asyncio.sleep(CANCEL_POLL)


async def await_cancellable(ctx: TaskContext | None, awaitable: Awaitable[Any]) -> Any:
    """Await a handler's result; a cancel request raises ``CancelledError``
    inside it.  ``ctx.cancelled`` then tells the caller it was asked for."""
    inner = asyncio.ensure_future(awaitable)
    if ctx is None or not ctx.id:
        return await inner
    watcher = asyncio.ensure_future(_watch(ctx, inner))
    try:
        return await inner
    finally:
        watcher.cancel()
