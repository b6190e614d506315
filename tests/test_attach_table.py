"""The attach table: one entry per thread and ring, reused after threads
exit, and recovery that keeps off claims made without an entry.

The first test is the regression for a chaos-test failure: a worker that
replies to more dispatchers than its per-thread cache held took a fresh
entry on every cache miss, filled the table, then claimed without an
intent, and a recovery freed slots it was still reading (a task ran with
bytes from two messages)."""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

from _proc_support import run_to_exit
from ringbus import Queue

TABLE = 64


def _mine(q: Queue) -> list[dict[str, Any]]:
    return [p for p in q.participants() if p["pid"] == os.getpid()]


def test_one_entry_per_thread_however_many_rings_it_uses(shm_name: str) -> None:
    rings = [Queue(16, name=f"{shm_name}-{i}") for i in range(12)]  # > the thread's cache
    try:
        for _ in range(3 * TABLE):
            for q in rings:
                q.put_bytes(b"x")
                assert q.get_bytes(timeout=5) == b"x"
        for q in rings:
            assert len(_mine(q)) == 1, q.participants()
    finally:
        for q in rings:
            q.close()


def test_exited_threads_give_their_entries_to_new_threads(shm_name: str) -> None:
    with Queue(16, name=shm_name) as q:
        seen: list[bool] = []

        def one_request(i: int) -> None:
            q.put_bytes(b"%d" % i)
            assert q.get_bytes(timeout=5) == b"%d" % i
            tid = threading.get_native_id()
            seen.append(any(p["tid"] == tid for p in q.participants()))

        for i in range(2 * TABLE + 10):  # a thread per request, as some servers do
            t = threading.Thread(target=one_request, args=(i,))
            t.start()
            t.join()
        # every thread claimed with an entry of its own (none ran without one)
        assert seen == [True] * (2 * TABLE + 10)
        assert len(_mine(q)) <= TABLE
        assert q.recover()["deferred"] is False


def test_threads_beyond_the_table_work_and_leave_recovery_possible(shm_name: str) -> None:
    with Queue(8, name=shm_name) as q:
        hold = threading.Event()
        ready = threading.Barrier(TABLE + 1)

        def holder() -> None:  # takes an entry and keeps it while alive
            q.put_bytes(b"h")
            q.get_bytes(timeout=5)
            ready.wait()
            hold.wait()

        holders = [threading.Thread(target=holder) for _ in range(TABLE)]
        for t in holders:
            t.start()
        try:
            ready.wait()
            errors: list[BaseException] = []

            def anonymous() -> None:  # the 65th thread: no entry left
                try:
                    tid = threading.get_native_id()
                    assert not any(p["tid"] == tid for p in q.participants())
                    for i in range(500):
                        q.put_bytes_many([b"%d" % i, b"y" * 700])  # a multi-slot one too
                        assert q.get_bytes_many(2, timeout=5) == [b"%d" % i, b"y" * 700]
                    for _ in range(8):
                        q.put_bytes(b"f")
                    try:  # the full and empty paths count their claims back too
                        q.put_bytes(b"over", block=False)
                    except queue.Full:
                        pass
                    for _ in range(8):
                        q.get_bytes(timeout=5)
                    try:
                        q.get_bytes(block=False)
                    except queue.Empty:
                        pass
                except BaseException as exc:
                    errors.append(exc)

            t = threading.Thread(target=anonymous)
            t.start()
            t.join(60)
            assert not t.is_alive() and errors == []
            # no claim without an entry is in flight any more: recovery runs
            assert q.recover()["deferred"] is False
        finally:
            hold.set()
            for t in holders:
                t.join(10)


def _fill_table_then_die_mid_claim(name: str) -> None:
    q = Queue.attach(name)
    hold = threading.Event()
    ready = threading.Barrier(TABLE + 1)

    def holder() -> None:
        q.put_bytes(b"t")
        ready.wait()
        hold.wait()

    for _ in range(TABLE):
        threading.Thread(target=holder, daemon=True).start()
    ready.wait()
    os.environ["RINGBUS_FAULT"] = "put-after-claim"
    Queue.attach(name).put_bytes(b"anonymous")  # claims without an entry, dies
    os._exit(0)


def test_a_dead_claim_without_an_entry_defers_recovery(shm_name: str, procs: list[Any]) -> None:
    """The price of the 65th thread: its claim has no intent, so if it dies
    mid-claim nobody can tell which tickets were its own; recovery repairs
    nothing rather than guess (a guess could free a live claim)."""
    with Queue(128, name=shm_name) as q:
        assert run_to_exit(procs, _fill_table_then_die_mid_claim, shm_name) == 77
        got = q.recover()
        assert got["deferred"] is True
        assert got["abandoned"] == 0 and got["recovered"] == 0
        assert got["reclaimed"] >= TABLE  # the dead holders' idle entries came back
        assert q.get_bytes_many(TABLE, timeout=5) == [b"t"] * TABLE
        assert q.stats()["abandoned"] == 0
