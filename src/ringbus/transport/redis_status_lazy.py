"""A worker's task-status writes held for a few milliseconds.

A task's "running" and progress writes (``redis_status``) wait here for
``LAZY`` to ``2 * LAZY`` seconds before going out: a task that ends sooner
never sends them (its end supersedes them, or carries them in its own
write), so a short task costs Redis one status write and its caller no
round trip; a longer one shows "running" and its progress that much late.
Its end goes to the sending thread without waking it (the task's result or
acknowledgement follows and takes it along).

One thread per worker process ticks every ``LAZY`` seconds while tasks come
and go (no wake-up per task), and sleeps after ``IDLE_TICKS`` quiet ticks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["LAZY", "LazyStatus"]

LAZY = 0.005
"""Seconds between two looks at what running tasks hold."""

IDLE_TICKS = 200  # quiet ticks (1 s) before the thread sleeps until the next task

_pid = [os.getpid()]  # this process's pid, without a getpid() system call per task
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))

Cmd = tuple[Any, ...]
Send = Callable[[list[Cmd], bool], None]
"""``send(cmds, wake)``: hand commands on; ``wake=False`` lets them wait for
the next result or acknowledgement (a tick wakes them at the latest)."""


class LazyStatus:
    """Held commands per task id.  ``send`` runs under this object's lock,
    so a tick's flush and a task's end never overtake each other."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._cond = threading.Condition()
        self._held: dict[bytes, list[Cmd]] = {}
        self._seen: set[bytes] = set()  # held at the last tick: due at this one
        self._news = False  # something came since the last tick
        self._unwoken = False  # ends handed on without waking the sender
        self._sleeping = False
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._closed = False

    def hold(self, gid: bytes, cmds: list[Cmd]) -> None:
        """Keep ``cmds`` of task ``gid`` until it ends or a tick sends them."""
        with self._cond:
            if self._closed:
                self._send(cmds, True)
                return
            self._held.setdefault(gid, []).extend(cmds)
            self._stir()

    def end(self, gid: bytes, finish: Callable[[list[Cmd]], list[Cmd]]) -> None:
        """Hand on ``finish(held)``: the task's last commands, given what it
        still held (to drop or to send first)."""
        with self._cond:
            cmds = finish(self._held.pop(gid, []))
            if not cmds:
                return
            if self._closed:
                self._send(cmds, True)
                return
            self._send(cmds, False)
            self._unwoken = True
            self._stir()

    def drop(self, gid: bytes) -> None:
        """Forget what task ``gid`` holds (a later write supersedes it)."""
        with self._cond:
            self._held.pop(gid, None)

    def _stir(self) -> None:
        self._news = True
        if self._thread is None or self._pid != _pid[0]:  # none yet, or the parent's
            self._pid = _pid[0]
            self._thread = threading.Thread(
                target=self._run, name="ringbus-redis-status", daemon=True
            )
            self._thread.start()
        elif self._sleeping:
            self._cond.notify()

    def _run(self) -> None:
        quiet = 0
        with self._cond:
            while not self._closed:
                if quiet >= IDLE_TICKS:
                    self._sleeping = True
                    self._cond.wait_for(lambda: self._news or self._closed)
                    self._sleeping = False
                    quiet = 0
                    continue
                self._cond.wait(LAZY)
                if self._closed:
                    return
                quiet = 0 if self._news or self._held else quiet + 1
                self._news = False
                due = [g for g in self._held if g in self._seen]
                cmds = [c for g in due for c in self._held.pop(g)]
                self._seen = set(self._held)
                if cmds or self._unwoken:
                    self._unwoken = False
                    self._send(cmds, True)

    def close(self) -> None:
        """Send what is held now; later writes go out at once."""
        with self._cond:
            self._closed = True
            held, self._held = self._held, {}
            self._cond.notify_all()
            cmds = [c for v in held.values() for c in v]
            if cmds or self._unwoken:
                self._send(cmds, True)
