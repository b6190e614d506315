"""pytest-benchmark micro benchmarks of the hot paths, in one process.

    python -m pytest bench/test_micro.py --benchmark-only [--benchmark-autosave]
    python -m pytest bench/test_micro.py --benchmark-compare   # against the last save

Not part of the default test run (testpaths = tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ringbus import Queue

SIZES = [64, 1024, 65536]


@pytest.fixture
def q() -> Iterator[Queue]:
    with Queue(max_message_size=1 << 20) as queue:
        yield queue


@pytest.mark.parametrize("size", SIZES)
def test_put_get_bytes(benchmark: Any, q: Queue, size: int) -> None:
    msg = b"x" * size

    def once() -> bytes:
        q.put_bytes(msg)
        return q.get_bytes()

    assert benchmark(once) == msg


@pytest.mark.parametrize("size", SIZES)
def test_put_get_pickled(benchmark: Any, q: Queue, size: int) -> None:
    obj = {"id": 1, "payload": b"x" * size}

    def once() -> Any:
        q.put(obj)
        return q.get()

    assert benchmark(once) == obj


@pytest.mark.parametrize("size", [64, 1024])
def test_put_many_get_many_256(benchmark: Any, q: Queue, size: int) -> None:
    batch = [b"x" * size] * 256

    def once() -> list[bytes]:
        q.put_bytes_many(batch)
        return q.get_bytes_many(256)

    assert len(benchmark(once)) == 256


def test_envelope_encode_decode(benchmark: Any) -> None:
    """The packed task header: wrap a pickled task, read the header back."""
    import pickle

    from ringbus.tasks import envelope as env

    payload = pickle.dumps(("send-email", "a@example.com", 42), 5)

    def once() -> Any:
        data = env.encode_task(payload, 7, env.FLAG_REPLY, 1234, b"/ringbus-x-reply", 5.0)
        hdr, _, start = env.decode_task_header(data)
        return hdr.task_id, pickle.loads(data[start:])

    assert benchmark(once) == (7, ("send-email", "a@example.com", 42))


def test_result_encode_decode(benchmark: Any) -> None:
    from ringbus.tasks import envelope as env

    def once() -> Any:
        data = env.encode_ok(7, {"ok": True})
        status, _ = env.result_header(data)
        return env.decode_result(data, status)

    assert benchmark(once) == (True, {"ok": True})


def test_dispatch_in_one_process(benchmark: Any) -> None:
    """dispatch() up to the task ring (no worker): pickling, envelope, future, put."""
    import os

    from ringbus import TaskBus

    bus = TaskBus(f"micro-{os.getpid()}")
    bus.register(tuple, lambda t: t)
    try:
        bus.transport.open()

        def once() -> Any:
            fut = bus.dispatch((1, 2))
            bus.transport.get_tasks(1)  # keep the ring from filling up
            return fut

        assert benchmark(once) is not None
    finally:
        bus.destroy()
