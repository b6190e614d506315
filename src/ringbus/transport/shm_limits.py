"""Rate limits and concurrency caps on shared memory: one segment per bus,
``/dev/shm/ringbus-<bus>-limits`` (layout and protocol: csrc/ring_limits.h).

Every process of the machine that serves the bus opens the same segment, so
a handler's token bucket and permit table are shared by all workers of all
servers.  A grant is one CAS in shared memory (no lock, no system call); a
permit is an entry of a holder table naming its process (pid, start time,
pid namespace), so the permits of a worker that died come back to whoever
finds the cap full.
"""

from __future__ import annotations

import contextlib
import threading

from ringbus import _names
from ringbus.errors import RingError
from ringbus.transport.limits import LimitGate

__all__ = ["CAP_RETRY_NS", "ShmLimits", "ShmLimitsMixin"]

CAP_RETRY_NS = 20_000_000
"""A start refused by a full cap is tried again after 20-40 ms (jittered:
when a permit comes back is not known in advance)."""


class ShmLimits:
    """The limits segment of one bus, opened (or created) by this process."""

    def __init__(self, bus_name: str) -> None:
        from ringbus._ring import Limits

        self.name = _names.limits_name(bus_name)
        self._limits = Limits(self.name)

    def gate(self, key: str, interval_ns: int, burst: int, cap: int) -> LimitGate:
        slot = self._limits.slot(key)
        self._limits.configure(slot, interval_ns, burst, cap)
        # A Gate (_limits.pxi) asks the bucket and the permits in one call.
        return self._limits.gate(slot, interval_ns, burst, cap, CAP_RETRY_NS)

    def stats(self, key: str) -> dict[str, int]:
        return self._limits.stats(self._limits.slot(key))

    def close(self) -> None:
        self._limits.close()


class ShmLimitsMixin:
    """``ShmTransport``'s part for limits: the segment, opened on first use."""

    bus_name: str
    _limits_handle: ShmLimits | None = None
    _limits_lock = threading.Lock()

    def limits(self) -> ShmLimits:
        """This bus's limits segment (created on first use, kept across fork:
        the mapping stays valid and the holder words are made anew)."""
        lim = self._limits_handle
        if lim is None:
            with self._limits_lock:
                if self._limits_handle is None:
                    if not self.bus_name:
                        raise RuntimeError("transport is not bound to a bus")
                    self._limits_handle = ShmLimits(self.bus_name)
                lim = self._limits_handle
        return lim

    def _close_limits(self) -> None:
        with self._limits_lock:
            lim, self._limits_handle = self._limits_handle, None
        if lim is not None:
            lim.close()

    def _destroy_limits(self) -> None:
        self._close_limits()
        if self.bus_name:
            with contextlib.suppress(RingError):
                from ringbus._ring import Limits

                Limits.unlink(_names.limits_name(self.bus_name))
