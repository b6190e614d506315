"""RingExecutor: a ``concurrent.futures.Executor`` over a private TaskBus.

A drop-in for ``ProcessPoolExecutor``: functions and arguments travel by
pickle (functions by reference), results come back on the dispatcher's reply
ring.  Unlike ``ProcessPoolExecutor`` a worker that dies does not break the
pool: only the future of the call it was running fails (``WorkerLost``) and
the worker is replaced.  A failing ``initializer`` does break it
(``BrokenProcessPool``), as documented for ``ProcessPoolExecutor``.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, InvalidStateError
from concurrent.futures import wait as _wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

from ringbus.server.supervisor import TaskServer
from ringbus.tasks.bus import TaskBus
from ringbus.transport.shm import ShmTransport

__all__ = ["RingExecutor"]

T = TypeVar("T")


# A call travels as a plain tuple, (fn, args) or (fn, args, kwargs): the
# cheapest thing to pickle.  The executor's bus is private, so ``tuple`` is
# its only task type.


def _run_call(call: tuple[Any, ...]) -> Any:
    if len(call) == 2:
        return call[0](*call[1])
    return call[0](*call[1], **call[2])


def _process_chunk(fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]) -> list[Any]:
    return [fn(*args) for args in chunk]


def _get_chunks(*iterables: Iterable[Any], chunksize: int) -> Iterator[tuple[tuple[Any, ...], ...]]:
    it = zip(*iterables, strict=False)
    while True:
        chunk = tuple(itertools.islice(it, chunksize))
        if not chunk:
            return
        yield chunk


def _result_or_cancel(fut: Future[Any], timeout: float | None = None) -> Any:
    try:
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()
    finally:
        del fut


class RingExecutor(Executor):
    """``ProcessPoolExecutor``'s interface over ringbus' shared-memory rings.

    ``max_workers`` defaults to ``os.cpu_count()``.  ``mp_context`` (as in
    ``ProcessPoolExecutor``) picks the start method; the default is fork.
    Workers start on the first submit.  ``retries`` (default 0, as a call
    to ``ProcessPoolExecutor`` is never run twice): how many more times a
    call is run when it raises or its worker dies, see ``RetryPolicy``.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        mp_context: BaseContext | None = None,
        retries: int = 0,
    ) -> None:
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        start_method = mp_context.get_start_method() if mp_context is not None else "fork"
        self._max_workers = max_workers
        self._bus = TaskBus(
            f"x-{os.getpid()}-{secrets.token_hex(6)}", transport=ShmTransport(persistent=False)
        )
        # An executor's caller gets every exception: no dead letters for them.
        self._bus.register(tuple, _run_call, retries=retries, dead_letter=False)
        self._server = TaskServer(
            self._bus,
            max_workers,
            max_tasks_per_child=max_tasks_per_child,
            initializer=initializer,
            initargs=initargs,
            start_method=start_method,
        )
        self._server.on_initializer_failure = self._on_broken
        self._lock = threading.Lock()
        self._started = False
        self._shutdown = False
        self._broken: str | None = None
        self._finished = threading.Event()

    def _ready(self) -> None:
        """Under self._lock: refuse after shutdown, start the pool on first use."""
        if self._broken is not None:
            raise BrokenProcessPool(self._broken)
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if not self._started:
            self._server.start()
            self._started = True

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            self._ready()
            return self._bus.dispatch((fn, args, kwargs) if kwargs else (fn, args))

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Like ``ProcessPoolExecutor.map``: results in order, ``TimeoutError``
        from ``__next__`` once ``timeout`` seconds from this call passed,
        ``chunksize`` items per task.  Every call is queued in one batch."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        calls: list[tuple[Any, ...]]
        if chunksize == 1:
            calls = [(fn, args) for args in zip(*iterables, strict=False)]
        else:
            calls = [
                (_process_chunk, (fn, chunk))
                for chunk in _get_chunks(*iterables, chunksize=chunksize)
            ]
        with self._lock:
            self._ready()
            fs = self._bus.dispatch_many(calls) if calls else []

        def result_iterator() -> Iterator[Any]:
            try:
                fs.reverse()
                while fs:
                    if end_time is None:
                        yield _result_or_cancel(fs.pop())
                    else:
                        yield _result_or_cancel(fs.pop(), end_time - time.monotonic())
            finally:
                for fut in fs:
                    fut.cancel()

        if chunksize == 1:
            return result_iterator()
        return itertools.chain.from_iterable(result_iterator())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; ``cancel_futures`` cancels the calls still queued;
        ``wait`` blocks until every pending call finished and the workers exited."""
        with self._lock:
            already = self._shutdown
            self._shutdown = True
            started = self._started
        if cancel_futures and started:
            self._bus.cancel_queued()
        if already:
            if wait:
                self._finished.wait()
            return
        if not started:
            self._bus.destroy()
            self._finished.set()
            return
        if wait:
            self._finish()
        else:
            # Not a daemon: like ProcessPoolExecutor, the interpreter waits for
            # pending calls before it exits.
            threading.Thread(target=self._finish, name="ringbus-executor-shutdown").start()

    def _finish(self) -> None:
        try:
            while True:
                outstanding = [f for f in self._bus.outstanding() if not f.done()]
                if not outstanding:
                    break
                _wait(outstanding)
            self._server.stop()
        finally:
            self._bus.destroy()
            self._finished.set()

    def _on_broken(self, server: TaskServer) -> None:
        """A worker's initializer failed: fail every pending call and stop."""
        with self._lock:
            if self._broken is not None:
                return
            self._broken = (
                "A process in the process pool was terminated abruptly "
                "while the future was running or pending (initializer failed)."
            )
            self._shutdown = True
        for fut in self._bus.outstanding():
            try:
                fut.set_exception(BrokenProcessPool(self._broken))
            except InvalidStateError:
                pass

        def stop() -> None:
            try:
                self._server.stop(timeout=1.0)
            finally:
                self._bus.destroy()
                self._finished.set()

        # Not from the supervisor thread itself: stop() joins it.
        threading.Thread(target=stop, name="ringbus-executor-broken", daemon=True).start()
