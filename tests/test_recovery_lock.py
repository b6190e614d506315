"""The recovery lock is a lease: a bogus or stale holder (a corrupted word
naming a live pid, a recoverer that died or sits in another PID namespace)
cannot disable recovery for more than one lease (1 s)."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import cffi
import pytest

from ringbus import Queue, RingError
from test_corruption import mapped, set_u64

OFF_RECOVERY_LOCK = 784
OFF_RECOVERY_LEASE = 792
LEASE_HELD_NS = 1_000_000_000  # the longest valid lease, as the C holder writes it


def test_a_bogus_recovery_lock_holder_does_not_block_recovery(shm_name: str) -> None:
    """recovery_lock overwritten with a live pid (ours) and no lease."""
    with Queue(8, name=shm_name) as q:
        with mapped(shm_name) as m:
            struct.pack_into("<I", m, OFF_RECOVERY_LOCK, os.getpid())
        for _ in range(2):
            t0 = time.monotonic()
            assert q.recover()["deferred"] is False
            assert time.monotonic() - t0 < 3
        with mapped(shm_name) as m:
            assert struct.unpack_from("<I", m, OFF_RECOVERY_LOCK)[0] == 0


@pytest.mark.parametrize("lease_s", [0.6, 3600.0], ids=["live-lease", "lease-beyond-any-valid"])
def test_the_recovery_lock_is_a_lease(shm_name: str, lease_s: float) -> None:
    """A holder's lock is honoured until its lease runs out, never longer
    than one lease: an expiry further away than that is bogus."""
    with Queue(8, name=shm_name) as q:
        with mapped(shm_name) as m:
            struct.pack_into("<I", m, OFF_RECOVERY_LOCK, 1)
            set_u64(m, OFF_RECOVERY_LEASE, time.monotonic_ns() + int(lease_s * 1e9))
        t0 = time.monotonic()
        q.recover()
        took = time.monotonic() - t0
        if lease_s < 1:
            assert 0.4 < took < 3, took  # waited for the lease, then took over
        else:
            assert took < 1, took


@contextlib.contextmanager
def lease_word(m: mmap.mmap) -> Iterator[Any]:
    """The lease as a cffi ``int64_t *``: ``p[0] = v`` is one aligned 8-byte
    store (``*(long long *)p = v``), as the C holder writes it."""
    ffi = cffi.FFI()
    buf = ffi.from_buffer(m)
    try:
        yield ffi.cast("int64_t *", buf + OFF_RECOVERY_LEASE)
    finally:
        ffi.release(buf)  # the map must close later: no buffer left exported


def test_recover_reports_a_lock_held_under_a_valid_lease(shm_name: str) -> None:
    """While its holder keeps renewing the lease, recover() gives up with
    RingError instead of taking the lock.  The holder renews as the C holder
    does: the longest valid lease (now + 1 s), in one 8-byte store
    (``struct.pack_into`` writes byte by byte: a reader could see a torn
    value), and here without pause.  recover() read its clock before the
    lease, so a renewal between the two reads looked further ahead than any
    holder writes, a bogus lease, and was taken over (two ASan CI runs
    failed so; this renewer made it fail at once)."""
    stop = threading.Event()
    with Queue(8, name=shm_name) as q, mapped(shm_name) as m, lease_word(m) as lease:
        struct.pack_into("<I", m, OFF_RECOVERY_LOCK, 1)

        def renew() -> None:
            while not stop.is_set():
                lease[0] = time.monotonic_ns() + LEASE_HELD_NS

        lease[0] = time.monotonic_ns() + LEASE_HELD_NS
        t = threading.Thread(target=renew)
        t.start()
        try:
            with pytest.raises(RingError, match="recovery lock"):
                q.recover()
        finally:
            stop.set()
            t.join()
        struct.pack_into("<I", m, OFF_RECOVERY_LOCK, 0)
