# cython: language_level=3, boundscheck=False, wraparound=False, auto_pickle=False
"""Cython binding of the ring core: one handle class and a few functions.

One extension module in four files: _handle.pxi (the handle under Ring:
lifecycle, waits, state, recovery), _codec.pxi (the default serializer's
tagged message format), _limits.pxi (the limits segment's handle) and this
one (Ring's object API, module functions).

Fast paths (a message fits now / one is ready) run with the GIL held and
make no system call; waits release the GIL and come back every SLICE to
let Python run signal handlers (Ctrl-C, SIGTERM handlers that raise).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.ref cimport Py_INCREF
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.unistd cimport getpid

from ringbus._cring cimport *

import atexit
import pickle
import queue
import weakref

from ringbus._serializers import resolve_serializer
from ringbus.errors import MessageTooLarge, RingClosed, RingError

LAYOUT_VERSION = RING_LAYOUT_VERSION
DEFAULT_CAPACITY = RING_DEFAULT_CAPACITY
DEFAULT_SLOT_SIZE = RING_DEFAULT_SLOT_SIZE
DEFAULT_MAX_MESSAGE = RING_DEFAULT_MAX_MESSAGE

cdef object _Full = queue.Full
cdef object _Empty = queue.Empty
cdef object _pdumps = pickle.dumps
cdef object _ploads = pickle.loads
cdef int PROTOCOL = 5
# Wait in slices so signal handlers run even if the signal went to
# another thread; four wakeups a second per waiter cost nothing.
cdef int64_t SLICE_NS = 250000000
# Small messages unpickle faster from a bytes copy; large ones are read in
# place through a memoryview of the shared memory (no intermediate copy).
cdef Py_ssize_t ZERO_COPY_FROM = 4096

cdef extern from "Python.h":
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    int PyBUF_READ

_owned = weakref.WeakSet()
_finalizer_pid = 0


@atexit.register
def _unlink_owned():
    """The creating process owns the name: remove it when the process exits."""
    for r in list(_owned):
        (<_RingHandle>r)._drop_name()



cdef _own(_RingHandle r):
    # multiprocessing children (fork, forkserver) leave through os._exit:
    # atexit does not run there, multiprocessing's own exit finalizers do.
    global _finalizer_pid
    _owned.add(r)
    if _finalizer_pid != getpid():
        _finalizer_pid = getpid()
        import multiprocessing.util
        multiprocessing.util.Finalize(None, _unlink_owned, exitpriority=0)


cdef bytes _as_name(str name):
    # a NUL would silently cut the name short at the C boundary
    cdef bytes b = name.encode("ascii", "strict") if name.isascii() and "\0" not in name else None
    if b is None:
        raise ValueError(
            f"invalid ring name {name!r}: only ASCII letters, digits, '.', '_' and '-'"
        )
    return b


def normalize_name(name):
    """Validate a shared-memory name and return it with its leading '/'."""
    cdef char err[256]
    if not isinstance(name, str):
        raise TypeError(f"ring name must be str, not {type(name).__name__}")
    cdef bytes b = _as_name(name)
    if ring_validate_name(b, err) != RING_OK:
        raise ValueError(err.decode("utf-8", "replace"))
    return name if name.startswith("/") else "/" + name


def unlink(name):
    """Remove a ring's name (existing mappings stay valid)."""
    cdef char err[256]
    cdef bytes b = _as_name(normalize_name(name))
    if ring_unlink(b, err) != RING_OK:
        raise RingError(err.decode("utf-8", "replace"))


cdef dict _stats_dict(ring_stats_t *s):
    return {
        "capacity": s.capacity, "limit": s.limit, "slot_size": s.slot_size,
        "max_message_size": s.max_message_size, "layout_version": s.layout_version,
        "creator_uid": s.creator_uid, "creator_pid": s.creator_pid,
        "segment_size": s.segment_size, "created_unix_ns": s.created_unix_ns,
        "head": s.head, "tail": s.tail, "puts": s.puts, "gets": s.gets,
        "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
        "waits_full": s.waits_full, "waits_empty": s.waits_empty,
        "abandoned": s.abandoned, "recovered": s.recovered, "unfinished": s.unfinished,
        "depth": s.puts - s.gets if s.puts > s.gets else 0,
        "persistent": bool(s.flags & 1),
    }


cdef list _participants(ring_t *r):
    cdef ring_participant_t parts[64]
    cdef size_t i, n = ring_participants(r, parts, 64)
    return [
        {"pid": parts[i].pid, "tid": parts[i].tid, "alive": bool(parts[i].alive),
         "putting": bool(parts[i].putting), "getting": bool(parts[i].getting)}
        for i in range(n)
    ]


