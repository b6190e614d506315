"""RingExecutor conformance, modelled on the semantics the concurrent.futures
documentation promises for Executor / ProcessPoolExecutor (real processes)."""

from __future__ import annotations

import os
import pickle
import signal
import time
from collections.abc import Iterator
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    CancelledError,
    Executor,
    Future,
    as_completed,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

import _tasks_exec as fx
from _tasks_support import wait_for
from ringbus import RemoteTraceback, RingExecutor, WorkerLost

SHM = Path("/dev/shm")


@pytest.fixture
def executor() -> Iterator[RingExecutor]:
    ex = RingExecutor(max_workers=2)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        assert not list(SHM.glob(f"ringbus-{ex._bus.name}-*"))


def test_is_an_executor_and_submit_returns_results(executor: RingExecutor) -> None:
    assert isinstance(executor, Executor)
    fut = executor.submit(fx.mul, 6, 7)
    assert fut.result(timeout=30) == 42
    assert fut.done() and not fut.cancelled() and fut.exception() is None
    assert executor.submit(fx.kwargs_echo, 1, 2, b=3, a=4).result(timeout=30) == (
        (1, 2),
        [("a", 4), ("b", 3)],
    )


def test_exception_is_reraised_with_remote_traceback(executor: RingExecutor) -> None:
    fut = executor.submit(fx.raise_on, 3)
    with pytest.raises(ZeroDivisionError, match="bad 3") as info:
        fut.result(timeout=30)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_on" in str(info.value.__cause__)
    assert isinstance(fut.exception(timeout=30), ZeroDivisionError)


def test_functions_travel_by_reference(executor: RingExecutor) -> None:
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        executor.submit(lambda: 1)
    assert executor.submit(fx.square, 5).result(timeout=30) == 25


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map_keeps_order(executor: RingExecutor, chunksize: int) -> None:
    assert list(executor.map(fx.square, range(50), chunksize=chunksize)) == [
        x * x for x in range(50)
    ]
    # Several iterables: stops at the shortest, like the builtin map.
    assert list(executor.map(fx.mul, range(10), range(5), chunksize=chunksize)) == [
        x * x for x in range(5)
    ]
    assert list(executor.map(fx.square, [], chunksize=chunksize)) == []


def test_map_rejects_bad_chunksize(executor: RingExecutor) -> None:
    with pytest.raises(ValueError):
        executor.map(fx.square, range(3), chunksize=0)


def test_map_raises_the_exception_at_its_position(executor: RingExecutor) -> None:
    it = executor.map(fx.raise_on, range(6))
    assert [next(it), next(it), next(it)] == [0, 1, 2]
    with pytest.raises(ZeroDivisionError):
        next(it)


def test_map_timeout(executor: RingExecutor) -> None:
    it = executor.map(fx.slow_identity, [0.0, 2.0], timeout=0.5)
    assert next(it) == 0.0
    with pytest.raises(TimeoutError):
        next(it)


def test_wait_return_conditions(executor: RingExecutor) -> None:
    fast: Future[Any] = executor.submit(fx.square, 2)
    slow: Future[Any] = executor.submit(fx.slow_identity, 1.0)
    done, not_done = wait([fast, slow], return_when=FIRST_COMPLETED, timeout=30)
    assert fast in done
    bad: Future[Any] = executor.submit(fx.raise_on, 3)
    done, not_done = wait([bad, slow], return_when=FIRST_EXCEPTION, timeout=30)
    assert bad in done
    done, not_done = wait([fast, slow, bad], return_when=ALL_COMPLETED, timeout=30)
    assert not not_done and len(done) == 3
    done, not_done = wait([executor.submit(fx.slow_identity, 2.0)], timeout=0.05)
    assert not done and len(not_done) == 1


def test_as_completed_yields_each_once_and_times_out(executor: RingExecutor) -> None:
    futs = [executor.submit(fx.square, i) for i in range(20)]
    got = sorted(f.result() for f in as_completed(futs, timeout=30))
    assert got == sorted(i * i for i in range(20))
    slow = executor.submit(fx.slow_identity, 1.5)
    with pytest.raises(TimeoutError):
        for _ in as_completed([slow], timeout=0.1):
            pass


def test_done_callbacks_run(executor: RingExecutor) -> None:
    seen: list[int] = []
    fut = executor.submit(fx.square, 9)
    fut.add_done_callback(lambda f: seen.append(f.result()))
    fut.result(timeout=30)
    wait_for(lambda: seen == [81], what="the callback")
    late: list[int] = []
    fut.add_done_callback(lambda f: late.append(f.result()))  # already done: runs at once
    assert late == [81]


