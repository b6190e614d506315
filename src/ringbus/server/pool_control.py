"""Changing a running pool: rolling restart, one worker more or fewer.

``TaskServer.reload()`` (SIGHUP in ``ringbus worker``) replaces the workers one
at a time: the old one gets a graceful stop (it finishes its tasks, takes no
new one), and its replacement is started by ``spawn``, a fresh interpreter
that imports the handlers' modules again, so code changed on disk is served.
Nothing is lost or run twice: only idle or finishing workers leave.  The
supervisor process itself keeps the code it has (its scheduler and
schedules): restart the server for those.

``add_worker()`` / ``remove_worker()`` (SIGTTIN / SIGTTOU) change the pool by
one worker, within ``max_workers`` (the pool-state segment is sized for it).
All three only ask: they are safe from a signal handler, and the supervisor
thread does the work.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
from typing import Any

__all__ = ["PoolControl"]

log = logging.getLogger("ringbus.server")


class PoolControl:
    """Mixed into TaskServer (see the module docstring)."""

    # From TaskServer:
    bus: Any
    workers: int
    max_workers: int
    start_method: str
    _workers: list[Any]
    _respawn_at: dict[int, float]
    _stopping: bool
    _wake: Any
    _spawn: Any

    def _init_control(self) -> None:
        self.reloads = 0
        """Workers replaced by a rolling restart."""
        self._reload_asked = False
        self._roll: list[int] = []  # worker slots still to replace
        self._retiring: dict[int, str] = {}  # slot -> "reload" or "shrink"
        self._grow_asked = 0
        self._fresh_ctx: Any = None  # the spawn context after a reload

    # -------------------------------------------------------- the asks

    def reload(self) -> None:
        """Rolling restart with the code on disk (see the module docstring)."""
        self._reload_asked = True
        self._wake()

    def add_worker(self) -> None:
        self._grow_asked += 1
        self._wake()

    def remove_worker(self) -> None:
        self._grow_asked -= 1
        self._wake()

    # -------------------------------------------------------- the supervisor's side

    def _worker_ctx(self, default: Any) -> Any:
        """How to start a worker: fresh interpreters once a reload was asked."""
        return self._fresh_ctx or default

    def _control_step(self) -> None:
        """Called by the supervisor loop: act on what was asked."""
        if self._stopping:
            return
        if self._reload_asked:
            self._reload_asked = False
            self._fresh_ctx = mp.get_context("spawn")
            self._roll = [w.slot for w in self._workers if w is not None]
            log.info("ringbus: rolling restart of bus %r (%d)", self.bus.name, len(self._roll))
        while self._grow_asked > 0:
            self._grow_asked -= 1
            free = [
                i for i, w in enumerate(self._workers) if w is None and i not in self._respawn_at
            ]
            if self.workers >= self.max_workers or not free:
                log.warning("ringbus: bus %r is at max_workers=%d", self.bus.name, self.max_workers)
                continue
            self.workers += 1
            self._spawn(free[0])
            log.info("ringbus: bus %r: one worker more, %d now", self.bus.name, self.workers)
        while self._grow_asked < 0:
            self._grow_asked += 1
            live = [w for w in self._workers if w is not None and w.slot not in self._retiring]
            if self.workers <= 1 or not live:
                log.warning("ringbus: bus %r keeps its last worker", self.bus.name)
                continue
            self.workers -= 1
            self._retire(live[-1], "shrink")
            log.info("ringbus: bus %r: one worker fewer, %d now", self.bus.name, self.workers)
        if self._roll and "reload" not in self._retiring.values():
            slot = self._roll.pop(0)
            w = self._workers[slot]
            if w is not None:
                self._retire(w, "reload")

    def _retire(self, w: Any, why: str) -> None:
        self._retiring[w.slot] = why
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGTERM)  # graceful: it finishes what it runs

    def _retired(self, slot: int) -> str | None:
        """The supervisor saw worker ``slot`` exit: why it was asked to, if it was."""
        return self._retiring.pop(slot, None)
