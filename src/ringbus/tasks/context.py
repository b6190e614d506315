"""``current_task()``: what a handler knows about the task it runs.

A context variable, so it follows ``async def`` handlers across awaits and
is set on the thread of a plain handler (the worker sets it in whichever
thread runs the handler).
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable
from typing import Any

__all__ = ["TaskContext", "current_task"]


class TaskContext:
    """The task a handler runs: ``current_task()`` inside it."""

    __slots__ = (
        "_flag",
        "_progress",
        "attempt",
        "deadline",
        "id",
        "max_attempts",
        "queue",
        "type",
    )

    def __init__(
        self,
        task_id: str,
        task_type: str,
        attempt: int,
        max_attempts: int,
        deadline: float | None,
        queue: str,
        flag: Callable[[], int],
        progress: Callable[[float | None, str], None],
    ) -> None:
        self.id = task_id
        self.type = task_type
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.deadline = deadline
        """time.monotonic() by which the task must be done (None: no deadline)."""
        self.queue = queue
        self._flag = flag
        self._progress = progress

    @property
    def cancelled(self) -> bool:
        """True once ``bus.cancel(id)`` was called: a plain handler should stop."""
        return bool(self._flag())

    def set_progress(self, fraction: float | None, message: str = "") -> None:
        """Publish progress (``fraction`` in [0, 1]) for ``bus.status``; cheap."""
        if fraction is not None:
            if not isinstance(fraction, (int, float)) or math.isnan(fraction):
                raise ValueError(f"progress must be a number in [0, 1], not {fraction!r}")
            fraction = min(1.0, max(0.0, float(fraction)))
        self._progress(fraction, str(message))

    def __repr__(self) -> str:
        return f"<TaskContext {self.id} {self.type} attempt {self.attempt}/{self.max_attempts}>"


_current: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "ringbus_current_task", default=None
)


def current_task() -> TaskContext:
    """The task the calling handler runs; ``RuntimeError`` outside a handler."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError(
            "current_task() is only available inside a ringbus task handler "
            "(while a worker, or the inline bus, runs it)"
        )
    return ctx


# The variable's own methods, not wrappers: the worker loops call them once
# per task, and a Python frame each would cost more than the calls.
set_current: Callable[[TaskContext | None], contextvars.Token[TaskContext | None]] = _current.set
reset_current: Callable[[contextvars.Token[TaskContext | None]], None] = _current.reset


def run_with(ctx: TaskContext | None, fn: Callable[[Any], Any], task: Any) -> Any:
    """``fn(task)`` with ``ctx`` current (in a thread pool's thread too)."""
    if ctx is None:
        return fn(task)
    token = _current.set(ctx)
    try:
        return fn(task)
    finally:
        _current.reset(token)
