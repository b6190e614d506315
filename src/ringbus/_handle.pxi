# Included by _ring.pyx: the handle's lifecycle and its C-level put/claim
# loops, its state, recovery and join.  Ring (in _ring.pyx) adds the object
# API on top; the split is a base class because Cython cannot include a file
# inside a class body, and calls from Ring to these cdef methods go through
# the same vtable slot whether they are declared here or there.


cdef class _RingHandle:
    """The shared-memory handle under Ring: open/close, waits, state."""

    cdef ring_t *_r
    cdef str _name
    cdef int _owner_pid
    cdef bint _name_dropped
    cdef Py_ssize_t _max_msg
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self._r = NULL
        self._owner_pid = 0

    def __dealloc__(self):
        if self._r != NULL:
            self._drop_name()
            ring_detach(self._r)
            self._r = NULL

    cdef int _open_handle(self, name, int mode, maxsize, slot_size, max_message_size) except -1:
        cdef char err[256]
        cdef ring_params_t p
        cdef ring_t *r = NULL
        cdef int rc
        if self._r != NULL:
            raise RuntimeError("ring handle is already open")
        if mode != RING_ATTACH:
            if not isinstance(maxsize, int) or maxsize < 0:
                raise ValueError(f"maxsize must be a non-negative int, not {maxsize!r}")
            if maxsize > RING_MAX_CAPACITY:  # also keeps it from overflowing uint64
                raise ValueError(f"maxsize {maxsize} is too large (at most {RING_MAX_CAPACITY})")
            if not isinstance(slot_size, int) or slot_size <= 0:
                raise ValueError(f"slot_size must be a positive int, not {slot_size!r}")
            if max_message_size is not None and (
                not isinstance(max_message_size, int) or max_message_size <= 0
            ):
                raise ValueError(
                    f"max_message_size must be a positive int, not {max_message_size!r}"
                )
            if slot_size > 0xFFFFFFFF or (max_message_size or 0) > 0xFFFFFFFF:
                raise ValueError("slot_size and max_message_size must be below 4 GiB")
        if name is None:
            if mode != RING_CREATE:
                raise ValueError("a ring name is required to attach")
            name = "/ringbus-" + __import__("uuid").uuid4().hex[:20]
        name = normalize_name(name)
        memset(&p, 0, sizeof(p))
        if mode != RING_ATTACH:
            p.maxsize = maxsize
            p.slot_size = slot_size
            p.max_message_size = max_message_size or 0
        cdef bytes bname = _as_name(name)
        rc = ring_open(bname, mode, &p, &r, err)
        if rc != RING_OK:
            msg = err.decode("utf-8", "replace")
            if rc == RING_EINVAL and mode != RING_ATTACH and "ring" not in msg:
                raise ValueError(msg)
            raise RingError(msg)
        self._r = r
        self._name = name
        self._max_msg = ring_max_message(r)
        if ring_is_owner(r):
            self._owner_pid = getpid()
            _own(self)
        return 0

    cdef int _drop_name(self) except -1:
        # Only the creating process unlinks; forked children inherit the
        # handle but not the ownership.
        cdef char err[256]
        if self._owner_pid and self._owner_pid == getpid() and not self._name_dropped:
            self._name_dropped = True
            ring_unlink(_as_name(self._name), err)
        return 0

    def unlink_name(self):
        """Remove this ring's name.  Once this creating handle removed it
        (here, or by closing), later calls do nothing: they must not remove a
        new ring that someone created under the same name since."""
        if self._name_dropped:
            return
        unlink(self._name)
        if self._owner_pid == getpid():
            self._name_dropped = True

    cdef inline int _ready(self) except -1:
        if self._r == NULL:
            raise ValueError("ring handle is not open")
        if ring_is_closed(self._r):
            raise RingClosed(f"Queue {self._name} is closed")
        return 0

    # ------------------------------------------------------------ errors

    cdef int _fail(self, int rc, bint put, size_t done) except -1:
        cdef object exc
        if rc == RING_FULL or (rc == RING_TIMEOUT and put):
            exc = _Full()
            exc.done = done
            raise exc
        if rc == RING_EMPTY or rc == RING_TIMEOUT:
            raise _Empty()
        if rc == RING_CLOSED:
            raise RingClosed(f"Queue {self._name} is closed")
        if rc == RING_ECORRUPT:
            raise RingError(
                f"ring {self._name} is corrupted: a record header, counter or sequence "
                "word in its shared memory is impossible (recreate the ring)"
            )
        raise RingError(f"ring {self._name}: operation failed (status {rc})")

    # ------------------------------------------------------------ put

    cdef int _put_iov(self, ring_iov_t *iov, size_t n, object block, object timeout) except -1:
        cdef size_t done = 0, total = 0
        cdef int rc
        cdef int64_t deadline, until
        self._ready()
        rc = ring_put(self._r, iov, n, &done, RING_NOWAIT)
        total = done
        if rc == RING_OK:
            return 0
        if rc != RING_FULL or not block:
            self._fail(rc, True, total)
        deadline = _deadline(timeout)
        while True:
            until = ring_now() + SLICE_NS
            if until > deadline:
                until = deadline
            with nogil:
                rc = ring_put(self._r, iov + total, n - total, &done, until)
            total += done
            if rc == RING_OK:
                return 0
            if rc == RING_EINTR or (rc == RING_TIMEOUT and until < deadline):
                PyErr_CheckSignals()
                continue
            self._fail(rc, True, total)

    # ------------------------------------------------------------ get

    cdef int _claim(self, ring_batch_t *b, size_t max_items, object block, object timeout) except -1:
        cdef int rc
        cdef int64_t deadline, until
        self._ready()
        rc = ring_claim(self._r, max_items, b, RING_NOWAIT)
        if rc == RING_OK:
            return 0
        if rc != RING_EMPTY or not block:
            self._fail(rc, False, 0)
        deadline = _deadline(timeout)
        while True:
            until = ring_now() + SLICE_NS
            if until > deadline:
                until = deadline
            with nogil:
                rc = ring_claim(self._r, max_items, b, until)
            if rc == RING_OK:
                return 0
            if rc == RING_EINTR or (rc == RING_TIMEOUT and until < deadline):
                PyErr_CheckSignals()
                continue
            self._fail(rc, False, 0)

    cdef inline int _next(self, ring_batch_t *b, const void **p, size_t *n) except -1:
        """ring_next: 1 (a record) or 0 (end); RingError if the record's
        header became impossible since the claim."""
        cdef int rc = ring_next(self._r, b, p, n)
        if rc < 0:
            self._fail(RING_ECORRUPT, False, 0)
        return rc

    cdef inline int _next_one(self, ring_batch_t *b, const void **p, size_t *n) except -1:
        """The one record a claim of max 1 holds."""
        if self._next(b, p, n) != 1:
            self._fail(RING_ECORRUPT, False, 0)
        return 1

    # ------------------------------------------------------------ state

    def qsize(self):
        """Messages in the queue now (an instantaneous estimate)."""
        self._open_or_raise()
        return ring_qsize(self._r)

    def empty(self):
        self._open_or_raise()
        return ring_qsize(self._r) == 0

    def full(self):
        """True when a one-slot message would not fit now."""
        self._open_or_raise()
        return bool(ring_full(self._r))

    cdef inline int _open_or_raise(self) except -1:
        if self._r == NULL:
            raise ValueError("ring handle is not open")
        return 0

    def stats(self):
        """Header counters and geometry as a dict."""
        cdef ring_stats_t s
        self._open_or_raise()
        ring_get_stats(self._r, &s)
        return _stats_dict(&s)

    def close(self):
        """Close this handle: waiters in this process wake with "is closed".

        The creating process also removes the ring's name.  The mapping is
        released when the handle is garbage-collected.
        """
        if self._r == NULL:
            return
        if not ring_is_closed(self._r):
            ring_close(self._r)
        self._drop_name()

    def set_spin(self, int64_t spin_ns):
        """How long a waiter spins before it sleeps (default 20 µs)."""
        self._open_or_raise()
        ring_set_spin(self._r, spin_ns)

    @property
    def name(self):
        return self._name

    @property
    def maxsize(self):
        self._open_or_raise()
        return ring_limit(self._r)

    @property
    def capacity(self):
        self._open_or_raise()
        return ring_capacity(self._r)

    @property
    def slot_size(self):
        self._open_or_raise()
        return ring_slot_size(self._r)

    @property
    def max_message_size(self):
        self._open_or_raise()
        return ring_max_message(self._r)

    @property
    def closed(self):
        return self._r == NULL or bool(ring_is_closed(self._r))

    @property
    def owner(self):
        return self._owner_pid != 0 and self._owner_pid == getpid()

    # ------------------------------------------------------------ recovery

    def recover(self, requeue=True):
        """Repair the ring after processes that died in the middle of a put or
        a get (kill -9 at any instruction).

        Claims of dead producers become skipped records (counted as
        abandoned); batches held by dead consumers are freed and their
        messages put back into the ring (``requeue=True``) or returned in
        ``"messages"`` for the caller to deliver again.  Waiters run the same
        repair by themselves when they stay stuck on one ticket.
        ``"deferred"``: a thread of the 65th and later, which claims without
        an attach entry, was mid-claim, so nothing was repaired this time.
        """
        cdef ring_recovery_t out
        cdef int rc
        cdef int flags = RING_RECOVER_ALL | (RING_RECOVER_REQUEUE if requeue else 0)
        cdef size_t i
        self._ready()
        with nogil:
            rc = ring_recover(self._r, flags, &out)
        try:
            messages = [
                PyBytes_FromStringAndSize(<const char *>out.iov[i].base, <Py_ssize_t>out.iov[i].len)
                for i in range(out.n)
            ]
            if rc == RING_TIMEOUT:
                raise RingError(f"ring {self._name}: another live process holds the recovery lock")
            if rc != RING_OK:
                self._fail(rc, False, 0)
            return {"abandoned": out.abandoned, "recovered": out.recovered,
                    "reclaimed": out.reclaimed, "deferred": bool(out.deferred),
                    "messages": messages}
        finally:
            ring_recovery_free(&out)

    def participants(self):
        """Threads attached to the ring (from the header): pid, tid, alive,
        and whether each is in the middle of a put or a get."""
        self._open_or_raise()
        return _participants(self._r)

    # ------------------------------------------------------------ join

    def _task_add(self, int64_t n):
        self._open_or_raise()
        ring_task_add(self._r, n)

    def _task_done(self):
        self._ready()
        if ring_task_done(self._r) != RING_OK:
            raise ValueError("task_done() called too many times")

    def _unfinished(self):
        self._open_or_raise()
        return ring_unfinished(self._r)

    def _task_join(self, timeout):
        """True once every task is done; False if the timeout passed first."""
        cdef int rc
        cdef int64_t deadline, until
        _check_timeout(True, timeout)
        self._ready()
        deadline = _deadline(timeout)
        while True:
            until = ring_now() + SLICE_NS
            if until > deadline:
                until = deadline
            with nogil:
                rc = ring_task_join(self._r, until)
            if rc == RING_OK:
                return True
            if rc == RING_EINTR or (rc == RING_TIMEOUT and until < deadline):
                PyErr_CheckSignals()
                continue
            if rc == RING_TIMEOUT:
                return False
            self._fail(rc, False, 0)
