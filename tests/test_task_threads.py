"""Scope: ``server/task_threads.py``, the threads of a concurrent worker's
plain handlers: calls overlap up to ``size`` threads, threads are reused
(never more than ``size``), a failing call leaves its thread serving, and
shutdown drops calls not started and joins the threads."""

from __future__ import annotations

import threading

import pytest

from ringbus.server.task_threads import TaskThreads


def _ours() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tt-test_")]


def test_calls_overlap_up_to_size_and_threads_are_reused() -> None:
    pool = TaskThreads(4, "tt-test")
    meet = threading.Barrier(5, timeout=30)  # four calls and this thread, all at once
    pool.submit(meet.wait)
    pool.submit(meet.wait)
    pool.submit(meet.wait)
    pool.submit(meet.wait)
    meet.wait()
    done: list[int] = []
    lock = threading.Lock()
    finished = threading.Semaphore(0)

    def note(i: int) -> None:
        with lock:
            done.append(i)
        finished.release()

    for i in range(100):
        pool.submit(note, i)
    for _ in range(100):
        assert finished.acquire(timeout=30)
    assert sorted(done) == list(range(100))
    assert len(_ours()) == 4  # reused, never more than size
    pool.shutdown()
    assert _ours() == []


def test_a_failing_call_leaves_its_thread_serving(caplog: pytest.LogCaptureFixture) -> None:
    pool = TaskThreads(1, "tt-test")
    ran = threading.Event()
    pool.submit(lambda: 1 / 0)
    pool.submit(ran.set)
    assert ran.wait(30)
    assert "a call in a task thread failed" in caplog.text
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(ran.set)


def test_shutdown_drops_calls_not_started() -> None:
    pool = TaskThreads(1, "tt-test")
    hold, started = threading.Event(), threading.Event()
    ran: list[int] = []

    def busy() -> None:
        started.set()
        hold.wait(30)

    pool.submit(busy)
    assert started.wait(30)
    for i in range(5):
        pool.submit(ran.append, i)  # queued behind the busy thread
    pool.shutdown(wait=False)  # the queued calls are dropped before it returns
    hold.set()
    for t in _ours():
        t.join(30)
    assert ran == []
    assert _ours() == []


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="size"):
        TaskThreads(0, "tt-test")
