"""Fuzzed segment headers and geometry: attach refuses with RingError, never
crashes or hangs, and a segment it accepts works."""

from __future__ import annotations

import os
import queue
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringbus import MessageTooLarge, Queue, RingError

SHM = Path("/dev/shm")

# (offset, struct format) of every header field a forger could touch
FIELDS = [
    (0, "<Q"), (8, "<I"), (12, "<I"), (16, "<Q"), (24, "<I"), (28, "<I"), (32, "<Q"),
    (40, "<I"), (44, "<I"), (48, "<Q"), (56, "<Q"), (64, "<Q"), (72, "<Q"),
]
interesting = st.sampled_from([0, 1, 2, 7, 8, 16, 63, 64, 255, 256, 4096, 8192, 2**31 - 1,
                               2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1])


_PRISTINE: list[bytes] = []


def pristine() -> bytes:
    """A real segment's bytes (made once; kept out of Hypothesis' reprs)."""
    if not _PRISTINE:
        with Queue(8, slot_size=64, max_message_size=256) as q:
            _PRISTINE.append((SHM / q.name.lstrip("/")).read_bytes())
    return _PRISTINE[0]


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _attach_and_use(name: str) -> None:
    try:
        q = Queue.attach(name)
    except RingError as exc:
        assert str(exc), "a refusal must say why"
        return
    # accepted: whatever it says about itself must be usable and safe
    try:
        q.put_bytes(b"probe", block=False)
    except (queue.Full, MessageTooLarge):
        pass
    try:
        q.get_bytes_many(4, block=False)
    except (queue.Empty, RingError):
        pass
    q.close()


FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # shm_name is fresh per test, fine to share


@settings(max_examples=700, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(FIELDS), st.one_of(interesting, st.integers(0, 2**64 - 1))),
        min_size=1, max_size=4,
    ),
    size_delta=st.sampled_from([0, 0, 0, -1, -4096, 4096, None]),
)
def test_forged_fields(shm_name: str, edits: list, size_delta: int | None) -> None:
    data = bytearray(pristine())
    for (offset, fmt), value in edits:
        value &= (1 << (struct.calcsize(fmt) * 8)) - 1
        struct.pack_into(fmt, data, offset, value)
    if size_delta is None:
        data = data[:8192]
    elif size_delta < 0:
        data = data[:size_delta]
    else:
        data += bytes(size_delta)
    path = SHM / shm_name.lstrip("/")
    _write(path, bytes(data))
    _attach_and_use(shm_name)


@settings(max_examples=400, deadline=None, suppress_health_check=FIXTURE_OK)
@given(head=st.binary(min_size=0, max_size=9000))
def test_random_bytes(shm_name: str, head: bytes) -> None:
    # random bytes, sometimes behind a valid magic so the deeper checks run
    data = head if len(head) % 2 else pristine()[:8] + head
    _write(SHM / shm_name.lstrip("/"), data)
    with pytest.raises(RingError):
        Queue.attach(shm_name)
