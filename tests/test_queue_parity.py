"""API parity: each shared case runs against multiprocessing.Queue and ringbus.Queue.

multiprocessing.Queue hands items to a feeder thread, so a shared case that
needs an item to be visible waits for it with a blocking ``get(timeout=...)``
or a settling loop; nothing here asserts a duration.  Where ringbus promises
more (``put`` is synchronous, negative timeouts are refused), a separate
ringbus-only test checks it rather than weakening the shared case.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.context import BaseContext
from typing import Any

import pytest

import ringbus

Factory = Callable[..., Any]
START_METHODS = ["fork", "spawn", "forkserver"]
SETTLE = 10.0  # upper bound for multiprocessing's feeder thread to flush; never a pass criterion


@pytest.fixture(params=["multiprocessing", "ringbus"])
def make(request: pytest.FixtureRequest, shm_name: str) -> Iterator[Factory]:
    """Yields factory(maxsize=0, ctx=None) making the queue kind under test; closes them all."""
    made: list[Any] = []

    def factory(maxsize: int = 0, ctx: BaseContext | None = None) -> Any:
        q: Any
        if request.param == "multiprocessing":
            q = (ctx or mp.get_context()).Queue(maxsize)
        else:
            q = ringbus.Queue(maxsize, name=f"{shm_name}-{len(made)}")
        made.append(q)
        return q

    yield factory
    for q in made:
        q.close()
        if isinstance(q, ringbus.Queue):
            assert q.closed
        else:
            q.join_thread()


@pytest.fixture
def rq(shm_name: str) -> Iterator[ringbus.Queue]:
    """A small ringbus queue for the ringbus-only guarantees."""
    q = ringbus.Queue(4, name=shm_name)
    try:
        yield q
    finally:
        q.close()


def settle_until(pred: Callable[[], bool]) -> bool:
    """Poll pred until true or SETTLE seconds pass (multiprocessing's feeder is async)."""
    deadline = time.monotonic() + SETTLE
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# ---------------------------------------------------------------- shared cases


def test_fifo_order_put_get(make: Factory) -> None:
    q = make()
    items: list[Any] = [0, "one", (2.0, None), {"three": [3]}, b"\x00four", None, 10**30]
    for it in items:
        q.put(it)
    assert [q.get(timeout=SETTLE) for _ in items] == items


def test_fifo_many_items(make: Factory) -> None:
    q = make()
    for i in range(500):
        q.put(i)
    assert [q.get(timeout=SETTLE) for _ in range(500)] == list(range(500))


def test_put_nowait_get_nowait(make: Factory) -> None:
    q = make(2)
    q.put_nowait("a")
    q.put_nowait("b")
    with pytest.raises(queue.Full):
        q.put_nowait("c")
    assert settle_until(lambda: not q.empty())
    assert q.get_nowait() == "a"
    assert settle_until(lambda: not q.empty())
    assert q.get_nowait() == "b"
    with pytest.raises(queue.Empty):
        q.get_nowait()


def test_empty_raised_without_blocking_and_after_timeout(make: Factory) -> None:
    q = make()
    with pytest.raises(queue.Empty):
        q.get(block=False)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    with pytest.raises(queue.Empty):
        q.get(True, 0)
    q.put("x")
    assert q.get(timeout=SETTLE) == "x"
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)


def test_full_raised_without_blocking_and_after_timeout(make: Factory) -> None:
    q = make(3)
    for i in range(3):
        q.put(i)
    with pytest.raises(queue.Full):
        q.put("no", block=False)
    with pytest.raises(queue.Full):
        q.put("no", timeout=0.05)
    with pytest.raises(queue.Full):
        q.put("no", True, 0)
    assert q.get(timeout=SETTLE) == 0
    q.put(3, timeout=SETTLE)  # room again
    assert [q.get(timeout=SETTLE) for _ in range(3)] == [1, 2, 3]


def test_timeout_none_blocks_until_another_thread_puts(make: Factory) -> None:
    q = make()
    got: list[Any] = []

    def consumer() -> None:
        got.append(q.get(timeout=None))
        got.append(q.get())

    t = threading.Thread(target=consumer)
    t.start()
    time.sleep(0.1)  # let the consumer reach its wait; correctness does not depend on it
    q.put("first")
    q.put("second")
    t.join(timeout=30)
    assert not t.is_alive()
    assert got == ["first", "second"]


def test_put_timeout_none_blocks_until_another_thread_gets(make: Factory) -> None:
    q = make(1)
    q.put("a")
    done = threading.Event()

    def producer() -> None:
        q.put("b", timeout=None)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert q.get(timeout=SETTLE) == "a"
    t.join(timeout=30)
    assert not t.is_alive() and done.is_set()
    assert q.get(timeout=SETTLE) == "b"


def test_maxsize_full_qsize_empty(make: Factory) -> None:
    q = make(3)
    assert q.qsize() == 0
    assert q.empty()
    assert not q.full()
    q.put(1)
    assert settle_until(lambda: not q.empty())
    assert q.qsize() == 1
    assert not q.full()
    q.put(2)
    q.put(3)
    assert q.qsize() == 3
    assert q.full()
    assert q.get(timeout=SETTLE) == 1
    assert not q.full()
    assert q.qsize() == 2
    assert q.get(timeout=SETTLE) == 2
    assert q.get(timeout=SETTLE) == 3
    assert q.qsize() == 0
    assert q.empty()


