# Included by _ring.pyx: the default ("pickle") serializer's message format.
#
# Every message starts with one tag byte saying how the rest is encoded.
# Integers in the format are little-endian on every host.
#
#   0x01 bytes       the rest of the message is the bytes
#   0x02 str         the rest is its UTF-8 (strict; a str with lone
#                    surrogates is pickled instead)
#   0x03 bytearray   the rest is the bytes
#   0x04 int         8 bytes, two's complement (only -2**63 <= n < 2**63)
#   0x05 float       8 bytes: the IEEE-754 binary64 bit pattern, so -0.0,
#                    infinities and NaN payloads come back bit for bit
#   0x06 True   0x07 False   0x08 None      nothing follows
#   0x09 tuple  0x0A list    u32 item count, then each item as its tag and
#                    payload, where bytes, str and bytearray put a u32
#                    length before their bytes; items are scalars only
#   0x80 pickle      the whole message is a protocol-5 pickle: its first
#                    byte, the PROTO opcode, is the tag itself, so messages
#                    put by earlier versions (plain pickles) still decode
#
# Only exact types take the short forms: a subclass of str, int, tuple...,
# an int beyond 64 bits and a container holding a container (nested or
# recursive) are pickled, so every value comes back with its exact type and
# value.  Scalars shared inside a container come back equal, not identical
# (they are immutable, so only `is` can tell).  Any other first byte is an
# unknown tag: RingError naming it.

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_CheckExact
from cpython.bytearray cimport PyByteArray_FromStringAndSize, PyByteArray_GET_SIZE
from cpython.exc cimport PyErr_Clear
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact, PyFloat_FromDouble
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_CheckExact, PyLong_FromLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DecodeUTF8

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size)
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1
    bint PyTuple_CheckExact(object o)
    bint PyList_CheckExact(object o)

cdef enum:
    T_BYTES = 0x01
    T_STR = 0x02
    T_BYTEARRAY = 0x03
    T_INT = 0x04
    T_FLOAT = 0x05
    T_TRUE = 0x06
    T_FALSE = 0x07
    T_NONE = 0x08
    T_TUPLE = 0x09
    T_LIST = 0x0A
    T_PICKLE = 0x80

cdef enum:
    # Messages up to this size are encoded on the C stack (no allocation).
    STACK_BYTES = 512


cdef inline void _put_u32(unsigned char *d, uint64_t v) noexcept:
    d[0] = v & 0xFF
    d[1] = (v >> 8) & 0xFF
    d[2] = (v >> 16) & 0xFF
    d[3] = (v >> 24) & 0xFF


cdef inline void _put_u64(unsigned char *d, uint64_t v) noexcept:
    _put_u32(d, v & 0xFFFFFFFF)
    _put_u32(d + 4, v >> 32)


cdef inline uint64_t _get_u32(const unsigned char *s) noexcept:
    return <uint64_t>s[0] | (<uint64_t>s[1] << 8) | (<uint64_t>s[2] << 16) | (<uint64_t>s[3] << 24)


cdef inline uint64_t _get_u64(const unsigned char *s) noexcept:
    return _get_u32(s) | (_get_u32(s + 4) << 32)


cdef Py_ssize_t _scalar_size(object o, bint inner):
    """Encoded size of a scalar (with its tag; inner: with the u32 length of
    bytes/str/bytearray), or -1 if it has no short form.  No error is left
    set on -1."""
    cdef Py_ssize_t n
    cdef int overflow
    if PyBytes_CheckExact(o):
        n = PyBytes_GET_SIZE(o)
    elif PyUnicode_CheckExact(o):
        if PyUnicode_AsUTF8AndSize(o, &n) == NULL:  # lone surrogates
            PyErr_Clear()
            return -1
    elif PyLong_CheckExact(o):
        PyLong_AsLongLongAndOverflow(o, &overflow)
        return 9 if overflow == 0 else -1
    elif PyFloat_CheckExact(o):
        return 9
    elif o is None or o is True or o is False:
        return 1
    elif PyByteArray_CheckExact(o):
        n = PyByteArray_GET_SIZE(o)
    else:
        return -1
    if inner:
        return -1 if n > 0xFFFFFFFF else 5 + n
    return 1 + n


