"""The threads that run plain handlers in a concurrent worker.

``ThreadPoolExecutor`` makes a Future (with its Condition) per call, takes
two locks to submit and a Python-level semaphore to decide whether to start
a thread, and sets the Future's result under its lock: tens of
microseconds per task with the GIL held, for a result that the caller
hands back by itself (``PlainCalls``).  Here a call is a
tuple on a SimpleQueue; threads start as needed up to ``size``, exactly
like the executor's (a call either takes an idle thread or starts one).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from ringbus.tasks.context import TaskContext, run_with

__all__ = ["PlainCalls", "TaskThreads"]

log = logging.getLogger("ringbus.server")

_Call = tuple[Callable[..., object], tuple[Any, ...]]


class TaskThreads:
    """Up to ``size`` daemon threads named ``<prefix>_<n>``.  A call's
    exception is logged; its thread goes on."""

    def __init__(self, size: int, prefix: str) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, not {size!r}")
        self.size = size
        self._prefix = prefix
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads done with a call and not yet promised another
        self._closed = False

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        if self._closed:
            raise RuntimeError("the task threads are shut down")
        self._calls.put((fn, args))
        with self._lock:
            if self._idle:
                self._idle -= 1  # a waiting thread takes it
                return
            if len(self._threads) >= self.size:
                return  # the next thread done takes it
            t = threading.Thread(
                target=self._work, name=f"{self._prefix}_{len(self._threads)}", daemon=True
            )
            self._threads.append(t)
        t.start()

    def _work(self) -> None:
        get = self._calls.get
        while True:
            call = get()
            if call is None:
                return
            fn, args = call
            try:
                fn(*args)
            except BaseException:
                log.exception("ringbus: a call in a task thread failed")
            del call, fn, args  # no reference to the task while waiting
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True) -> None:
        """Drop the calls not started and stop every thread after its call in
        hand; ``wait``: join them (False: a thread stuck in a handler is left
        behind, a daemon)."""
        self._closed = True
        while True:  # not started: dropped
            try:
                self._calls.get_nowait()
            except queue.Empty:
                break
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._calls.put(None)
        if wait:
            for t in threads:
                t.join()


class PlainCalls:
    """A concurrent worker's plain handlers: ``fn(task)`` in a task thread,
    its outcome back on ``loop`` (``submit``), in bursts (one wake-up of the
    loop for every call finished meanwhile, not one per call as
    ``run_in_executor`` does).

    Every call runs in a task thread, however quick its handler has been:
    a plain handler may block at any call (a cache miss, a slow SMTP
    server), and blocking calls must overlap, never stall the loop and the
    worker's other tasks.  (Running handlers that had been quick on the
    loop's own thread was tried: one blocking call then stalled them all.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.threads = TaskThreads(size, "ringbus-task")
        self._outbox: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = (
            collections.deque()
        )
        self._due = False

    def submit(
        self, ctx: TaskContext | None, fn: Callable[[Any], Any], task: Any
    ) -> asyncio.Future[Any]:
        fut = self.loop.create_future()
        self.threads.submit(self._call, fut, ctx, fn, task)
        return fut

    def _call(
        self, fut: asyncio.Future[Any], ctx: TaskContext | None, fn: Callable[[Any], Any], task: Any
    ) -> None:
        try:
            ok, value = True, run_with(ctx, fn, task)
        except BaseException as exc:  # as run_in_executor: the awaiting task decides
            ok, value = False, exc
        self._outbox.append((fut, ok, value))
        if not self._due:  # first the outcome, then the flag (see _drain)
            self._due = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: a stuck thread that came back late
                pass

    def _drain(self) -> None:
        self._due = False  # first: an outcome appended from now on schedules another
        box = self._outbox
        while box:
            fut, ok, value = box.popleft()
            if fut.done():  # given up on (time limit)
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def shutdown(self, wait: bool = True) -> None:
        self.threads.shutdown(wait)
