"""The recovery lock is a lease: a bogus or stale holder (a corrupted word
naming a live pid, a recoverer that died or sits in another PID namespace)
cannot disable recovery for more than one lease (1 s)."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from ringbus import Queue, RingError
from test_corruption import mapped, set_u64

OFF_RECOVERY_LOCK = 784
OFF_RECOVERY_LEASE = 792
LEASE_HELD_NS = 950_000_000  # just under the longest valid lease, 1 s


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


def test_recover_reports_a_lock_held_under_a_valid_lease(shm_name: str) -> None:
    """While its holder keeps renewing the lease, recover() gives up with
    RingError instead of taking the lock.  The holder keeps its lease near the
    longest valid one (1 s), so only a stall of the renewing thread longer
    than that could let recover() take over (a 300 ms lease was outlived by
    a starved renewer in an ASan CI run)."""
    stop = threading.Event()
    with Queue(8, name=shm_name) as q, mapped(shm_name) as m:
        struct.pack_into("<I", m, OFF_RECOVERY_LOCK, 1)

        def renew() -> None:
            while not stop.is_set():
                set_u64(m, OFF_RECOVERY_LEASE, time.monotonic_ns() + LEASE_HELD_NS)
                time.sleep(0.01)

        set_u64(m, OFF_RECOVERY_LEASE, time.monotonic_ns() + LEASE_HELD_NS)
        t = threading.Thread(target=renew)
        t.start()
        try:
            with pytest.raises(RingError, match="recovery lock"):
                q.recover()
        finally:
            stop.set()
            t.join()
        struct.pack_into("<I", m, OFF_RECOVERY_LOCK, 0)
