# Included by _ring.pyx: a worker's one step per finished task on its task-time
# histograms (ringbus/server/histograms.py has the layout and the readers).
#
# In C because it runs once per task on the worker's hot path: two vDSO clock
# reads, two bucket searches and four 8-byte stores (no lock, no system call),
# about a fifth of the same steps in Python.

cdef extern from *:
    """
    #include <time.h>
    #include <stdint.h>
    #include <string.h>
    static inline double ringbus_hist_clock(clockid_t id) {
        struct timespec ts;
        clock_gettime(id, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    /* One writer (the slot's worker); readers copy the area and may race it:
       8-byte aligned relaxed atomics, so no reader sees a torn counter. */
    static inline void ringbus_hist_count(char *at) {
        uint64_t *n = (uint64_t *)at;
        __atomic_store_n(n, __atomic_load_n(n, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
    }
    static inline void ringbus_hist_add(char *at, double v) {
        uint64_t bits;
        double sum;
        bits = __atomic_load_n((uint64_t *)at, __ATOMIC_RELAXED);
        memcpy(&sum, &bits, 8);
        sum += v;
        memcpy(&bits, &sum, 8);
        __atomic_store_n((uint64_t *)at, bits, __ATOMIC_RELAXED);
    }
    """
    ctypedef int clockid_t
    int CLOCK_MONOTONIC
    int CLOCK_REALTIME
    double ringbus_hist_clock(clockid_t id) nogil
    void ringbus_hist_count(char *at) nogil
    void ringbus_hist_add(char *at, double v) nogil


cdef enum:
    HIST_MAX_BOUNDS = 64
    HIST_OUTCOMES = 5  # after the two histograms: started, succeeded, failed, retried, dead-lettered


cdef class HistWriter:
    """The histogram area of one pool slot, written by its worker.

    ``observe(started, enqueued, task_type, data)``: ``task_type`` is looked
    up in ``entries`` (task type -> word offset of its run-time buckets); a
    type not there yet is given one by ``add(task_type, data)``, which writes
    its key in the area.  Then one count and the value go to the run-time
    histogram and, when ``enqueued`` is not 0, to the queue-wait one that
    follows it (``len(bounds) + 1`` buckets and a sum each)."""

    cdef Py_buffer _buf
    cdef bint _held
    cdef char *_area
    cdef Py_ssize_t _size
    cdef double _bounds[HIST_MAX_BOUNDS]
    cdef Py_ssize_t _nb  # buckets: the bounds and +Inf
    cdef readonly dict entries
    cdef object _new

    def __init__(self, object mm, Py_ssize_t offset, Py_ssize_t size, tuple bounds, object add):
        if self._held:
            raise RingError("HistWriter already bound")
        if not 0 < len(bounds) < HIST_MAX_BOUNDS or offset < 0 or offset % 8 or size % 8:
            raise ValueError(f"bad histogram area: {len(bounds)} bounds at {offset}, {size} bytes")
        PyObject_GetBuffer(mm, &self._buf, PyBUF_WRITABLE)
        self._held = True
        if offset + size > self._buf.len:
            self.release()
            raise ValueError(f"a histogram area of {size} bytes at {offset} does not fit the map")
        self._area = <char *>self._buf.buf + offset
        self._size = size
        cdef Py_ssize_t i
        for i in range(len(bounds)):
            self._bounds[i] = bounds[i]
        self._nb = len(bounds) + 1
        self.entries = {}
        self._new = add

    def __dealloc__(self):
        if self._held:
            PyBuffer_Release(&self._buf)

    def release(self):
        """Let go of the map (before it is closed)."""
        if self._held:
            PyBuffer_Release(&self._buf)
            self._held = False
            self._area = NULL

    cdef inline Py_ssize_t _bucket(self, double v) noexcept:
        cdef Py_ssize_t i = 0
        while i < self._nb - 1 and self._bounds[i] < v:  # le: the first bound >= v
            i += 1
        return i

    cdef inline char *_entry(self, object task_type, object data) except NULL:
        """The run-time buckets of ``task_type``'s entry (made on first use)."""
        if not self._held:
            raise RingError("histogram area released")
        found = self.entries.get(task_type)
        if found is None:
            found = self._new(task_type, data)
            self.entries[task_type] = found
        cdef Py_ssize_t w = found
        if w < 0 or (w + 2 * (self._nb + 1) + HIST_OUTCOMES) * 8 > self._size:
            raise ValueError(f"histogram entry at word {w} is outside the area")
        return self._area + w * 8

    def count(self, object task_type, object data, int outcome):
        """One more task of ``task_type`` with ``outcome`` (1 succeeded,
        2 failed, 3 retried, 4 dead-lettered; 0 started is ``observe``'s)."""
        if not 0 <= outcome < HIST_OUTCOMES:
            raise ValueError(f"no outcome {outcome}")
        cdef char *at = self._entry(task_type, data)
        ringbus_hist_count(at + (2 * (self._nb + 1) + outcome) * 8)

    def observe(self, double started, double enqueued, object task_type, object data,
                bint succeeded=False):
        """A task whose handler ran is done with: its run time and queue wait,
        one more started (and succeeded) task of its type."""
        cdef char *at = self._entry(task_type, data)
        cdef Py_ssize_t nb = self._nb
        cdef char *outcomes = at + 2 * (nb + 1) * 8
        ringbus_hist_count(outcomes)
        if succeeded:
            ringbus_hist_count(outcomes + 8)
        cdef double run = ringbus_hist_clock(CLOCK_MONOTONIC) - started
        ringbus_hist_count(at + self._bucket(run) * 8)
        ringbus_hist_add(at + nb * 8, run)
        cdef double wait
        if enqueued != 0.0:
            # When it was taken, on the wall clock; another host's clock may
            # be ahead of this one (over a broker): no negative waits.
            wait = ringbus_hist_clock(CLOCK_REALTIME) - run - enqueued
            if wait < 0.0:
                wait = 0.0
            at += (nb + 1) * 8
            ringbus_hist_count(at + self._bucket(wait) * 8)
            ringbus_hist_add(at + nb * 8, wait)
