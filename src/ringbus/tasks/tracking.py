"""A worker's side of task identity: status records, current_task(), cancel.

The worker loops call ``Tracker`` at each step of a task; everything about
the task table and the handler's context lives here, so that the loops
only gain a line per step.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ringbus.tasks import envelope as env
from ringbus.tasks.context import TaskContext
from ringbus.tasks.identity import format_id
from ringbus.transport.task_table import (
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    SCHEDULED,
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


class Tracker:
    """Status records of the tasks a worker runs (see the module docstring)."""

    def __init__(self, table: TaskTable | None, queue: str, codec: Codec) -> None:
        self.table = table
        self.queue = queue
        self.codec = codec  # encodes a kept result the caller did not ask for
        self.pid = os.getpid()
        self.keeps: dict[bytes, float] = {}  # keep_result of the tasks begun

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
        table = self.table
        if keep > 0:
            self.keeps[gid] = keep
        flag: Callable[[], int] = _no_flag
        progress: Callable[[float | None, str], None] = _no_progress
        if table is not None and gid != _NO_ID:
            bound = table.begin(gid, attempt, self.pid)
            if bound is None:
                return None
            flag, progress = bound
        return TaskContext(
            format_id(gid) if gid != _NO_ID else "",
            type_name,
            attempt,
            max_attempts,
            deadline or None,
            self.queue,
            flag,
            progress,
        )

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
