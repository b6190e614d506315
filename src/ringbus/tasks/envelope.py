"""Task envelopes and results: a packed binary header in front of a payload.

The header is a precompiled ``struct.Struct`` so that wrapping a task costs
one ``pack`` and one concatenation (no pickled dict of metadata).  Task
layer exceptions live here too: both the dispatching side (bus) and the
worker side (server) need them.  This module knows the header bytes;
``serializers.py`` the payload formats, ``signing.py`` the tags, and
``codec.py`` puts the three together for a bus.  All integers little-endian.

Task message::

    offset  size  field
    0       1     magic/version (0xB4; 0xB3 was the layout without field 50,
                  0xB1 the one without fields 34 and 50)
    1       1     flags: bit 0 FLAG_REPLY (the dispatcher waits for a result)
                         bit 1 FLAG_SIGNED (a 32-byte tag ends the message)
                         bits 2-3 serializer (0 pickle, 1 msgpack, 2 JSON)
                         bit 4 FLAG_ROUTED (a route trailer ends the payload)
                         bit 5 FLAG_HEADERS (a headers trailer follows the payload)
    2       2     attempt        (1 for the first delivery, + 1 per retry or redelivery)
    4       4     dispatcher pid (liveness check before blocking on its reply ring)
    8       8     task id        (per-dispatcher counter: matches results to futures)
    16      8     deadline       (time.monotonic(), system-wide on Linux; 0.0 = none)
    24      8     wall deadline  (time.time() for transports that span machines; 0.0 = none)
    32      2     reply address length n
    34      16    global task id (``bus.status(id)``; see ringbus/_ids.py; zeros = none)
    50      8     enqueued at (time.time() when queued, or when it became due:
                  a delay's end, a retry's; 0.0 = not known): queue-wait metrics
    58      n     reply address (transport-specific bytes, e.g. a ring name)
    58+n    ...   task payload: a pickle (protocol 5), or for msgpack/JSON
                  u8 type-name length, type name, document (serializers.py)
    -32     32    signed only: keyed BLAKE2b-256 of bytes 0-1, 4-49 and 58..end-32
                  (the attempt and enqueued-at fields are left out: retries
                  and delays rewrite them; an 0xB3 tag covers 0-1 and 4..end-32)

With FLAG_ROUTED the task is not on the default queue at priority 0: a
route trailer ends the payload (before the tag; the tag covers it), so
whoever queues the envelope again (a supervisor after a worker death, the
leader when a delay ends, a retry, ``dead-letters --retry``) puts it back
on its own channel without knowing the task's type.  Tasks on the default
queue at priority 0 keep the bytes above::

    q     queue name (ASCII)
    1     q
    1     priority (0..9)
    1     ROUTE_MAGIC (0xB7)

With FLAG_HEADERS a headers trailer (``with_headers``: middleware's small
str -> str map) follows the payload, before the route trailer and the tag
(the tag covers it; retries, redelivery, delays and ``dead-letters
--retry`` keep it, as they keep the route).  Tasks without headers keep
the bytes above::

    L     entries, each: u8 key length k, key (UTF-8), u16 value length v, value (UTF-8)
    2     L (u16)
    1     HEADERS_MAGIC (0xB8)

Result message::

    0       1     magic/version (0xB2)
    1       1     bits 0-3 status (OK, ERROR, FAILED, TIMEOUT, LOST, WAKE, CANCELLED)
                  bit 4 signed, bits 5-6 serializer (as in a task's flags)
    2       8     task id
    10      ...   OK: the value; ERROR: pickled (exception, traceback text), or
                  a msgpack/JSON map {type, message, traceback};
                  FAILED/TIMEOUT/LOST: UTF-8 text
    -32     32    signed only: keyed BLAKE2b-256 of every byte before it

Unsigned pickle messages have flag bits 1-3 (results: bits 4-6) clear.
Envelopes of the 0xB3 layout (no enqueued-at) and of the 0xB1 layout (no
global id either) are still read by ``decode_task_header`` (dead letters,
delayed tasks of earlier versions, producers in other languages); a worker
upgrades them with ``from_legacy`` (their queue wait is not known).
"""

from __future__ import annotations

import pickle
import struct
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ringbus.errors import (
    EnvelopeError,
    HeaderError,
    RemoteTraceback,
    TaskFailed,
    TaskTimeout,
    WorkerLost,
)

__all__ = [
    "FLAG_REPLY",
    "FLAG_SIGNED",
    "LOST",
    "EnvelopeError",
    "TaskHeader",
]

