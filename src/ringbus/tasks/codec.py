"""A bus's codec: tasks and results to envelopes and back, signed or not.

One object per bus (``bus.codec``) decides the serializer, the keys and
what is refused; the dispatching side, the reader and the worker loop call
it for every envelope.  Unsigned pickle (the default on shared memory) goes
through methods with the bytes and the cost of the envelope code before
serializers existed; everything else through the general ones.

Rules:

- with keys, every task and result must carry a tag that verifies; a task's
  tag is checked before anything of it is decoded (``verify_task``), a
  result's before the reader decodes it;
- unsigned pickle is never loaded from a transport that spans hosts unless
  ``allow_unsigned_pickle``: such a bus refuses to dispatch and to serve;
  a msgpack/JSON bus without keys refuses pickled tasks and results;
- a worker answers in the serializer its task came in (a producer in
  another language gets msgpack/JSON back).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

from ringbus.errors import (
    CodecError,
    SignatureError,
    TaskFailed,
    TaskTimeout,
    UnsignedPickleError,
    WorkerLost,
)
from ringbus.tasks import envelope as env
from ringbus.tasks.handlers import HandlerRegistry
from ringbus.tasks.serializers import (
    FORMAT_NAMES,
    FORMATS,
    SER_PICKLE,
    MsgspecFormat,
    PickleFormat,
    make_format,
)
from ringbus.tasks.signing import TAG_SIZE, Secret, Signer, load_secret

__all__ = ["Codec", "requeue_task"]

_pack_task = env.TASK_HEADER.pack
_pack_result = env.RESULT_HEADER.pack
_unpack_result = env.RESULT_HEADER.unpack_from
_TASK_MAGIC = env.TASK_MAGIC
_NO_ID = env.NO_ID  # the global task id field (ringbus/_ids.py)
_GID_AT = env.GID_OFFSET
_RESULT_MAGIC = env.RESULT_MAGIC
_OK, _ERROR = env.OK, env.ERROR
_RHS = env.RESULT_HEADER_SIZE
_SIGNED = env.FLAG_SIGNED
_SER_MASK = env.SER_MASK
_NOT_PLAIN = env.FLAG_SIGNED | env.SER_MASK
# Routed or with headers: the payload ends before its trailers.
_NOT_ROUTED_PLAIN = _NOT_PLAIN | env.FLAG_ROUTED | env.FLAG_HEADERS
_loads = env._loads
_dumps = env._dumps
_time = time.time  # the enqueued-at field of a task envelope

NOT_VERIFIED = (
    "the task's signature did not verify (forged, altered, or signed with another "
    "secret): it was not decoded and not run"
)
UNSIGNED = "an unsigned task reached a bus with a secret: it was not decoded and not run"

Format = PickleFormat | MsgspecFormat
# Messages keep the words of the unsigned pickle path (callers match on them).
_VERB = {k: "pickled" if k == SER_PICKLE else f"encoded as {n}" for k, n in FORMAT_NAMES.items()}


class Codec:
    """Encodes and decodes the envelopes of one bus (see the module docstring).

    ``encode_task``, ``decode_task``, ``encode_ok`` and ``encode_text`` are
    attributes chosen once: unsigned pickle gets the lean versions.
    """

    encode_task: Callable[..., bytes]
    """``(task, tid, flags, pid, reply, deadline=0.0, wall=0.0) -> envelope``."""
    decode_task: Callable[..., Any]
    """``(data, start, flags, verified=False) -> task``; raises ``CodecError``
    (``SignatureError`` for a bad tag) and whatever unpickling raises."""
    encode_ok: Callable[..., bytes]
    """``(tid, value, flags=0) -> result``; FAILED when the value cannot travel."""
    encode_text: Callable[[int, int, str], bytes]
    """``(tid, status, text) -> result`` for FAILED / TIMEOUT / LOST."""
    verify_task: Callable[[bytes, int], str | None] | None
    """None without keys; else ``(data, flags) -> why it is rejected, or None``."""

    def __init__(
        self,
        registry: HandlerRegistry,
        serializer: str = "pickle",
        secret: Secret | None = None,
        *,
        spans_hosts: bool = False,
        allow_unsigned_pickle: bool = False,
        where: str = "",
    ) -> None:
        if serializer not in FORMATS:
            raise ValueError(f"serializer must be one of {sorted(FORMATS)}, not {serializer!r}")
        self.serializer = serializer
        self.kind = FORMATS[serializer]
        keys = load_secret(secret)
        self.signer: Signer | None = Signer(keys) if keys else None
        self.pickle_trusted = not spans_hosts or allow_unsigned_pickle
        self._registry = registry
        self._formats: dict[int, Format] = {}
        self._fmt = self._format(self.kind)  # msgspec missing: fails here, not per task
        self._task_bits = self.kind << env.SER_SHIFT | (_SIGNED if self.signer else 0)
        self._result_bits = self.kind << env.RESULT_SER_SHIFT | (
            env.RESULT_SIGNED if self.signer else 0
        )
        self.refusal: str | None = None
        if self.kind == SER_PICKLE and self.signer is None and not self.pickle_trusted:
            self.refusal = (
                f"{where or 'this bus'} spans hosts with serializer='pickle' and no secret: "
                "anyone who can write to the broker could run code in its workers and "
                "dispatchers (loading a pickle runs code). Set secret= (or RINGBUS_SECRET) "
                "to sign envelopes, or use serializer='msgpack' or 'json', or pass "
                "allow_unsigned_pickle=True for a private broker."
            )
        plain = self.kind == SER_PICKLE and self.signer is None
        # Envelopes in the bus's own serializer take the short paths below.
        self._own_ser = self.kind << env.SER_SHIFT
        self._own_ok = _OK | self._result_bits
        self._tag_len = TAG_SIZE if self.signer else 0
        self._fmt_encode = self._fmt.encode_task
        self._fmt_decode = self._fmt.decode_task
        self._value_encode = self._fmt.encode_value
        self.fast_ok_status = -1
        """Status byte of the OK results the reader may decode at once with
        ``fast_ok_decode`` (unsigned, in a serializer this bus trusts)."""
        self.fast_ok_decode: Callable[[bytes], Any] = _loads
        if self.signer is None and (self.kind != SER_PICKLE or self.pickle_trusted):
            self.fast_ok_status = self._own_ok
            if isinstance(self._fmt, MsgspecFormat):
                self.fast_ok_decode = self._fmt.decode_bytes
        self.encode_task = (
            self._refuse if self.refusal else _encode_plain if plain else self._encode_task
        )
        self.plain_pickle = self.encode_task is _encode_plain
        """Tasks are encoded as ``_encode_plain`` does (the bus may inline it)."""
        if isinstance(self._fmt, MsgspecFormat) and self.signer is None:
            self.encode_task = self._fmt.task_encoder(_TASK_MAGIC, self._task_bits)
        self.decode_task = (
            self._decode_task if self.refusal else self._decode_plain if plain else self._decode_own
        )
        self.encode_ok = self._encode_ok_plain if plain else self._encode_ok_own
        self.encode_text = env.encode_text if self.signer is None else self._encode_text
        self.verify_task = self._verify_task if self.signer else None

    def __repr__(self) -> str:
        return f"<Codec {self.serializer}{' signed' if self.signer else ''}>"

    def check_serving(self) -> None:
        """Raise ``UnsignedPickleError`` if this bus may not serve (or dispatch)."""
        if self.refusal:
            raise UnsignedPickleError(self.refusal)

    def clear(self) -> None:
        """The bus's registry changed: drop cached type names and decoders."""
        for f in self._formats.values():
            if isinstance(f, MsgspecFormat):
                f.clear()

    def _format(self, kind: int) -> Format:
        f = self._formats.get(kind)
        if f is None:
            if kind not in FORMAT_NAMES:
                raise CodecError(f"unknown serializer {kind} in the envelope's flags")
            try:
                f = self._formats[kind] = make_format(kind, self._registry)
            except ImportError as exc:
                raise CodecError(str(exc)) from None
        return f

    # ------------------------------------------------------------ tasks

    def _refuse(self, *args: Any, **kwargs: Any) -> bytes:
        raise UnsignedPickleError(self.refusal)

    def _encode_task(
        self,
        task: Any,
        tid: int,
        flags: int,
        pid: int,
        reply: bytes,
        deadline: float = 0.0,
        wall: float = 0.0,
        gid: bytes = _NO_ID,
    ) -> bytes:
        body = self._fmt_encode(task)
        head = _pack_task(
            _TASK_MAGIC,
            flags | self._task_bits,
            1,
            pid,
            tid,
            deadline,
            wall,
            len(reply),
            gid,
            _time(),  # enqueued at
        )
        data = b"".join((head, reply, body))
        signer = self.signer
        return data if signer is None else data + signer.tag_task(data)

    def with_gid(self, data: bytes, gid: bytes) -> bytes:
        """The task envelope ``data`` with its id field set (``dispatch_many``
        encodes a long list first and gives it ids as it queues it); a signed
        one is signed again."""
        end = len(data) - TAG_SIZE if data[1] & _SIGNED else len(data)
        out = b"".join((data[:_GID_AT], gid, data[_GID_AT + 16 : end]))
        if end == len(data):
            return out
        assert self.signer is not None  # it signed the envelope
        return out + self.signer.tag_task(out)

    def _verify_task(self, data: bytes, flags: int) -> str | None:
        if not flags & _SIGNED:
            return UNSIGNED
        assert self.signer is not None
        return None if self.signer.verify(data, True) else NOT_VERIFIED

    def _decode_plain(self, data: bytes, start: int, flags: int, verified: bool = False) -> Any:
        if flags & _NOT_PLAIN:  # a signed or msgpack task from another producer
            return self._decode_task(data, start, flags, verified)
        if len(data) - start < 4096:
            return _loads(data[start:])
        return env.load_payload(data, start)

    def _decode_own(self, data: bytes, start: int, flags: int, verified: bool = False) -> Any:
        if flags & _NOT_ROUTED_PLAIN == self._task_bits and (verified or self.signer is None):
            return self._fmt_decode(data, start, len(data) - self._tag_len)
        return self._decode_task(data, start, flags, verified)

    def _decode_task(self, data: bytes, start: int, flags: int, verified: bool = False) -> Any:
        end = len(data)
        signer = self.signer
        signed = flags & _SIGNED
        if signed:
            end -= TAG_SIZE
            if end < start:
                raise CodecError("signed task envelope shorter than its tag")
            if signer is not None and not verified and not signer.verify(data, True):
                raise SignatureError(NOT_VERIFIED)
        elif signer is not None:
            raise SignatureError(UNSIGNED)
        if flags & env.FLAG_ROUTED:  # a named queue or a priority (routing.py)
            end = env.route_end(data, end)
        if flags & env.FLAG_HEADERS:  # middleware headers (tasks/middleware.py)
            end = env.headers_end(data, end)
        kind = (flags & _SER_MASK) >> env.SER_SHIFT
        if kind == SER_PICKLE:
            if not (self.pickle_trusted or (signed and signer is not None)):
                raise CodecError(
                    "an unsigned pickled task came over a transport that spans hosts: "
                    "refused (it was not loaded)"
                )
            return env.load_payload(data, start, end)
        return self._format(kind).decode_task(data, start, end)

    # ------------------------------------------------------------ results

    def _seal(self, data: bytes) -> bytes:
        signer = self.signer
        return data if signer is None else data + signer.tag(data)

    def _reply_kind(self, flags: int) -> int:
        kind = (flags & _SER_MASK) >> env.SER_SHIFT
        if kind not in FORMAT_NAMES or (
            kind == SER_PICKLE and self.signer is None and not self.pickle_trusted
        ):
            return self.kind
        return kind

    def _encode_ok_plain(self, tid: int, value: Any, flags: int = 0) -> bytes:
        if flags & _SER_MASK:
            return self._encode_ok(tid, value, flags)
        try:
            return _pack_result(_RESULT_MAGIC, _OK, tid) + _dumps(value, 5)
        except Exception:
            return env.encode_ok(tid, value)  # makes the pickling error a FAILED result

    def _encode_ok_own(self, tid: int, value: Any, flags: int = 0) -> bytes:
        if flags & _SER_MASK != self._own_ser:
            return self._encode_ok(tid, value, flags)
        try:
            data = _pack_result(_RESULT_MAGIC, self._own_ok, tid) + self._value_encode(value)
        except Exception:
            return self._encode_ok(tid, value, flags)  # which makes it a FAILED result
        signer = self.signer
        return data if signer is None else data + signer.tag(data)

    def _encode_ok(self, tid: int, value: Any, flags: int = 0) -> bytes:
        kind = self._reply_kind(flags)
        try:
            body = self._format(kind).encode_value(value)
        except Exception as exc:
            return self._encode_text(
                tid,
                env.FAILED,
                f"the task's result of type {type(value).__qualname__} could not be "
                f"{_VERB[kind]}: {type(exc).__name__}: {exc}",
            )
        bits = self._result_bits & ~env.RESULT_SER_MASK | kind << env.RESULT_SER_SHIFT
        return self._seal(_pack_result(_RESULT_MAGIC, _OK | bits, tid) + body)

    def encode_error(self, tid: int, exc: BaseException, flags: int = 0) -> bytes:
        """A handler's exception with its traceback text; one that cannot be
        encoded travels as text (FAILED)."""
        kind = self._reply_kind(flags)
        if kind == SER_PICKLE and self.signer is None:
            return env.encode_error(tid, exc)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            body = self._format(kind).encode_error(exc, tb)
        except Exception as perr:
            return self._encode_text(
                tid,
                env.FAILED,
                f"{tb}\n(the exception could not be {_VERB[kind]}: {type(perr).__name__}: {perr})",
            )
        bits = self._result_bits & ~env.RESULT_SER_MASK | kind << env.RESULT_SER_SHIFT
        return self._seal(_pack_result(_RESULT_MAGIC, _ERROR | bits, tid) + body)

    def _encode_text(self, tid: int, status: int, text: str) -> bytes:
        bits = self._result_bits & env.RESULT_SIGNED
        head = _pack_result(_RESULT_MAGIC, status | bits, tid)
        return self._seal(head + text.encode("utf-8", "replace"))

    def decode_result(self, data: bytes, status_byte: int) -> tuple[bool, Any]:
        """(True, value) or (False, exception) from a result message."""
        status = status_byte & env.RESULT_STATUS_MASK
        end = len(data)
        signer = self.signer
        signed = status_byte & env.RESULT_SIGNED
        if signed:
            end -= TAG_SIZE
        if signer is not None and (not signed or end < _RHS or not signer.verify(data, False)):
            tid = _unpack_result(data)[2]
            return False, SignatureError(
                f"the result of task #{tid} did not verify (missing or wrong signature: a "
                "forged reply, or a worker with another secret); it was not decoded"
            )
        if status in (_OK, _ERROR):
            kind = (status_byte & env.RESULT_SER_MASK) >> env.RESULT_SER_SHIFT
            if kind == SER_PICKLE and not (self.pickle_trusted or signer is not None):
                return False, CodecError(
                    "an unsigned pickled result came over a transport that spans hosts: "
                    "refused (it was not loaded)"
                )
            try:
                fmt = self._format(kind)
            except CodecError as exc:
                return False, exc
            if status == _ERROR:
                return False, fmt.decode_error(data, _RHS, end)
            try:
                return True, fmt.decode_value(data, _RHS, end)
            except Exception as exc:
                return False, TaskFailed(f"the task's result could not be decoded: {exc!r}")
        text = data[_RHS:end].decode("utf-8", "replace")
        if status == env.TIMEOUT:
            return False, TaskTimeout(text)
        if status == env.LOST:
            return False, WorkerLost(text)
        return False, TaskFailed(text)


def _encode_plain(
    task: Any,
    tid: int,
    flags: int,
    pid: int,
    reply: bytes,
    deadline: float = 0.0,
    wall: float = 0.0,
    gid: bytes = _NO_ID,
) -> bytes:
    """Unsigned pickle: the bytes (and the cost) of ``envelope.encode_task``."""
    return (
        _pack_task(_TASK_MAGIC, flags, 1, pid, tid, deadline, wall, len(reply), gid, _time())
        + reply
        + _dumps(task, 5)
    )


def requeue_task(data: bytes, signer: Signer | None) -> bytes:
    """``envelope.requeue_envelope`` for dead letters: a signed letter is
    queued again only when its tag verifies, and is signed anew (a forged
    letter in the store must not get a good tag by being retried)."""
    hdr, _, _ = env.decode_task_header(data)
    if not hdr.flags & _SIGNED:
        return env.requeue_envelope(data)
    if signer is None:
        raise SignatureError(
            "this dead letter is signed: retrying it needs the bus's secret "
            "(secret= or RINGBUS_SECRET)"
        )
    if not signer.verify(data, True):
        raise SignatureError("this dead letter's signature does not verify: it was not queued")
    return env.requeue_envelope(data, signer.tag_task)