def test_cancel_pending_future(executor: RingExecutor) -> None:
    blocker = executor.submit(fx.slow_identity, 0.5)
    executor.submit(fx.slow_identity, 0.5)
    fut = executor.submit(fx.square, 3)
    if fut.cancel():  # still waiting for a result: cancellable
        assert fut.cancelled()
        with pytest.raises(CancelledError):
            fut.result(timeout=30)
    assert blocker.result(timeout=30) == 0.5


def test_submit_after_shutdown_raises() -> None:
    ex = RingExecutor(max_workers=1)
    assert ex.submit(fx.square, 2).result(timeout=30) == 4
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(fx.square, 2)
    with pytest.raises(RuntimeError):
        ex.map(fx.square, [1])
    ex.shutdown()  # idempotent


def test_shutdown_without_use_and_context_manager() -> None:
    RingExecutor(max_workers=1).shutdown()
    with RingExecutor(max_workers=2) as ex:
        futs = [ex.submit(fx.slow_identity, 0.1) for _ in range(4)]
    # __exit__ waited: every pending future is done.
    assert all(f.done() for f in futs)
    assert [f.result() for f in futs] == [0.1] * 4
    assert not list(SHM.glob(f"ringbus-{ex._bus.name}-*"))


def test_shutdown_wait_false_still_completes_futures() -> None:
    ex = RingExecutor(max_workers=2)
    futs = [ex.submit(fx.slow_identity, 0.2) for _ in range(4)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=30) for f in futs] == [0.2] * 4
    assert ex._finished.wait(timeout=30)


def test_shutdown_cancel_futures_cancels_queued_calls(tmp_path: Path) -> None:
    ex = RingExecutor(max_workers=1)
    first = ex.submit(fx.touch_after, str(tmp_path / "first"), 0.5)
    wait_for(lambda: ex._bus.pending_tasks() == 0, what="the first call to start")
    rest = [ex.submit(fx.touch_after, str(tmp_path / f"n{i}"), 0.0) for i in range(10)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.result() == str(tmp_path / "first")
    assert all(f.cancelled() for f in rest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first"]  # none of them ran


def test_initializer_runs_in_each_worker() -> None:
    with RingExecutor(max_workers=2, initializer=fx.init, initargs=("ready",)) as ex:
        assert set(ex.map(fx.get_init_value, [None] * 0)) == set()
        assert [ex.submit(fx.get_init_value).result(timeout=30) for _ in range(4)] == [
            "ready"
        ] * 4


def test_initializer_failure_breaks_the_pool() -> None:
    ex = RingExecutor(max_workers=1, initializer=fx.failing_init)
    try:
        fut = ex.submit(fx.square, 2)
        with pytest.raises(BrokenProcessPool):
            fut.result(timeout=30)
        with pytest.raises(BrokenProcessPool):
            ex.submit(fx.square, 2)
    finally:
        ex.shutdown(wait=True)
    assert ex._finished.wait(timeout=30)


def test_max_tasks_per_child_recycles() -> None:
    with RingExecutor(max_workers=1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(fx.pid).result(timeout=30) for _ in range(6)]
    assert len(set(pids)) == 3
    with pytest.raises(ValueError):
        RingExecutor(max_workers=1, max_tasks_per_child=0)
    with pytest.raises(ValueError):
        RingExecutor(max_workers=0)


def test_a_killed_worker_fails_only_its_call(executor: RingExecutor, tmp_path: Path) -> None:
    """Unlike ProcessPoolExecutor (BrokenProcessPool for everything), only the
    call in hand fails and the pool goes on."""
    report = tmp_path / "pid"
    doomed = executor.submit(fx.hang_and_report, str(report))
    wait_for(lambda: report.exists() and report.read_text(), what="the call to start")
    os.kill(int(report.read_text()), signal.SIGKILL)
    with pytest.raises(WorkerLost):
        doomed.result(timeout=30)
    assert list(executor.map(fx.square, range(10))) == [x * x for x in range(10)]


def test_many_submits_from_threads(executor: RingExecutor) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as threads:
        futs = list(threads.map(lambda i: executor.submit(fx.mul, i, 2), range(2000)))
    assert [f.result(timeout=60) for f in futs] == [i * 2 for i in range(2000)]


def test_shutdown_wait_blocks_until_done() -> None:
    ex = RingExecutor(max_workers=1)
    fut = ex.submit(fx.slow_identity, 0.3)
    t0 = time.monotonic()
    ex.shutdown(wait=True)
    assert fut.done()  # the property, not the time it took
    assert time.monotonic() >= t0
