"""The scheduler: one thread in every TaskServer, active in the bus's leader.

Every server tries to lead (``Transport.try_lead``: an ``flock`` on shared
memory, a lease in Redis); the one that does moves delayed tasks into the
task channel when they are due and fires the bus's periodic schedules, once
per due time.  The others retry twice a second, so when a leader dies
another takes over within a second, and reads where it stopped from the
schedule state the leader keeps in the transport.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from ringbus.errors import TransportClosed
from ringbus.tasks.bus import TaskBus
from ringbus.tasks.schedules import ScheduleBook

__all__ = ["Scheduler"]

log = logging.getLogger("ringbus.scheduler")

_RETRY = 0.5  # a follower tries to lead this often; a leader re-checks its lease too


class Scheduler:
    def __init__(self, bus: TaskBus) -> None:
        self.bus = bus
        self.leading = False
        self.fired = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"ringbus-scheduler-{self.bus.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        transport = self.bus.transport
        book: ScheduleBook | None = None
        try:
            while not self._stop.is_set():
                try:
                    leading = transport.try_lead()
                except Exception:
                    log.exception("ringbus: scheduler of bus %r cannot lead", self.bus.name)
                    leading = False
                if leading and not self.leading:
                    log.info("ringbus: pid %d leads bus %r's scheduler", os.getpid(), self.bus.name)
                    book = ScheduleBook(dict(self.bus.schedules))
                    book.load(transport.read_schedule_state(), time.time())
                    transport.write_schedule_state(book.dump(os.getpid()))
                self.leading = leading
                if not leading or book is None:
                    self._stop.wait(_RETRY)
                    continue
                wake = self._lead_once(book)
                transport.wait_timers(min(_RETRY, max(0.0, wake - time.time())))
        except TransportClosed:  # the bus was closed under a running server: nothing to do
            log.debug("ringbus: the scheduler of bus %r ends: its bus is closed", self.bus.name)
        except Exception:
            log.exception("ringbus: the scheduler of bus %r failed", self.bus.name)
        finally:
            self.leading = False
            try:
                transport.retire(keep_state=bool(self.bus.schedules))
            except Exception:
                log.exception("ringbus: the scheduler of bus %r could not retire", self.bus.name)

    def _lead_once(self, book: ScheduleBook) -> float:
        """Move what is due, fire what is due; returns when to look again."""
        transport = self.bus.transport
        now = time.time()
        try:
            next_task = transport.move_due()
        except Exception:
            log.exception("ringbus: moving due tasks of bus %r failed", self.bus.name)
            next_task = now + _RETRY
        due = book.due(now)
        for name, at in due:
            try:
                self.bus.send(book.schedules[name].make())
                self.fired += 1
            except Exception:
                log.exception("ringbus: periodic task %r of bus %r failed", name, self.bus.name)
            book.fired(name, at, now)
        if due:
            transport.write_schedule_state(book.dump(os.getpid()))
        wakes = [t for t in (next_task, book.earliest()) if t is not None]
        return min(wakes) if wakes else now + _RETRY
