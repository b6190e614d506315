"""``TaskStatus``: what ``bus.status(task_id)`` returns."""

from __future__ import annotations

from typing import NamedTuple

from ringbus.transport.task_table import STATE_NAMES, TaskRecord

__all__ = ["STATES", "TaskStatus", "status_of"]

STATES = frozenset(("scheduled", "queued", "running", "done", "failed", "cancelled", "unknown"))


class TaskStatus(NamedTuple):
    id: str
    state: str
    """scheduled, queued, running, done, failed, cancelled or unknown."""
    attempt: int = 0
    progress: float | None = None
    message: str = ""
    queued_at: float | None = None
    """Unix seconds (None: not known)."""
    started_at: float | None = None
    finished_at: float | None = None


def status_of(task_id: str, rec: TaskRecord | None) -> TaskStatus:
    if rec is None:
        return TaskStatus(task_id, "unknown")
    return TaskStatus(
        task_id,
        STATE_NAMES[rec.state] if rec.state < len(STATE_NAMES) else "unknown",
        rec.attempt,
        rec.progress,
        rec.message,
        rec.queued_at or None,
        rec.started_at or None,
        rec.finished_at or None,
    )
