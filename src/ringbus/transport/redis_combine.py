"""Dispatches of one process that overlap share a round trip to Redis.

A leader/follower combining queue, with no timer: a thread that finds no
send in flight sends its own envelopes at once (a lone dispatch waits for
nothing); threads that arrive while a send is in flight queue theirs, and
when that send returns, the first of them sends everything queued meanwhile
in one pipeline, for all of them.  Each caller returns when its own
envelopes were sent (or raises what that send raised), so ``put_task`` keeps
its meaning: the task is in the stream when it returns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Combiner"]

MAX_BATCH = 4096  # envelopes per round trip (a pipeline, not one huge command)


class _Request:
    __slots__ = ("error", "event", "items", "lead", "sent", "timeout")

    def __init__(self, items: list[bytes], timeout: float | None) -> None:
        self.items = items
        self.timeout = timeout
        self.event: threading.Event | None = None
        self.lead = False  # handed the next send by the previous sender
        self.sent = False
        self.error: BaseException | None = None


class Combiner:
    """``put(items, timeout)`` through ``send(items, timeout)``, combined."""

    def __init__(self, send: Callable[[list[bytes], float | None], None]) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._queue: list[_Request] = []
        self._busy = False
        self.rounds = 0  # round trips made (for tests and benchmarks)
        self.combined = 0  # requests that rode along in another caller's round trip

    def put(self, items: list[bytes], timeout: float | None = None) -> None:
        req = _Request(items, timeout)
        with self._lock:
            if self._busy:
                req.event = threading.Event()
                self._queue.append(req)
            else:
                self._busy = True
                req.lead = True
        if not req.lead:
            req.event.wait()  # type: ignore[union-attr]
            if not req.lead:  # sent by another caller
                if req.error is not None:
                    raise req.error
                return
        self._lead(req)
        if req.error is not None:
            raise req.error

    def _lead(self, first: _Request) -> None:
        """Send ``first`` and what queued up behind it, then hand over."""
        batch = [first]
        with self._lock:
            size = len(first.items)
            while self._queue and size + len(self._queue[0].items) <= MAX_BATCH:
                req = self._queue.pop(0)
                batch.append(req)
                size += len(req.items)
        self.rounds += 1
        self.combined += len(batch) - 1
        try:
            items = first.items if len(batch) == 1 else [d for r in batch for d in r.items]
            timeouts = [r.timeout for r in batch if r.timeout is not None]
            self._send(items, min(timeouts) if timeouts else None)
        except BaseException as exc:
            for r in batch:
                r.error = exc
        finally:
            with self._lock:
                nxt = self._queue.pop(0) if self._queue else None
                if nxt is None:
                    self._busy = False
                else:
                    nxt.lead = True
            for r in batch[1:]:
                r.sent = True
                r.event.set()  # type: ignore[union-attr]
            if nxt is not None:
                nxt.event.set()  # type: ignore[union-attr]
