"""Periodic tasks: what fires when (``bus.periodic``), and the due-time rules.

A schedule is declared in the app module, so every ``ringbus worker
app:bus`` has it; only the bus's leader fires it (``server/scheduler.py``),
once per due time.  Cron expressions are parsed by croniter (``pip install
'ringbus[cron]'``) and read in the leader's local time.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Schedule", "ScheduleBook", "check_due"]

log = logging.getLogger("ringbus.schedule")


def _croniter() -> Any:
    try:
        from croniter import croniter
    except ImportError as exc:  # pragma: no cover - the extra is not installed
        raise ImportError("cron schedules need croniter: pip install 'ringbus[cron]'") from exc
    return croniter


@dataclass(frozen=True)
class Schedule:
    """``make()`` builds the task to send every ``every`` seconds or at each
    time matching ``cron``."""

    name: str
    make: Callable[[], Any]
    every: float | None = None
    cron: str | None = None

    def next_after(self, t: float) -> float:
        """The first due time strictly after ``t`` (Unix seconds)."""
        if self.every is not None:
            return t + self.every
        assert self.cron is not None
        start = dt.datetime.fromtimestamp(t).astimezone()
        return float(_croniter()(self.cron, start).get_next(float))

    def latest_due(self, after: float, now: float) -> float | None:
        """The last due time in (after, now], skipping the ones before it."""
        first = self.next_after(after)
        if first > now:
            return None
        if self.every is not None:
            return after + math.floor((now - after) / self.every) * self.every
        due = first
        while True:  # cron: walk forward (bounded by how long no leader ran)
            nxt = self.next_after(due)
            if nxt > now:
                return due
            due = nxt


def make_schedule(
    target: Any, every: float | dt.timedelta | None, cron: str | None, name: str | None
) -> Schedule:
    """Validate ``bus.periodic``'s arguments (ValueError naming the problem)."""
    if (every is None) == (cron is None):
        raise ValueError("periodic() takes exactly one of every= and cron=")
    seconds: float | None = None
    if every is not None:
        seconds = every.total_seconds() if isinstance(every, dt.timedelta) else every
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"every= must be a positive number of seconds, not {every!r}")
        seconds = float(seconds)
    if cron is not None:
        if not isinstance(cron, str) or not _croniter().is_valid(cron):
            raise ValueError(f"invalid cron expression {cron!r}")
    if callable(target) and not isinstance(target, type):
        make = target
        label = getattr(target, "__qualname__", type(target).__qualname__)
    else:
        task = target

        def make() -> Any:
            return task

        label = type(task).__qualname__
    return Schedule(name or label, make, seconds, cron)


def check_due(delay: float | dt.timedelta | None, eta: dt.datetime | None, now: float) -> float:
    """The due time (Unix seconds) of ``delay=`` / ``eta=``; 0.0 for neither."""
    if delay is not None and eta is not None:
        raise ValueError("give delay= or eta=, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else delay
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise ValueError(f"delay= must be seconds or a timedelta, not {delay!r}")
        if not seconds >= 0:
            raise ValueError(f"delay= must not be negative, not {delay!r}")
        return now + float(seconds) if seconds else 0.0
    if eta is not None:
        if not isinstance(eta, dt.datetime):
            raise ValueError(f"eta= must be a datetime, not {eta!r}")
        if eta.tzinfo is None or eta.utcoffset() is None:
            raise ValueError(f"eta= must be timezone-aware (e.g. tzinfo=timezone.utc): {eta!r}")
        return max(eta.timestamp(), now)
    return 0.0


class ScheduleBook:
    """The leader's record of each schedule's last and next run, kept in the
    transport so that the next leader goes on where this one stopped."""

    def __init__(self, schedules: dict[str, Schedule]) -> None:
        self.schedules = schedules
        self.last: dict[str, float] = {}
        self.next: dict[str, float] = {}

    def load(self, data: bytes | None, now: float) -> None:
        saved: dict[str, Any] = {}
        if data:
            try:
                saved = json.loads(data).get("schedules", {})
            except (ValueError, AttributeError):
                log.warning("ringbus: the schedule state is unreadable; starting afresh")
        for name, sch in self.schedules.items():
            last = saved.get(name, {}).get("last")
            if isinstance(last, (int, float)):
                self.last[name] = float(last)
                nxt = sch.next_after(float(last))
                if nxt <= now:
                    # Missed while no leader ran: once now (the latest due time), not a burst.
                    nxt = sch.latest_due(float(last), now) or nxt
                self.next[name] = nxt
            else:
                self.next[name] = sch.next_after(now)

    def due(self, now: float) -> list[tuple[str, float]]:
        """(name, due time) of every schedule due by ``now``."""
        return [(n, t) for n, t in self.next.items() if t <= now]

    def fired(self, name: str, due: float, now: float) -> None:
        self.last[name] = due
        nxt = self.schedules[name].next_after(due)
        if nxt <= now:  # behind (a slow leader): skip to the next time after now
            nxt = self.schedules[name].latest_due(due, now) or nxt
            nxt = self.schedules[name].next_after(nxt)
        self.next[name] = nxt

    def earliest(self) -> float | None:
        return min(self.next.values()) if self.next else None

    def dump(self, leader: int) -> bytes:
        return json.dumps(
            {
                "leader": leader,
                "schedules": {
                    n: {"last": self.last.get(n), "next": self.next.get(n)}
                    for n in self.schedules
                },
            }
        ).encode()