TASK_MAGIC = 0xB4
_V3_TASK_MAGIC = 0xB3  # before the enqueued-at field: still read
_OLD_TASK_MAGIC = 0xB1  # before the global id: still read (dead letters, timers)
RESULT_MAGIC = 0xB2
FLAG_REPLY = 0x01
FLAG_SIGNED = 0x02
SER_SHIFT = 2
SER_MASK = 0x0C
RESULT_STATUS_MASK = 0x0F
RESULT_SIGNED = 0x10
RESULT_SER_SHIFT = 5
RESULT_SER_MASK = 0x60
TAG_SIZE = 32
FLAG_ROUTED = 0x10
ROUTE_MAGIC = 0xB7
FLAG_HEADERS = 0x20
HEADERS_MAGIC = 0xB8
MAX_HEADER_BYTES = 4096
"""Largest headers trailer (entries, length and magic) an envelope may carry."""
DEFAULT_ROUTE = ("default", 0)

OK, ERROR, FAILED, TIMEOUT, LOST, WAKE, CANCELLED = range(7)
STATUS_NAMES = ("ok", "error", "failed", "timeout", "lost", "wake", "cancelled")

TASK_HEADER = struct.Struct("<BBHIQddH16sd")
_V3_TASK_HEADER = struct.Struct("<BBHIQddH16s")
_OLD_TASK_HEADER = struct.Struct("<BBHIQddH")
GID_OFFSET = 34
"""Byte offset of the 16-byte global task id in a task envelope."""
ENQUEUED_OFFSET = 50
"""Byte offset of the f64 enqueued-at field (Unix seconds) in a task envelope."""
_F64 = struct.Struct("<d")
NO_ID = bytes(16)
RESULT_HEADER = struct.Struct("<BBQ")
TASK_HEADER_SIZE = TASK_HEADER.size
RESULT_HEADER_SIZE = RESULT_HEADER.size

_pack_task = TASK_HEADER.pack
_unpack_task = TASK_HEADER.unpack_from
_pack_result = RESULT_HEADER.pack
_unpack_result = RESULT_HEADER.unpack_from
_dumps = pickle.dumps
_loads = pickle.loads
_time = time.time
# Below this size a bytes slice (one small copy) is cheaper than a memoryview.
_VIEW_FROM = 4096


# ---------------------------------------------------------------- tasks


class TaskHeader(NamedTuple):
    magic: int
    flags: int
    attempt: int
    pid: int
    task_id: int
    deadline: float
    wall_deadline: float
    reply_len: int
    gid: bytes = NO_ID
    enqueued: float = 0.0
    """When it was queued or became due (Unix seconds; 0.0: not known)."""


def encode_task(
    payload: bytes,
    task_id: int,
    flags: int,
    pid: int,
    reply: bytes,
    deadline: float = 0.0,
    wall_deadline: float = 0.0,
    attempt: int = 1,
    gid: bytes = NO_ID,
    enqueued: float | None = None,
) -> bytes:
    """Header + reply address + already pickled task (``enqueued``: now
    unless given)."""
    if enqueued is None:
        enqueued = _time()
    return (
        _pack_task(
            TASK_MAGIC,
            flags,
            attempt,
            pid,
            task_id,
            deadline,
            wall_deadline,
            len(reply),
            gid,
            enqueued,
        )
        + reply
        + payload
    )


ATTEMPT_OFFSET = 2
"""Byte offset of the u16 attempt field in a task envelope."""
_ATTEMPT = struct.Struct("<H")


def with_attempt(data: bytes, attempt: int) -> bytes:
    """The envelope with its attempt field set (redelivery, retries)."""
    return data[:ATTEMPT_OFFSET] + _ATTEMPT.pack(min(attempt, 0xFFFF)) + data[ATTEMPT_OFFSET + 2 :]


def with_enqueued(data: bytes, when: float) -> bytes:
    """The envelope with its enqueued-at field set to ``when`` (Unix
    seconds): a delayed task or a retry is due then, and its queue wait
    counts from then.  Envelopes of earlier layouts come back unchanged.
    The field is not covered by a signed envelope's tag."""
    if len(data) < TASK_HEADER_SIZE or data[0] != TASK_MAGIC:
        return data
    return data[:ENQUEUED_OFFSET] + _F64.pack(when) + data[ENQUEUED_OFFSET + 8 :]


def set_attempt(buf: Any, offset: int, attempt: int) -> None:
    """Set the attempt field of the envelope at ``buf[offset:]`` in place."""
    _ATTEMPT.pack_into(buf, offset + ATTEMPT_OFFSET, min(attempt, 0xFFFF))