def test_put_after_close_raises_is_closed(make: Factory) -> None:
    q = make()
    q.close()
    with pytest.raises(ValueError, match="is closed"):
        q.put(1)
    with pytest.raises(ValueError, match="is closed"):
        q.put_nowait(1)


def test_get_after_close_raises_is_closed(make: Factory) -> None:
    q = make()
    q.put("pending")
    q.close()
    with pytest.raises(ValueError, match="is closed"):
        q.get()
    with pytest.raises(ValueError, match="is closed"):
        q.get(timeout=0.01)
    with pytest.raises(ValueError, match="is closed"):
        q.get_nowait()


def test_close_twice_is_harmless(make: Factory) -> None:
    q = make()
    q.close()
    q.close()


def _child_double(inq: Any, outq: Any) -> None:
    """Child: echo each item doubled until None, then say goodbye."""
    while True:
        item = inq.get(timeout=60)
        if item is None:
            break
        outq.put(item * 2)
    outq.put("bye")


@pytest.mark.parametrize("method", START_METHODS)
def test_queue_passed_to_child_process(
    make: Factory, method: str, procs: list[mp.process.BaseProcess]
) -> None:
    ctx: Any = mp.get_context(method)
    inq, outq = make(ctx=ctx), make(ctx=ctx)
    p = ctx.Process(target=_child_double, args=(inq, outq))
    procs.append(p)
    p.start()
    items: list[Any] = [1, "ab", (3,), [4.5]]
    for it in [*items, None]:
        inq.put(it)
    results = [outq.get(timeout=60) for _ in range(len(items) + 1)]
    assert results == [it * 2 for it in items] + ["bye"]
    p.join(timeout=60)
    assert p.exitcode == 0


# ---------------------------------------------------------------- ringbus-only guarantees


def test_ringbus_put_is_synchronous(rq: ringbus.Queue) -> None:
    """put returns once the message is in shared memory: visible at once to any handle."""
    other = ringbus.Queue.attach(rq.name)
    try:
        rq.put("now")
        assert rq.qsize() == 1
        assert not rq.empty()
        assert not other.empty()
        assert other.get_nowait() == "now"
        assert rq.empty()
        for i in range(4):
            rq.put_nowait(i)
        assert rq.full() and other.full()
        assert other.qsize() == 4
        assert [other.get_nowait() for _ in range(4)] == [0, 1, 2, 3]
    finally:
        other.close()


def test_ringbus_negative_timeout_is_value_error(rq: ringbus.Queue) -> None:
    """Like queue.Queue (multiprocessing.Queue only raises Empty, or blocks on a full put)."""
    stdlib: queue.Queue[int] = queue.Queue(4)
    for q in (rq, stdlib):
        with pytest.raises(ValueError, match="non-negative"):
            q.get(timeout=-1)
        with pytest.raises(ValueError, match="non-negative"):
            q.put(1, timeout=-0.5)
    with pytest.raises(ValueError):
        rq.get_bytes(timeout=-1)
    with pytest.raises(ValueError):
        rq.put_bytes(b"x", timeout=-1)
    with pytest.raises(ValueError):
        rq.get_many(2, timeout=-1)
    with pytest.raises(ValueError):
        rq.put_many([1], timeout=-1)
    assert rq.empty()  # the refused puts queued nothing
    rq.put(1, block=False, timeout=-1)  # timeout is ignored when not blocking, like queue.Queue
    assert rq.get(block=False, timeout=-1) == 1


def test_ringbus_get_many_nonblocking_empty_raises(rq: ringbus.Queue) -> None:
    with pytest.raises(queue.Empty):
        rq.get_many(3, block=False)
    with pytest.raises(queue.Empty):
        rq.get_bytes_many(3, block=False)
    with pytest.raises(queue.Empty):
        rq.get_many(3, timeout=0.01)


def test_ringbus_context_manager_closes(shm_name: str) -> None:
    with ringbus.Queue(name=shm_name) as q:
        q.put(1)
        assert q.get() == 1
    assert q.closed
    with pytest.raises(ValueError, match="is closed"):
        q.put(2)


def test_ringbus_pickles_by_name(rq: ringbus.Queue) -> None:
    clone = pickle.loads(pickle.dumps(rq))
    try:
        assert isinstance(clone, ringbus.Queue)
        assert clone.name == rq.name
        assert not clone.owner and rq.owner
        clone.put("via clone")
        assert rq.get_nowait() == "via clone"
    finally:
        clone.close()


def _child_put_big_and_exit(q: ringbus.Queue, n: int, size: int) -> None:
    """Child: put n large messages nobody has read yet, then exit."""
    for i in range(n):
        q.put_bytes(bytes([i]) * size)


@pytest.mark.parametrize("method", START_METHODS)
def test_ringbus_child_exits_with_unread_messages(
    shm_name: str, method: str, procs: list[mp.process.BaseProcess]
) -> None:
    """No feeder thread: a child whose puts were never read still exits (mp.Queue would hang
    joining its feeder on a full pipe), and its messages survive it."""
    ctx: Any = mp.get_context(method)
    with ringbus.Queue(name=shm_name) as q:
        n, size = 4, 200_000
        p = ctx.Process(target=_child_put_big_and_exit, args=(q, n, size))
        procs.append(p)
        p.start()
        p.join(timeout=120)
        assert p.exitcode == 0
        assert q.qsize() == n
        got = [q.get_bytes(block=False) for _ in range(n)]
        assert got == [bytes([i]) * size for i in range(n)]
