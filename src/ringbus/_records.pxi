# Included by _ring.pyx: the hot steps on the records of a task table
# (csrc/task_records.h; the file itself: ringbus/transport/shm_results.py).

cdef class TaskRecords:
    """The records of a mapped task table: ``base`` is where record 0 starts,
    ``slots`` records of ``record_size`` bytes.  A task's id names its slot
    (bytes 12..15, little-endian).  Holds the map's buffer until ``release()``
    (an ``mmap`` with an exported buffer cannot be closed)."""

    cdef Py_buffer _buf
    cdef bint _held
    cdef char *_base
    cdef readonly Py_ssize_t slots
    cdef readonly Py_ssize_t record_size
    # The block this process fills (ShmTaskTable claims it): slots
    # [_first, _first + _count), the next one to look at, and new ids.
    cdef Py_ssize_t _first, _count, _cursor
    cdef bint _evict
    cdef unsigned char _id[16]  # nonce (8), sequence (u32), slot (u32)
    cdef uint64_t _seq
    cdef public uint64_t evicted  # records taken before their keep time (stats)

    def __init__(self, object mm, Py_ssize_t base, Py_ssize_t slots, Py_ssize_t record_size):
        if self._held:
            raise RingError("TaskRecords already bound")
        if record_size < TASK_RECORD_RESULT_OFFSET or record_size % 8 or base % 8 or slots < 0:
            raise ValueError(f"bad task table geometry: base {base}, record size {record_size}")
        PyObject_GetBuffer(mm, &self._buf, PyBUF_WRITABLE)
        self._held = True
        if base + slots * record_size > self._buf.len:
            self.release()
            raise ValueError(f"{slots} records of {record_size} bytes do not fit the map")
        self._base = <char *>self._buf.buf + base
        self.slots = slots
        self.record_size = record_size

    def __dealloc__(self):
        if self._held:
            PyBuffer_Release(&self._buf)

    def release(self):
        """Let go of the map (before it is closed)."""
        if self._held:
            PyBuffer_Release(&self._buf)
            self._held = False
            self._base = NULL

    cdef inline Py_ssize_t _off(self, bytes gid) except -2:
        """Where ``gid``'s record starts, from ``base``; -1: no slot here."""
        if not self._held:
            raise RingError("task table records released")
        if PyBytes_GET_SIZE(gid) != 16:
            raise ValueError("a task id is 16 bytes")
        cdef const unsigned char *g = <const unsigned char *>PyBytes_AS_STRING(gid)
        cdef uint32_t slot = (g[12] | (<uint32_t>g[13] << 8) | (<uint32_t>g[14] << 16)
                              | (<uint32_t>g[15] << 24))
        if slot >= self.slots:  # NO_SLOT: a task of a transport without a table
            return -1
        return <Py_ssize_t>slot * self.record_size

    def use_block(self, Py_ssize_t first, Py_ssize_t count, bint evict, bytes nonce):
        """Fill records of slots [first, first + count) from now on; ``evict``:
        kept results may be replaced before their time.  ``nonce``: 8 random
        bytes that start the ids given from here (a fresh one per block)."""
        if first < 0 or count < 0 or first + count > self.slots or len(nonce) != 8:
            raise ValueError(f"bad block: slots {first}+{count} of {self.slots}")
        self._first, self._count, self._cursor, self._evict = first, count, 0, evict
        memcpy(self._id, PyBytes_AS_STRING(nonce), 8)
        self._seq = 0

    def add(self, int state, uint32_t dispatcher_pid, uint64_t counter, double now):
        """A new task's record in the block in use: its 16-byte id, or None
        when the block has no usable record left (claim another)."""
        cdef char *r
        cdef Py_ssize_t slot
        cdef bint early
        if not self._held:
            raise RingError("task table records released")
        while self._cursor < self._count:
            slot = self._first + self._cursor
            self._cursor += 1
            r = self._base + slot * self.record_size
            if task_record_usable(r, now, 0):
                early = False
            elif self._evict and task_record_usable(r, now, 1):
                early = True
            else:
                continue
            self._seq += 1
            self._id[8] = self._seq & 0xFF
            self._id[9] = (self._seq >> 8) & 0xFF
            self._id[10] = (self._seq >> 16) & 0xFF
            self._id[11] = (self._seq >> 24) & 0xFF
            self._id[12] = slot & 0xFF
            self._id[13] = (slot >> 8) & 0xFF
            self._id[14] = (slot >> 16) & 0xFF
            self._id[15] = (slot >> 24) & 0xFF
            task_record_fill(r, self._id, <uint8_t>state, dispatcher_pid, counter, now)
            if early:
                self.evicted += 1
            return PyBytes_FromStringAndSize(<char *>self._id, 16)
        return None

    def any_usable(self, Py_ssize_t first, Py_ssize_t count, double now, bint evict):
        """Whether a record of slots [first, first + count) can take a new
        task: a block's scan when a dispatcher claims one (in Python it was
        256 reads per block passed over)."""
        cdef Py_ssize_t i
        if not self._held:
            raise RingError("task table records released")
        if first < 0 or count < 0 or first + count > self.slots:
            raise ValueError(f"slots {first}..{first + count} outside the table")
        for i in range(first, first + count):
            if task_record_usable(self._base + i * self.record_size, now, evict):
                return True
        return False

    def begin(self, bytes gid, int attempt, uint32_t worker_pid, double now):
        """A worker starts the task: the record's offset (>= 0, for
        ``cancel_flag``) to run it, -1 not tracked here (run it), -2 it was
        cancelled (do not run it)."""
        cdef Py_ssize_t off = self._off(gid)
        if off < 0:
            return -1
        cdef int rc = task_record_begin(self._base + off, <const uint8_t *>PyBytes_AS_STRING(gid),
                                        <uint16_t>min(attempt, 0xFFFF), worker_pid, now)
        if rc == TASK_RECORD_NOT_MINE:
            return -1
        return off if rc else -2

    def finish(self, bytes gid, int state, double now, double keep, object result):
        """0, or -1 when the record is not ``gid``'s."""
        cdef Py_ssize_t off = self._off(gid)
        cdef const uint8_t *res = NULL
        cdef Py_ssize_t n = 0
        if off < 0:
            return -1
        if result is not None:
            res = <const uint8_t *>PyBytes_AS_STRING(result)
            n = PyBytes_GET_SIZE(result)
        return task_record_finish(self._base + off, <const uint8_t *>PyBytes_AS_STRING(gid), <uint8_t>state,
                                  now, keep, res, <uint32_t>min(n, 0xFFFFFFFE),
                                  <uint32_t>(self.record_size - TASK_RECORD_RESULT_OFFSET))

    def cancel(self, bytes gid, int flag, double now, double hold):
        """The state before (-1: not ``gid``'s record)."""
        cdef Py_ssize_t off = self._off(gid)
        if off < 0:
            return -1
        return task_record_cancel(self._base + off, <const uint8_t *>PyBytes_AS_STRING(gid), <uint8_t>flag,
                                  now, hold)

    def cancel_flag(self, Py_ssize_t offset):
        """The cancel flag of the record at ``offset`` (``begin``'s answer)."""
        if not self._held or offset < 0 or offset > (self.slots - 1) * self.record_size:
            return 0
        return task_record_cancel_flag(self._base + offset)