def route(
    data: bytes, queue: str, priority: int, tag_task: Callable[[bytes], bytes] | None = None
) -> bytes:
    """The envelope with a route trailer for (``queue``, ``priority``); a
    signed one is signed again with ``tag_task`` (its flags change)."""
    signed = data[1] & FLAG_SIGNED
    if signed and tag_task is None:
        raise EnvelopeError("routing a signed envelope needs the bus's secret")
    body = data[:-TAG_SIZE] if signed else data
    q = queue.encode("ascii")
    flags = bytes((body[1] | FLAG_ROUTED,))
    out = b"".join((body[:1], flags, body[2:], q, bytes((len(q), priority, ROUTE_MAGIC))))
    return out + tag_task(out) if signed and tag_task is not None else out


def route_end(data: bytes, end: int) -> int:
    """Where the payload of a routed envelope ends, given where the route
    trailer ends (``len(data)``, or less its tag)."""
    if end >= 3 and data[end - 1] == ROUTE_MAGIC:
        return max(0, end - 3 - data[end - 3])
    return end


def route_of(data: bytes) -> tuple[str, int]:
    """(queue, priority) of an envelope (see FLAG_ROUTED)."""
    if len(data) < TASK_HEADER_SIZE + 3 or not data[1] & FLAG_ROUTED:
        return DEFAULT_ROUTE
    end = len(data) - (TAG_SIZE if data[1] & FLAG_SIGNED else 0)
    if end < 3 or data[end - 1] != ROUTE_MAGIC:
        return DEFAULT_ROUTE
    n = data[end - 3]
    try:
        return bytes(data[end - 3 - n : end - 3]).decode("ascii"), min(int(data[end - 2]), 9)
    except UnicodeDecodeError:
        return DEFAULT_ROUTE


_HLEN = struct.Struct("<H")


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """The headers trailer of ``headers`` (see FLAG_HEADERS); ``HeaderError``
    names what cannot travel (not str -> str, or over ``MAX_HEADER_BYTES``)."""
    parts: list[bytes] = []
    size = 3
    for k, v in headers.items():
        if not isinstance(k, str) or not k:
            raise HeaderError(f"header names must be non-empty strings, not {k!r}")
        if not isinstance(v, str):
            raise HeaderError(f"header {k!r}: values must be strings, not {type(v).__name__}")
        kb, vb = k.encode("utf-8"), v.encode("utf-8")
        if len(kb) > 255:
            raise HeaderError(f"header name {k[:32]!r}... is {len(kb)} bytes (UTF-8), over 255")
        size += 3 + len(kb) + len(vb)
        if size > MAX_HEADER_BYTES:
            raise HeaderError(
                f"the task's headers take more than {MAX_HEADER_BYTES} bytes in the envelope "
                f"(the limit, envelope.MAX_HEADER_BYTES; header {k!r} has {len(vb)} bytes): "
                "headers are for small strings such as trace ids"
            )
        parts += (bytes((len(kb),)), kb, _HLEN.pack(len(vb)), vb)
    body = b"".join(parts)
    return body + _HLEN.pack(len(body)) + bytes((HEADERS_MAGIC,))


def with_headers(
    data: bytes, trailer: bytes, tag_task: Callable[[bytes], bytes] | None = None
) -> bytes:
    """The envelope with a headers trailer (from ``encode_headers``), added
    before any route; a signed one is signed again with ``tag_task``."""
    flags = data[1]
    if flags & (FLAG_HEADERS | FLAG_ROUTED):
        raise EnvelopeError("headers go on an envelope once, before its route trailer")
    signed = flags & FLAG_SIGNED
    if signed and tag_task is None:
        raise EnvelopeError("adding headers to a signed envelope needs the bus's secret")
    body = data[:-TAG_SIZE] if signed else data
    out = b"".join((body[:1], bytes((flags | FLAG_HEADERS,)), body[2:], trailer))
    return out + tag_task(out) if signed and tag_task is not None else out


def headers_end(data: bytes, end: int) -> int:
    """Where the payload ends, given where the headers trailer ends."""
    if end >= 3 and data[end - 1] == HEADERS_MAGIC:
        return max(0, end - 3 - _HLEN.unpack_from(data, end - 3)[0])
    return end