def read_stats(name):
    """Attach to a ring by name (taking no attach entry), snapshot its header
    counters, geometry and attached threads, detach."""
    cdef char err[256]
    cdef ring_t *r = NULL
    cdef ring_stats_t s
    cdef bytes b = _as_name(normalize_name(name))
    if ring_open(b, RING_ATTACH, NULL, &r, err) != RING_OK:
        raise RingError(err.decode("utf-8", "replace"))
    try:
        ring_get_stats(r, &s)
        out = _stats_dict(&s)
        out["participants"] = _participants(r)
        return out
    finally:
        ring_detach(r)


cdef inline int64_t _check_timeout(object block, object timeout) except -2:
    if block and timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return 0


cdef inline int64_t _deadline(object timeout) except -2:
    if timeout is None:
        return RING_FOREVER
    return ring_deadline_after(float(timeout))


include "_codec.pxi"


cdef class _Buffers:
    """Pins the bytes of a list of objects for one ring_put call."""
    cdef ring_iov_t *iov
    cdef Py_buffer *views
    cdef Py_ssize_t n
    cdef Py_ssize_t nviews
    cdef list keep
    cdef unsigned char *arena

    def __cinit__(self):
        self.iov = NULL
        self.arena = NULL
        self.views = NULL
        self.n = 0
        self.nviews = 0

    cdef int fill(self, list items, Py_ssize_t limit, str name) except -1:
        cdef Py_ssize_t i, n = len(items)
        cdef object o
        self.keep = items
        self.iov = <ring_iov_t *>malloc(max(n, 1) * sizeof(ring_iov_t))
        self.views = <Py_buffer *>malloc(max(n, 1) * sizeof(Py_buffer))
        if self.iov == NULL or self.views == NULL:
            raise MemoryError()
        for i in range(n):
            o = items[i]
            if PyBytes_CheckExact(o):
                self.iov[i].base = PyBytes_AS_STRING(o)
                self.iov[i].len = <size_t>PyBytes_GET_SIZE(o)
            else:
                PyObject_GetBuffer(o, &self.views[self.nviews], PyBUF_SIMPLE)
                self.iov[i].base = self.views[self.nviews].buf
                self.iov[i].len = <size_t>self.views[self.nviews].len
                self.nviews += 1
            if <Py_ssize_t>self.iov[i].len > limit:
                raise MessageTooLarge(<Py_ssize_t>self.iov[i].len, limit, name)
        self.n = n
        return 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.nviews):
            PyBuffer_Release(&self.views[i])
        free(self.iov)
        free(self.views)
        free(self.arena)

    cdef int fill_tagged(self, list items, Py_ssize_t limit, str name) except -1:
        """Encode items with the default serializer: short forms into one
        arena, the others pickled.  Sizes, then writes, then pickles: no
        Python code (a __reduce__ could change an item) runs between an
        item's size and its write."""
        cdef Py_ssize_t i, k, n = len(items), total = 0
        cdef unsigned char *d
        cdef list pickles = [None] * n
        self.keep = pickles
        self.iov = <ring_iov_t *>malloc(max(n, 1) * sizeof(ring_iov_t))
        if self.iov == NULL:
            raise MemoryError()
        for i in range(n):
            k = _fast_size(items[i])
            self.iov[i].base = NULL  # NULL: pickled in the third pass
            self.iov[i].len = <size_t>(k if k >= 0 else 0)
            if k > limit:
                raise MessageTooLarge(k, limit, name)
            total += k if k >= 0 else 0
        self.arena = <unsigned char *>malloc(<size_t>max(total, 1))
        if self.arena == NULL:
            raise MemoryError()
        d = self.arena
        for i in range(n):
            if self.iov[i].len:  # a short form (at least its tag byte)
                _fast_write(items[i], d)
                self.iov[i].base = d
                d += self.iov[i].len
        for i in range(n):
            if self.iov[i].base == NULL:
                data = _pdumps(items[i], PROTOCOL)
                pickles[i] = data
                self.iov[i].base = PyBytes_AS_STRING(data)
                self.iov[i].len = <size_t>PyBytes_GET_SIZE(data)
                if PyBytes_GET_SIZE(data) > limit:
                    raise MessageTooLarge(PyBytes_GET_SIZE(data), limit, name)
        self.n = n
        return 0


include "_handle.pxi"
include "_limits.pxi"
include "_records.pxi"
include "_hist.pxi"