cdef Py_ssize_t _fast_size(object o):
    """Encoded size of o in the short forms, or -1: pickle it."""
    cdef Py_ssize_t i, k, n, total
    cdef object item
    if PyTuple_CheckExact(o):
        n = PyTuple_GET_SIZE(o)
    elif PyList_CheckExact(o):
        n = PyList_GET_SIZE(o)
    else:
        return _scalar_size(o, False)
    if n > 0xFFFFFFFF:
        return -1
    total = 5
    for i in range(n):
        item = <object>(PyTuple_GET_ITEM(o, i) if PyTuple_CheckExact(o) else PyList_GET_ITEM(o, i))
        k = _scalar_size(item, True)
        if k < 0:
            return -1
        total += k
    return total


cdef unsigned char *_write_scalar(object o, unsigned char *d, bint inner) noexcept:
    """Write a scalar that _scalar_size accepted; returns the end."""
    cdef const char *src
    cdef Py_ssize_t n
    cdef int overflow
    cdef double f
    cdef uint64_t bits
    if PyBytes_CheckExact(o):
        d[0] = T_BYTES
        src = PyBytes_AS_STRING(o)
        n = PyBytes_GET_SIZE(o)
    elif PyUnicode_CheckExact(o):
        d[0] = T_STR
        src = PyUnicode_AsUTF8AndSize(o, &n)  # cached by the size pass
    elif PyLong_CheckExact(o):
        d[0] = T_INT
        _put_u64(d + 1, <uint64_t>PyLong_AsLongLongAndOverflow(o, &overflow))
        return d + 9
    elif PyFloat_CheckExact(o):
        d[0] = T_FLOAT
        f = PyFloat_AS_DOUBLE(o)
        memcpy(&bits, &f, 8)
        _put_u64(d + 1, bits)
        return d + 9
    elif o is None:
        d[0] = T_NONE
        return d + 1
    elif o is True:
        d[0] = T_TRUE
        return d + 1
    elif o is False:
        d[0] = T_FALSE
        return d + 1
    else:  # bytearray
        d[0] = T_BYTEARRAY
        src = PyByteArray_AS_STRING(o)
        n = PyByteArray_GET_SIZE(o)
    d += 1
    if inner:
        _put_u32(d, <uint64_t>n)
        d += 4
    memcpy(d, src, <size_t>n)
    return d + n


cdef void _fast_write(object o, unsigned char *d) noexcept:
    """Write o (that _fast_size accepted, with the GIL held since: nothing
    can have changed it) at d."""
    cdef Py_ssize_t i, n
    cdef bint is_tuple = PyTuple_CheckExact(o)
    if not is_tuple and not PyList_CheckExact(o):
        _write_scalar(o, d, False)
        return
    n = PyTuple_GET_SIZE(o) if is_tuple else PyList_GET_SIZE(o)
    d[0] = T_TUPLE if is_tuple else T_LIST
    _put_u32(d + 1, <uint64_t>n)
    d += 5
    for i in range(n):
        d = _write_scalar(
            <object>(PyTuple_GET_ITEM(o, i) if is_tuple else PyList_GET_ITEM(o, i)), d, True
        )


def _encode(obj):
    """The default serializer's message for obj (tests and size models)."""
    cdef Py_ssize_t n = _fast_size(obj)
    if n < 0:
        return _pdumps(obj, PROTOCOL)
    out = PyBytes_FromStringAndSize(NULL, n)
    _fast_write(obj, <unsigned char *>PyBytes_AS_STRING(out))
    return out


# ------------------------------------------------------------ decoding

cdef object _bad(const char *why, int tag):
    raise RingError(f"malformed message (tag 0x{tag:02x}): {why.decode()}")