def headers_of(data: bytes) -> dict[str, str]:
    """The headers of an envelope ({} without FLAG_HEADERS); ``EnvelopeError``
    for a trailer that does not parse."""
    if len(data) < TASK_HEADER_SIZE or not data[1] & FLAG_HEADERS:
        return {}
    end = len(data) - (TAG_SIZE if data[1] & FLAG_SIGNED else 0)
    if data[1] & FLAG_ROUTED:
        end = route_end(data, end)
    if end < 3 or data[end - 1] != HEADERS_MAGIC:
        raise EnvelopeError("FLAG_HEADERS is set but no headers trailer ends the payload")
    stop = end - 3
    at = stop - _HLEN.unpack_from(data, stop)[0]
    if at < TASK_HEADER_SIZE:
        raise EnvelopeError("malformed headers trailer: its length runs past the payload")
    out: dict[str, str] = {}
    try:
        while at < stop:
            k = data[at]
            key = bytes(data[at + 1 : at + 1 + k]).decode("utf-8")
            at += 1 + k
            v = _HLEN.unpack_from(data, at)[0]
            out[key] = bytes(data[at + 2 : at + 2 + v]).decode("utf-8")
            at += 2 + v
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"malformed headers trailer: {exc}") from None
    if at != stop:
        raise EnvelopeError("malformed headers trailer: its entries overrun their length")
    return out


def decode_task_header(data: bytes) -> tuple[TaskHeader, bytes, int]:
    """Return (header, reply address, offset of the pickled task)."""
    if len(data) >= TASK_HEADER_SIZE and data[0] == TASK_MAGIC:
        hdr = TaskHeader._make(_unpack_task(data))
        size = TASK_HEADER_SIZE
    elif len(data) >= _V3_TASK_HEADER.size and data[0] == _V3_TASK_MAGIC:
        hdr = TaskHeader(*_V3_TASK_HEADER.unpack_from(data))  # enqueued: 0.0
        size = _V3_TASK_HEADER.size
    elif len(data) >= _OLD_TASK_HEADER.size and data[0] == _OLD_TASK_MAGIC:
        hdr = TaskHeader(*_OLD_TASK_HEADER.unpack_from(data))  # (_make wants every field)
        size = _OLD_TASK_HEADER.size
    else:
        raise EnvelopeError(f"not a ringbus task envelope ({len(data)} bytes)")
    end = size + hdr.reply_len
    if end > len(data):
        raise EnvelopeError("task envelope truncated inside its reply address")
    return hdr, data[size:end], end


LEGACY_TASK_MAGIC = _OLD_TASK_MAGIC
_UNKNOWN_TIME = _F64.pack(0.0)


def from_legacy(data: bytes, signer: Any = None) -> bytes:
    """An envelope of an earlier layout in this one: 0xB3 (no enqueued-at:
    its queue wait is not known) or 0xB1 (no global id either: a zero id,
    it runs untracked), from older versions or producers in other
    languages.  A signed one is upgraded only if its tag verifies, and is
    signed anew; otherwise (or when it is too short) ``data`` comes back
    unchanged, and the worker refuses it as it refuses any malformed
    envelope."""
    if len(data) >= _V3_TASK_HEADER.size and data[0] == _V3_TASK_MAGIC:
        at, insert = _V3_TASK_HEADER.size, _UNKNOWN_TIME
    elif len(data) >= _OLD_TASK_HEADER.size and data[0] == _OLD_TASK_MAGIC:
        at, insert = _OLD_TASK_HEADER.size, NO_ID + _UNKNOWN_TIME
    else:
        return data
    end = len(data)
    signed = data[1] & FLAG_SIGNED
    if signed:
        if signer is None or not signer.verify(data, True):
            return data
        end -= TAG_SIZE
    out = bytes((TASK_MAGIC,)) + bytes(data[1:at]) + insert + bytes(data[at:end])
    return out + signer.tag_task(out) if signed else out


def task_gid(data: bytes) -> bytes:
    """The global task id of an envelope (``NO_ID`` if it has none)."""
    if len(data) >= _V3_TASK_HEADER.size and data[0] in (TASK_MAGIC, _V3_TASK_MAGIC):
        return bytes(data[GID_OFFSET : GID_OFFSET + 16])
    return NO_ID


def requeue_envelope(data: bytes, tag_task: Callable[[bytes], bytes] | None = None) -> bytes:
    """The envelope to queue again for a retry from dead letters: attempt 1, no
    deadline, no reply (the original caller's future has already failed).

    A signed envelope is signed again with ``tag_task`` (the caller checked
    its old tag first: see ``codec.requeue_task``)."""
    hdr, reply, start = decode_task_header(data)
    end = len(data)
    if hdr.flags & FLAG_SIGNED:
        if tag_task is None:
            raise EnvelopeError("a signed envelope needs the bus's secret to be queued again")
        end -= TAG_SIZE
    out = encode_task(
        bytes(memoryview(data)[start:end]),
        hdr.task_id,
        hdr.flags & ~FLAG_REPLY,
        hdr.pid,
        reply,
        0.0,
        0.0,
        1,
        hdr.gid,
    )
    return out + tag_task(out) if tag_task is not None and hdr.flags & FLAG_SIGNED else out


