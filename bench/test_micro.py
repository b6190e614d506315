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
