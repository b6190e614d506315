"""API parity: every case runs against multiprocessing.Queue and ringbus.Queue.

Where multiprocessing needs time for its feeder thread, the case waits with a
blocking get; nothing here asserts a duration.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ringbus

Factory = Callable[..., Any]


@pytest.fixture(params=["multiprocessing", "ringbus"])
def make(request: pytest.FixtureRequest, shm_name: str) -> Iterator[Factory]:
    made: list[Any] = []

    def factory(maxsize: int = 0, ctx: Any = None) -> Any:
        if request.param == "multiprocessing":
            q = (ctx or mp).Queue(maxsize)
        else:
            q = ringbus.Queue(maxsize, name=f"{shm_name}-{len(made)}")
        made.append(q)
        return q

    yield factory
    for q in made:
        q.close()
        if hasattr(q, "join_thread"):
            q.join_thread()


def test_fifo_order_and_values(make: Factory) -> None:
    q = make()
    items = [1, "two", (3.0, None), {"four": [4]}, b"\x00five", None]
    for it in items:
        q.put(it)
    assert [q.get(timeout=5) for _ in items] == items


def test_nowait_variants(make: Factory) -> None:
    q = make(2)
    q.put_nowait("a")
    q.put_nowait("b")
    with pytest.raises(queue.Full):
        q.put_nowait("c")
    assert q.get(timeout=5) == "a"
    assert q.get(timeout=5) == "b"
    with pytest.raises(queue.Empty):
        q.get_nowait()


def test_full_and_empty_with_block_false(make: Factory) -> None:
    q = make(1)
    q.put(1)
    with pytest.raises(queue.Full):
        q.put(2, block=False)
    assert q.get(timeout=5) == 1
    with pytest.raises(queue.Empty):
        q.get(block=False)


def test_timeouts_raise_full_and_empty(make: Factory) -> None:
    q = make(1)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    q.put(1)
    with pytest.raises(queue.Full):
        q.put(2, timeout=0.05)


def test_timeout_zero_is_a_single_attempt(make: Factory) -> None:
    q = make(1)
    with pytest.raises(queue.Empty):
        q.get(True, 0)


def test_maxsize_full_qsize_empty(make: Factory) -> None:
    q = make(3)
    assert q.empty()
    for i in range(3):
        q.put(i)
    assert q.full()
    got = [q.get(timeout=5) for _ in range(3)]
    assert got == [0, 1, 2]
    assert q.empty() and q.qsize() == 0 and not q.full()


def test_none_timeout_blocks_until_another_thread_puts(make: Factory) -> None:
    q = make()
    started = threading.Event()

    def later() -> None:
        started.wait()
        q.put("late")

    t = threading.Thread(target=later)
    t.start()
    started.set()
    assert q.get(timeout=None) == "late"
    t.join()


def test_get_and_put_after_close_say_is_closed(make: Factory) -> None:
    q = make()
    q.put(1)
    q.get(timeout=5)
    q.close()
    with pytest.raises(ValueError, match="is closed"):
        q.get()
    with pytest.raises(ValueError, match="is closed"):
        q.put(1)


def _child(q_in: Any, q_out: Any) -> None:
    for _ in range(3):
        q_out.put(q_in.get(timeout=10) * 2)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pass_to_child_process(make: Factory, method: str, procs: list[Any]) -> None:
    ctx: Any = mp.get_context(method)
    q_in, q_out = make(ctx=ctx), make(ctx=ctx)
    p = ctx.Process(target=_child, args=(q_in, q_out))
    procs.append(p)
    p.start()
    for i in range(3):
        q_in.put(i)
    assert sorted(q_out.get(timeout=30) for _ in range(3)) == [0, 2, 4]
    p.join(30)
    assert p.exitcode == 0


# ---------------------------------------------------------------- negative timeout
# multiprocessing.Queue does not check this; queue.Queue and ringbus do.


def test_negative_timeout_is_a_value_error(shm_name: str) -> None:
    with ringbus.Queue(2, name=shm_name) as q:
        with pytest.raises(ValueError, match="non-negative"):
            q.get(timeout=-1)
        with pytest.raises(ValueError, match="non-negative"):
            q.put(1, timeout=-0.5)
        assert q.qsize() == 0
        q.put(1, block=False, timeout=-1)  # timeout ignored without block, as in queue.Queue


def test_put_is_visible_at_once_no_feeder_thread(shm_name: str) -> None:
    """ringbus-only guarantee: put returns when the bytes are in shared memory."""
    with ringbus.Queue(name=shm_name) as q:
        q.put("x")
        assert q.qsize() == 1 and not q.empty()
        assert q.get_nowait() == "x"