def describe_envelope(data: bytes) -> tuple[str, int]:
    """(task type, attempt) read from an envelope without importing the task's
    module (the pickle's first GLOBAL names the class)."""
    try:
        hdr, _, start = decode_task_header(data)
    except EnvelopeError:
        return "", 0
    if hdr.flags & SER_MASK:  # msgpack/JSON: the type name leads the payload
        if start >= len(data):
            return "", hdr.attempt
        n = data[start]
        name = bytes(data[start + 1 : start + 1 + n]).decode("utf-8", "replace")
        return name.split(" ")[0], hdr.attempt
    return _pickled_class_name(data, start), hdr.attempt


def _pickled_class_name(data: bytes, start: int) -> str:
    import pickletools

    try:
        names: list[str] = []
        for op, arg, _ in pickletools.genops(bytes(data[start : start + 4096])):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                names.append(str(arg))
            elif op.name == "STACK_GLOBAL" and len(names) >= 2:
                return f"{names[-2]}.{names[-1]}"
            elif op.name == "GLOBAL":
                return str(arg).replace(" ", ".")
            if len(names) > 8:
                break
    except Exception:
        pass
    return ""


def load_payload(data: bytes, offset: int, end: int | None = None) -> Any:
    """Unpickle ``data[offset:end]`` (no copy for large ones)."""
    if end is None:
        end = len(data)
    if end - offset < _VIEW_FROM:
        return _loads(data[offset:end])
    with memoryview(data) as view:
        return _loads(view[offset:end])


# ---------------------------------------------------------------- results


def encode_ok(task_id: int, value: Any) -> bytes:
    """A successful result; a value that cannot be pickled becomes FAILED."""
    try:
        return _pack_result(RESULT_MAGIC, OK, task_id) + _dumps(value, 5)
    except Exception as exc:
        return encode_text(
            task_id,
            FAILED,
            f"the task's result of type {type(value).__qualname__} could not be pickled: "
            f"{type(exc).__name__}: {exc}",
        )


def encode_error(task_id: int, exc: BaseException) -> bytes:
    """A handler's exception with its formatted traceback.

    An exception that cannot be pickled travels as text (FAILED).
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        return _pack_result(RESULT_MAGIC, ERROR, task_id) + _dumps((exc, tb), 5)
    except Exception as perr:
        return encode_text(
            task_id,
            FAILED,
            f"{tb}\n(the exception could not be pickled: {type(perr).__name__}: {perr})",
        )


def encode_text(task_id: int, status: int, text: str) -> bytes:
    """FAILED / TIMEOUT / LOST results carry a message only."""
    return _pack_result(RESULT_MAGIC, status, task_id) + text.encode("utf-8", "replace")


WAKE_MESSAGE = _pack_result(RESULT_MAGIC, WAKE, 0)
"""Put by a dispatcher on its own reply channel to wake its reader early."""


def result_header(data: bytes) -> tuple[int, int]:
    """(status, task id) of a result message."""
    if len(data) < RESULT_HEADER_SIZE or data[0] != RESULT_MAGIC:
        raise EnvelopeError(f"not a ringbus result envelope ({len(data)} bytes)")
    _, status, task_id = _unpack_result(data)
    return status, task_id


def decode_result(data: bytes, status: int) -> tuple[bool, Any]:
    """(True, value) or (False, exception) from a result message's body."""
    if status == OK:
        try:
            return True, load_payload(data, RESULT_HEADER_SIZE)
        except Exception as exc:
            return False, TaskFailed(f"the task's result could not be unpickled: {exc!r}")
    if status == ERROR:
        try:
            remote, tb = load_payload(data, RESULT_HEADER_SIZE)
        except Exception as uerr:
            return False, TaskFailed(
                f"the task raised an exception that could not be unpickled here: {uerr!r}"
            )
        if not isinstance(remote, BaseException):
            return False, TaskFailed(f"malformed error result: {remote!r}")
        remote.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
        return False, remote
    text = data[RESULT_HEADER_SIZE:].decode("utf-8", "replace")
    if status == TIMEOUT:
        return False, TaskTimeout(text)
    if status == LOST:
        return False, WorkerLost(text)
    return False, TaskFailed(text)
