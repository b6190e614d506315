"""The inline transport: tasks run in the dispatching process, at once.

``TaskBus(name, transport="inline")`` is the test mode.  A dispatched
envelope is handed to ``tasks/inline_runner.py``, which runs the handler
synchronously, with the same bytes as the real path (pickled task and
result), the same retries (backoff recorded in ``backoffs``, not slept),
``current_task()``, status records, dead letters and cancel.  Delayed
envelopes wait in ``delayed`` until ``run_delayed()``.  Nothing here needs
the C extension or ``/dev/shm``.
"""

from __future__ import annotations

import itertools
import queue
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ringbus.errors import TransportClosed
from ringbus.transport.base import Record, Transport
from ringbus.transport.task_table import MemoryTaskTable

if TYPE_CHECKING:
    from ringbus.tasks.bus import TaskBus

__all__ = ["InlineTransport"]


class InlineTransport(Transport):
    """See the module docstring."""

    holds_delayed = True

    def __init__(self) -> None:
        self._bus: weakref.ref[TaskBus] | None = None
        self._table = MemoryTaskTable()
        self._records: dict[str, bytes] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self.delayed: list[tuple[float, bytes]] = []
        """(due, envelope) of delayed tasks not run yet (see ``run_delayed``)."""
        self.backoffs: list[tuple[str, int, float]] = []
        """(task id, failed attempt, seconds) of every retry backoff, not slept."""
        self.ran = 0

    def adopt_bus(self, bus: TaskBus) -> None:
        """Called by ``TaskBus``: the bus whose handlers run here."""
        self._bus = weakref.ref(bus)

    def _run(self, data: bytes) -> None:
        from ringbus.tasks.inline_runner import run_envelope

        bus = self._bus() if self._bus is not None else None
        if bus is None:
            raise RuntimeError("the inline transport is not bound to a live TaskBus")
        self.ran += 1
        run_envelope(bus, self, data)

    # ------------------------------------------------------------ tasks

    def open(self) -> None:
        pass

    def put_task(self, data: bytes, timeout: float | None = None) -> None:
        self._run(data)

    def put_tasks(self, items: list[bytes], timeout: float | None = None) -> None:
        for data in items:
            self._run(data)

    def get_tasks(self, max_items: int = 1, timeout: float | None = None) -> list[bytes]:
        raise queue.Empty  # every task ran when it was put

    def interrupt(self) -> None:
        pass

    def pending_tasks(self) -> int:
        return 0

    def put_delayed(self, data: bytes, due: float) -> None:
        with self._lock:
            self.delayed.append((due, data))
            self.delayed.sort(key=lambda d: d[0])

    def run_delayed(self, until: float | None = None) -> int:
        """Run the delayed tasks due by ``until`` (Unix seconds; None: all of
        them, whatever their due time); returns how many ran."""
        n = 0
        while True:
            with self._lock:
                if not self.delayed or (until is not None and self.delayed[0][0] > until):
                    return n
                _, data = self.delayed.pop(0)
            self._run(data)
            n += 1

    def scheduled(self) -> tuple[int, float | None]:
        with self._lock:
            return len(self.delayed), (self.delayed[0][0] if self.delayed else None)

    # ------------------------------------------------------------ replies

    def reply_address(self) -> bytes:
        self._closed.clear()  # a bus dispatches again after close()
        return b"inline"

    def recv_replies(self, max_items: int, timeout: float | None = None) -> list[bytes]:
        # Results are resolved when they are sent (send_reply): nothing to read.
        if self._closed.wait(timeout if timeout is not None else 3600.0):
            raise TransportClosed("inline transport closed")
        raise queue.Empty

    def close_replies(self) -> None:
        self._closed.set()

    def send_reply(
        self, address: bytes, pid: int, data: bytes, patience: float | None = None
    ) -> bool:
        from ringbus.tasks.results import _resolve

        bus = self._bus() if self._bus is not None else None
        st = None if bus is None else bus._st
        if st is None:
            return False
        _resolve(st, [data])  # the future is done when dispatch returns
        return True

    # ------------------------------------------------------------ records

    def add_record(self, data: bytes) -> str:
        with self._lock:
            rid = f"{next(self._ids):016x}"
            self._records[rid] = bytes(data)
            return rid

    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records.items())

    def take_records(
        self,
        ids: Iterable[str] | None = None,
        handle: Callable[[Record], object] | None = None,
    ) -> list[Record]:
        with self._lock:
            chosen = list(self._records) if ids is None else [i for i in ids if i in self._records]
            taken = [(i, self._records[i]) for i in chosen]
        out = []
        for rec in taken:
            if handle is not None:
                handle(rec)
            with self._lock:
                self._records.pop(rec[0], None)
            out.append(rec)
        return out

    # ------------------------------------------------------------ task table

    def task_table(self) -> MemoryTaskTable:
        return self._table

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._closed.set()

    def destroy(self, *, force: bool = False) -> None:
        self.close()
        with self._lock:
            self._records.clear()
            self.delayed.clear()
        self._table = MemoryTaskTable()

    def describe(self) -> str:
        return f"inline:{self.bus_name}"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("an inline bus runs in its own process: it cannot be sent to workers")