cdef object _unknown(int tag):
    raise RingError(
        f"unknown message tag 0x{tag:02x}: not written by this version of the "
        "default serializer (a raw put_bytes message, or a queue with another serializer?)"
    )


cdef object _read_scalar(const unsigned char *s, size_t n, size_t *used, bint inner):
    """Decode the scalar at s (n bytes left); *used = bytes it took."""
    cdef int tag
    cdef uint64_t bits, k
    cdef double f
    if n < 1:
        _bad(b"truncated container", 0)
    tag = s[0]
    if tag == T_INT or tag == T_FLOAT:
        if n < 9 or (not inner and n != 9):
            _bad(b"wrong length", tag)
        used[0] = 9
        bits = _get_u64(s + 1)
        if tag == T_INT:
            return PyLong_FromLongLong(<long long>bits)
        memcpy(&f, &bits, 8)
        return PyFloat_FromDouble(f)
    if tag == T_TRUE or tag == T_FALSE or tag == T_NONE:
        if not inner and n != 1:
            _bad(b"wrong length", tag)
        used[0] = 1
        return True if tag == T_TRUE else False if tag == T_FALSE else None
    if tag != T_BYTES and tag != T_STR and tag != T_BYTEARRAY:
        if inner and (tag == T_TUPLE or tag == T_LIST or tag == T_PICKLE):
            _bad(b"container inside a container", tag)
        _unknown(tag)
    if inner:
        if n < 5 or _get_u32(s + 1) > n - 5:
            _bad(b"length beyond the message", tag)
        k = _get_u32(s + 1)
        s += 5
        used[0] = 5 + k
    else:
        k = n - 1
        s += 1
        used[0] = n
    if tag == T_BYTES:
        return PyBytes_FromStringAndSize(<const char *>s, <Py_ssize_t>k)
    if tag == T_STR:
        return PyUnicode_DecodeUTF8(<const char *>s, <Py_ssize_t>k, "strict")
    return PyByteArray_FromStringAndSize(<const char *>s, <Py_ssize_t>k)


cdef object _read_container(const unsigned char *s, size_t n):
    cdef int tag = s[0]
    cdef uint64_t i, count
    cdef size_t at = 5, used = 0
    cdef object out, item
    if n < 5:
        _bad(b"truncated count", tag)
    count = _get_u32(s + 1)
    if count > n - 5:  # every item takes at least one byte
        _bad(b"count beyond the message", tag)
    out = PyTuple_New(<Py_ssize_t>count) if tag == T_TUPLE else PyList_New(<Py_ssize_t>count)
    for i in range(count):
        item = _read_scalar(s + at, n - at, &used, True)
        at += used
        Py_INCREF(item)  # SET_ITEM steals a reference
        if tag == T_TUPLE:
            PyTuple_SET_ITEM(out, <Py_ssize_t>i, item)
        else:
            PyList_SET_ITEM(out, <Py_ssize_t>i, item)
    if at != n:
        _bad(b"bytes after the last item", tag)
    return out


cdef object _fast_load(const char *p, size_t n):
    """Decode one message of the default serializer."""
    cdef const unsigned char *s = <const unsigned char *>p
    cdef size_t used
    cdef object view
    if n == 0:
        raise RingError("empty message: the default serializer writes at least a tag byte")
    if s[0] == T_PICKLE:
        if <Py_ssize_t>n < ZERO_COPY_FROM:
            return _ploads(PyBytes_FromStringAndSize(p, <Py_ssize_t>n))
        view = PyMemoryView_FromMemory(<char *>p, <Py_ssize_t>n, PyBUF_READ)
        try:
            return _ploads(view)
        finally:
            view.release()
    if s[0] == T_TUPLE or s[0] == T_LIST:
        return _read_container(s, n)
    return _read_scalar(s, n, &used, False)


def _decode(data):
    """Decode a message of the default serializer (tests)."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return _fast_load(<const char *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
