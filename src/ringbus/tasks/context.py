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

__all__ = ["Pending", "TaskContext", "current_context", "current_task"]


class TaskContext:
    """The task a handler runs: ``current_task()`` inside it."""

    __slots__ = (
        "_arg",
        "_flag",
        "_gid",
        "_id",
        "_progress",
        "attempt",
        "deadline",
        "max_attempts",
        "queue",
        "type",
    )

    def __init__(
        self,
        gid: bytes,
        task_type: str,
        attempt: int,
        max_attempts: int,
        deadline: float | None,
        queue: str,
        flag: Callable[..., int],
        progress: Callable[..., None],
        arg: int | None = None,
    ) -> None:
        # Built once per task on the worker's hot path: the id's text is made
        # when asked for, and a record's accessors take its offset (``arg``)
        # instead of being closures made per task.
        self._gid = gid
        self._id: str | None = None
        self.type = task_type
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.deadline = deadline
        """time.monotonic() by which the task must be done (None: no deadline)."""
        self.queue = queue
        self._flag = flag  # flag() -> int, or flag(arg) when arg is not None
        self._progress = progress  # progress(fraction, message), or with arg first
        self._arg = arg

    @property
    def id(self) -> str:
        """The task's id ("" for a task without one: an older producer's)."""
        text = self._id
        if text is None:
            text = self._id = "" if not any(self._gid) else self._gid.hex()
        return text

    @property
    def cancelled(self) -> bool:
        """True once ``bus.cancel(id)`` was called: a plain handler should stop."""
        arg = self._arg
        return bool(self._flag() if arg is None else self._flag(arg))

    def set_progress(self, fraction: float | None, message: str = "") -> None:
        """Publish progress (``fraction`` in [0, 1]) for ``bus.status``; cheap."""
        if fraction is not None:
            if not isinstance(fraction, (int, float)) or math.isnan(fraction):
                raise ValueError(f"progress must be a number in [0, 1], not {fraction!r}")
            fraction = min(1.0, max(0.0, float(fraction)))
        if self._arg is None:
            self._progress(fraction, str(message))
        else:
            self._progress(self._arg, fraction, str(message))

    def __repr__(self) -> str:
        return f"<TaskContext {self.id} {self.type} attempt {self.attempt}/{self.max_attempts}>"


Pending = tuple[
    bytes, str, int, int, "float | None", str, Callable[..., int], Callable[..., None], "int | None"
]
"""A ``TaskContext``'s arguments, not yet made into one.  The one-task worker
loop sets this as current (a tuple costs a fifth of the object, and most
handlers never ask); ``current_task()`` makes the object on first use."""

_current: contextvars.ContextVar[TaskContext | Pending | None] = contextvars.ContextVar(
    "ringbus_current_task", default=None
)


def current_context() -> TaskContext | None:
    """The current task's context, None outside a handler."""
    ctx = _current.get()
    if isinstance(ctx, tuple):
        made = TaskContext(*ctx)
        _current.set(made)  # made once: later calls get the same object
        return made
    return ctx


def current_task() -> TaskContext:
    """The task the calling handler runs; ``RuntimeError`` outside a handler."""
    ctx = current_context()
    if ctx is None:
        raise RuntimeError(
            "current_task() is only available inside a ringbus task handler "
            "(while a worker, or the inline bus, runs it)"
        )
    return ctx


def pending_cancelled(p: Pending) -> bool:
    """``TaskContext(*p).cancelled`` without making the object."""
    flag, arg = p[6], p[8]
    return bool(flag() if arg is None else flag(arg))


def pending_attempt(p: Pending, attempt: int) -> Pending:
    """``p`` for another attempt of its task."""
    return (p[0], p[1], attempt, p[3], p[4], p[5], p[6], p[7], p[8])


# The variable's own methods, not wrappers: the worker loops call them once
# per task, and a Python frame each would cost more than the calls.
set_current: Callable[[TaskContext | Pending | None], contextvars.Token[Any]] = _current.set
reset_current: Callable[[contextvars.Token[Any]], None] = _current.reset


def run_with(ctx: TaskContext | None, fn: Callable[[Any], Any], task: Any) -> Any:
    """``fn(task)`` with ``ctx`` current (in a thread pool's thread too)."""
    if ctx is None:
        return fn(task)
    token = _current.set(ctx)
    try:
        return fn(task)
    finally:
        _current.reset(token)