cdef class Ring(_RingHandle):
    """A process-local handle on one shared-memory ring (see ringbus.Queue)."""

    cdef object _serializer
    cdef object _dumps
    cdef object _loads
    cdef bint _tagged  # the default serializer: _codec.pxi's tagged format

    def __cinit__(self, *args, **kwargs):
        self._tagged = True

    def _open(self, name, int mode, maxsize, slot_size, max_message_size, serializer):
        # Resolved before the ring exists: a bad serializer must not leave a
        # created ring behind.
        codec = resolve_serializer(serializer)
        self._open_handle(name, mode, maxsize, slot_size, max_message_size)
        self._serializer = serializer
        self._tagged = codec is None
        if codec is not None:
            self._dumps = codec.dumps
            self._loads = codec.loads

    @property
    def serializer(self):
        return self._serializer

    # ------------------------------------------------------------ put

    def put(self, obj, block=True, timeout=None):
        """Put obj; returns once its bytes are in shared memory."""
        cdef ring_iov_t iov
        cdef unsigned char stack[STACK_BYTES]
        cdef unsigned char *buf
        cdef Py_ssize_t n
        _check_timeout(block, timeout)
        if self._tagged:
            n = _fast_size(obj)
            if n >= 0:
                # Encoded straight into a buffer that ring_put copies into the
                # slots: no bytes object, no pickle.
                if n > self._max_msg:
                    raise MessageTooLarge(n, self._max_msg, self._name)
                buf = &stack[0]
                if n > STACK_BYTES:
                    buf = <unsigned char *>PyMem_Malloc(<size_t>n)
                if buf == NULL:
                    raise MemoryError()
                _fast_write(obj, buf)
                iov.base = buf
                iov.len = <size_t>n
                try:
                    self._put_iov(&iov, 1, block, timeout)
                finally:
                    if buf != &stack[0]:
                        PyMem_Free(buf)
                return
            data = _pdumps(obj, PROTOCOL)
        else:
            data = self._dumps(obj)
        if PyBytes_CheckExact(data):
            iov.base = PyBytes_AS_STRING(data)
            iov.len = <size_t>PyBytes_GET_SIZE(data)
            if <Py_ssize_t>iov.len > self._max_msg:
                raise MessageTooLarge(<Py_ssize_t>iov.len, self._max_msg, self._name)
            self._put_iov(&iov, 1, block, timeout)
            return
        self.put_bytes(data, block, timeout)

    def put_nowait(self, obj):
        self.put(obj, False)

    def put_bytes(self, data, block=True, timeout=None):
        """Put raw bytes (any contiguous buffer), bypassing the serializer."""
        cdef ring_iov_t iov
        cdef Py_buffer view
        _check_timeout(block, timeout)
        if PyBytes_CheckExact(data):
            iov.base = PyBytes_AS_STRING(data)
            iov.len = <size_t>PyBytes_GET_SIZE(data)
            if <Py_ssize_t>iov.len > self._max_msg:
                raise MessageTooLarge(<Py_ssize_t>iov.len, self._max_msg, self._name)
            self._put_iov(&iov, 1, block, timeout)
            return
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len > self._max_msg:
                raise MessageTooLarge(view.len, self._max_msg, self._name)
            iov.base = view.buf
            iov.len = <size_t>view.len
            self._put_iov(&iov, 1, block, timeout)
        finally:
            PyBuffer_Release(&view)

    cdef int _put_list(self, list items, object block, object timeout) except -1:
        cdef _Buffers bufs = _Buffers()
        bufs.fill(items, self._max_msg, self._name)
        if bufs.n:
            self._put_iov(bufs.iov, <size_t>bufs.n, block, timeout)
        return 0

    def put_many(self, items, block=True, timeout=None):
        """Serialize every item first (errors leave the queue unchanged), then
        put them in order.  queue.Full carries .done: how many were queued."""
        cdef _Buffers bufs
        _check_timeout(block, timeout)
        if not self._tagged:
            self._put_list([self._dumps(o) for o in items], block, timeout)
            return
        bufs = _Buffers()
        # Always a private copy: pickling an item runs Python code, which
        # must not be able to shrink the list being encoded.
        bufs.fill_tagged(list(items), self._max_msg, self._name)
        if bufs.n:
            self._put_iov(bufs.iov, <size_t>bufs.n, block, timeout)

    def put_bytes_many(self, items, block=True, timeout=None):
        """put_many for raw bytes-like items."""
        _check_timeout(block, timeout)
        self._put_list(items if type(items) is list else list(items), block, timeout)

    # ------------------------------------------------------------ get

    cdef inline object _load(self, const char *p, size_t n):
        if self._tagged:
            return _fast_load(p, n)
        return self._loads(PyBytes_FromStringAndSize(p, <Py_ssize_t>n))

    def get(self, block=True, timeout=None):
        """Remove and return the next object."""
        cdef ring_batch_t b
        cdef const void *p
        cdef size_t n
        _check_timeout(block, timeout)
        self._claim(&b, 1, block, timeout)
        try:
            self._next_one(&b, &p, &n)
            return self._load(<const char *>p, n)
        finally:
            ring_release(self._r, &b)

    def get_nowait(self):
        return self.get(False)

    def get_bytes(self, block=True, timeout=None):
        """Remove and return the next message's raw bytes."""
        cdef ring_batch_t b
        cdef const void *p
        cdef size_t n
        _check_timeout(block, timeout)
        self._claim(&b, 1, block, timeout)
        try:
            self._next_one(&b, &p, &n)
            return PyBytes_FromStringAndSize(<const char *>p, <Py_ssize_t>n)
        finally:
            ring_release(self._r, &b)

    def get_bytes_recorded(self, record, Py_ssize_t len_at, Py_ssize_t data_at,
                           block=True, timeout=None):
        """get_bytes that also copies the message into ``record`` (a writable
        buffer, e.g. a worker's in-flight record in shared memory) *before*
        its slots are freed: the u32 length at ``len_at`` (little-endian, 0
        when the message does not fit) and the bytes at ``data_at``.

        A process killed at any point leaves the message either still claimed
        in the ring (recovery requeues it) or in the record (its supervisor
        redelivers it), never in neither.
        """
        cdef ring_batch_t b
        cdef const void *p
        cdef size_t n
        cdef Py_buffer view
        cdef unsigned char *dst
        cdef size_t stored
        _check_timeout(block, timeout)
        PyObject_GetBuffer(record, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if len_at < 0 or data_at < 0 or len_at + 4 > view.len or data_at > view.len:
                raise ValueError("record offsets out of range")
            dst = <unsigned char *>view.buf
            self._claim(&b, 1, block, timeout)
            try:
                self._next_one(&b, &p, &n)
                out = PyBytes_FromStringAndSize(<const char *>p, <Py_ssize_t>n)
                stored = n if n <= <size_t>(view.len - data_at) and n <= 0xFFFFFFFFu else 0
                if stored:
                    memcpy(dst + data_at, p, n)
                # Plain stores are enough: the release below is a release
                # store in the C core, so they are visible before the slots
                # can be reused; a reader only looks after this process died.
                dst[len_at] = stored & 0xFF
                dst[len_at + 1] = (stored >> 8) & 0xFF
                dst[len_at + 2] = (stored >> 16) & 0xFF
                dst[len_at + 3] = (stored >> 24) & 0xFF
                return out
            finally:
                ring_release(self._r, &b)
        finally:
            PyBuffer_Release(&view)

    def get_many(self, max_items, block=True, timeout=None):
        """Wait for at least one object, return up to max_items in order.

        If an item fails to deserialize, the others are still decoded; the
        first error is raised with .items holding the decoded ones.
        """
        cdef ring_batch_t b
        cdef const void *p
        cdef size_t n
        cdef list out = []
        cdef object error = None
        _check_timeout(block, timeout)
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, not {max_items!r}")
        self._claim(&b, <size_t>max_items, block, timeout)
        try:
            while self._next(&b, &p, &n):
                try:
                    out.append(self._load(<const char *>p, n))
                except Exception as exc:
                    if error is None:
                        error = exc
        finally:
            ring_release(self._r, &b)
        if error is not None:
            error.items = out
            raise error
        return out

    def get_bytes_many(self, max_items, block=True, timeout=None):
        """get_many for raw bytes."""
        cdef ring_batch_t b
        cdef const void *p
        cdef size_t n
        cdef list out
        _check_timeout(block, timeout)
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, not {max_items!r}")
        cdef Py_ssize_t i = 0
        cdef object item
        self._claim(&b, <size_t>max_items, block, timeout)
        try:
            # Filled in place (the C-level SET_ITEM, a typed index): the
            # generic list store cost more than the copy of a 64 B message.
            out = PyList_New(<Py_ssize_t>b.count)
            while self._next(&b, &p, &n):
                item = PyBytes_FromStringAndSize(<const char *>p, <Py_ssize_t>n)
                Py_INCREF(item)  # SET_ITEM steals a reference
                PyList_SET_ITEM(out, i, item)
                i += 1
        finally:
            ring_release(self._r, &b)
        if i != <Py_ssize_t>b.count:  # never expected: do not hand out NULL items
            del out[i:]
        return out
