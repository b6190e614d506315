# Included by _ring.pyx: the handle on a bus's limits segment (ring_limits.h).
# The acquire calls take typed arguments and return a C integer: no Python
# object is made on the way in, and a grant returns a small cached int.

cdef uint64_t _MAX_WINDOW = 1ULL << 62  # burst x interval_ns must stay below


cdef class Limits:
    """A process-local handle on one limits segment: per-handler token buckets
    and permit tables shared by every process of the machine (see
    csrc/ring_limits.h).  Created (0600, fallocated) on first open."""

    cdef limits_t *_l
    cdef readonly str name

    def __init__(self, str name):
        cdef char err[256]
        cdef bytes b = _as_name(normalize_name(name))
        if self._l != NULL:
            raise RingError("Limits handle already open")
        cdef int rc = limits_open(b, &self._l, err)
        if rc != RING_OK:
            self._l = NULL
            raise RingError(err.decode("utf-8", "replace"))
        self.name = normalize_name(name)

    def __dealloc__(self):
        if self._l != NULL:
            limits_close(self._l)
            self._l = NULL

    cdef inline limits_t *_h(self) except NULL:
        if self._l == NULL:
            raise RingError(f"limits segment {self.name} is closed")
        return self._l

    cdef inline int _slot(self, int slot) except -1:
        if slot < 0 or slot >= LIMITS_SLOTS:
            raise ValueError(f"limit slot {slot} out of range 0..{LIMITS_SLOTS - 1}")
        return slot

    def close(self):
        if self._l != NULL:
            limits_close(self._l)
            self._l = NULL

    @property
    def closed(self):
        return self._l == NULL

    def slot(self, str key):
        """The slot of the handler named ``key`` (found, or taken and named)."""
        cdef char err[256]
        cdef bytes b = key.encode("utf-8")
        cdef int s = limits_slot(self._h(), b, len(b), err)
        if s < 0:
            raise RingError(err.decode("utf-8", "replace"))
        return s

    def configure(self, int slot, uint64_t interval_ns, uint64_t burst, uint32_t cap):
        """Record this process's configuration of ``slot`` (read by tools)."""
        limits_configure(self._h(), self._slot(slot), interval_ns, burst, cap)

    def try_rate(self, int slot, uint64_t interval_ns, uint64_t burst):
        """One start through the bucket: 0 = granted, else nanoseconds to wait."""
        cdef limits_t *l = self._h()
        if interval_ns == 0 or burst == 0 or burst > _MAX_WINDOW // interval_ns:
            raise ValueError(f"invalid bucket: interval_ns={interval_ns}, burst={burst}")
        return limits_rate_acquire(l, self._slot(slot), interval_ns, burst)

    def try_permit(self, int slot, uint32_t cap):
        """A permit among the first ``cap`` (its number, >= 1), or 0: all held."""
        cdef limits_t *l = self._h()
        if cap == 0 or cap > <uint32_t>LIMITS_HOLDERS:
            raise ValueError(f"cap {cap} out of range 1..{LIMITS_HOLDERS}")
        return limits_permit_acquire(l, self._slot(slot), cap)

    def release_permit(self, int slot, int permit):
        """Give a permit back; False if it was no longer this process's."""
        return limits_permit_release(self._h(), self._slot(slot), permit) == 0

    def gate(self, int slot, uint64_t interval_ns, uint64_t burst, uint32_t cap,
             int64_t cap_retry_ns):
        """A ``Gate`` on ``slot``: its bucket (interval_ns 0: none) and its
        first ``cap`` permits (0: no cap)."""
        return Gate(self, self._slot(slot), interval_ns, burst, cap, cap_retry_ns)

    def reclaim(self, int slot):
        """Free the permits of dead holders now; returns how many."""
        return limits_reclaim(self._h(), self._slot(slot))

    def stats(self, int slot):
        cdef limits_stats_t s
        limits_get_stats(self._h(), self._slot(slot), &s)
        return {
            "interval_ns": s.interval_ns, "burst": s.burst, "cap": s.cap, "held": s.held,
            "rate_granted": s.rate_granted, "rate_refused": s.rate_refused,
            "permits_taken": s.permits_taken, "permits_refused": s.permits_refused,
            "reclaimed": s.reclaimed,
        }

    @staticmethod
    def unlink(str name):
        """Remove a limits segment's name (mappings stay valid)."""
        cdef char err[256]
        cdef bytes b = _as_name(normalize_name(name))
        if limits_unlink(b, err) != RING_OK:
            raise RingError(err.decode("utf-8", "replace"))


cdef class Gate:
    """One handler's limits through one ``Limits`` handle, as a worker asks
    them: ``try_start()`` then ``finish(permit)``.  One Python call each."""

    cdef Limits _owner
    cdef int _slot
    cdef uint64_t _interval, _burst
    cdef uint32_t _cap
    cdef int64_t _cap_retry
    cdef uint64_t _rng

    def __init__(self, Limits owner, int slot, uint64_t interval_ns, uint64_t burst,
                  uint32_t cap, int64_t cap_retry_ns):
        if interval_ns and (burst == 0 or burst > _MAX_WINDOW // interval_ns):
            raise ValueError(f"invalid bucket: interval_ns={interval_ns}, burst={burst}")
        if cap > <uint32_t>LIMITS_HOLDERS:
            raise ValueError(f"cap {cap} out of range 0..{LIMITS_HOLDERS}")
        if cap_retry_ns < 1:
            raise ValueError("cap_retry_ns must be positive")
        self._owner = owner
        self._slot = slot
        self._interval = interval_ns
        self._burst = burst
        self._cap = cap
        self._cap_retry = cap_retry_ns
        self._rng = <uint64_t>ring_now() | 1

    def try_start(self):
        """``>= 0``: start (a permit to give back, 0 for none); ``< 0``: not
        now, try again in ``-n`` ns (a full cap: ``cap_retry_ns`` plus up to
        as much again, at random)."""
        cdef limits_t *l = self._owner._h()
        cdef int permit = 0
        cdef int64_t wait
        if self._cap:
            permit = limits_permit_acquire(l, self._slot, self._cap)
            if permit == 0:
                self._rng ^= self._rng << 13
                self._rng ^= self._rng >> 7
                self._rng ^= self._rng << 17
                return -(self._cap_retry + <int64_t>(self._rng % <uint64_t>self._cap_retry))
        if self._interval:
            wait = limits_rate_acquire(l, self._slot, self._interval, self._burst)
            if wait:
                if permit:
                    limits_permit_release(l, self._slot, permit)
                return -wait
        return permit

    def finish(self, int permit):
        """Give ``permit`` back (nothing for 0); False if it was no longer ours."""
        if permit <= 0:
            return True
        return limits_permit_release(self._owner._h(), self._slot, permit) == 0


LIMITS_MAX_HOLDERS = LIMITS_HOLDERS
LIMITS_MAX_NAME = LIMITS_NAME_MAX
