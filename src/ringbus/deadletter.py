"""Dead letters: tasks whose last attempt failed, kept until someone looks.

A task lands here when its handler failed on its last allowed attempt (or
raised ``Unrecoverable``), when every worker that took it died (a poison
task), when it overran ``task_timeout``, or when its envelope could not be
decoded at all.  The record keeps the whole envelope, so ``ringbus
dead-letters NAME --retry`` can queue the very same bytes again.

On the shared-memory transport the store is an append-only file
``/dev/shm/ringbus-<bus>-dead`` that outlives every server (removed by
``TaskBus.destroy()``).  Appends and tombstones take ``flock``, which the
kernel drops when its holder dies, so a killed process can never wedge it;
each record carries a CRC, so a record torn by a crash is skipped on read.
Removing a record only sets its tombstone byte: retry queues the task first,
then marks the record, so a crash in between duplicates, never loses.

Record layout (little-endian)::

    0   4  magic b"RBD1"
    4   1  live (1) / removed (0)       -- not covered by the CRC
    5   3  reserved
    8   4  body length n
    12  4  CRC-32 of the body
    16  n  body: u64 id, f64 unix time, u16 attempts, u16 reason length,
               u16 task type length, reason, task type, envelope
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from ringbus import envelope as env

__all__ = ["DeadLetter", "DeadLetterFile", "describe_envelope", "requeue_envelope"]

_MAGIC = b"RBD1"
_REC = struct.Struct("<4sB3xII")
_BODY = struct.Struct("<QdHHH")
_MAX_TEXT = 4000


class DeadLetter(NamedTuple):
    """One dead-lettered task."""

    id: str
    """Stable identifier within the store (pass it to retry/purge)."""
    time: float
    """When it was dead-lettered (Unix seconds)."""
    reason: str
    task_type: str
    """``module.QualName`` of the task, or ``""`` when it could not be read."""
    attempts: int
    data: bytes
    """The whole task envelope, as it was on the task channel."""


def describe_envelope(data: bytes) -> tuple[str, int]:
    """(task type, attempt) read from an envelope without importing the task's
    module (the pickle's first GLOBAL names the class)."""
    try:
        hdr, _, start = env.decode_task_header(data)
    except env.EnvelopeError:
        return "", 0
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


def requeue_envelope(data: bytes) -> bytes:
    """The envelope to queue again for a retry from dead letters: attempt 1, no
    deadline, no reply (the original caller's future has already failed)."""
    hdr, reply, start = env.decode_task_header(data)
    return env.encode_task(
        bytes(memoryview(data)[start:]),
        hdr.task_id,
        hdr.flags & ~env.FLAG_REPLY,
        hdr.pid,
        reply,
        0.0,
        0.0,
        1,
    )


class DeadLetterFile:
    """The shared-memory transport's dead-letter store (see module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _open(self, write: bool) -> int | None:
        flags = os.O_RDWR | os.O_CREAT if write else os.O_RDONLY
        try:
            return os.open(self.path, flags | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            return None

    def add(self, data: bytes, reason: str, task_type: str = "", attempts: int = 0) -> str:
        """Append a record; returns its id."""
        if not task_type or not attempts:
            t, a = describe_envelope(data)
            task_type = task_type or t
            attempts = attempts or a
        rid = secrets.randbits(63) | 1
        rb = reason.encode("utf-8", "replace")[:_MAX_TEXT]
        tb = task_type.encode("utf-8", "replace")[:_MAX_TEXT]
        head = _BODY.pack(rid, time.time(), min(attempts, 0xFFFF), len(rb), len(tb))
        body = head + rb + tb + data
        rec = _REC.pack(_MAGIC, 1, len(body), zlib.crc32(body)) + body
        fd = self._open(True)
        assert fd is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            end = os.lseek(fd, 0, os.SEEK_END)
            # pwrite at the end under the lock: a torn write is cut off by the
            # next append's position check below (records never overlap).
            written = os.pwrite(fd, rec, end)
            if written != len(rec):
                os.ftruncate(fd, end)
                raise OSError(f"short write to {self.path}")
        finally:
            os.close(fd)
        return f"{rid:016x}"

    def _scan(self, fd: int) -> Iterator[tuple[int, DeadLetter]]:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, size, 0) if size else b""
        off = 0
        while off + _REC.size <= len(raw):
            magic, live, n, crc = _REC.unpack_from(raw, off)
            body_at = off + _REC.size
            if magic != _MAGIC or body_at + n > len(raw):
                break  # a torn tail: nothing valid can follow it
            body = raw[body_at : body_at + n]
            if live and n >= _BODY.size and zlib.crc32(body) == crc:
                rid, when, attempts, rl, tl = _BODY.unpack_from(body)
                p = _BODY.size
                reason = body[p : p + rl].decode("utf-8", "replace")
                ttype = body[p + rl : p + rl + tl].decode("utf-8", "replace")
                yield (
                    off,
                    DeadLetter(
                        f"{rid:016x}", when, reason, ttype, attempts, bytes(body[p + rl + tl :])
                    ),
                )
            off = body_at + n

    def records(self) -> list[DeadLetter]:
        fd = self._open(False)
        if fd is None:
            return []
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return [d for _, d in self._scan(fd)]
        finally:
            os.close(fd)

    def __len__(self) -> int:
        return len(self.records())

    def take(
        self,
        ids: Iterable[str] | None = None,
        handle: Callable[[DeadLetter], object] | None = None,
    ) -> list[DeadLetter]:
        """Remove the selected records (all when ``ids`` is None) and return them.

        ``handle``, if given, is called with each record before its tombstone
        is written (retry queues the task there: a crash duplicates, never loses).
        """
        want = None if ids is None else {i.lower().removeprefix("0x").zfill(16) for i in ids}
        fd = self._open(True)
        if fd is None:
            return []
        taken: list[DeadLetter] = []
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for off, d in list(self._scan(fd)):
                if want is not None and d.id not in want:
                    continue
                if handle is not None:
                    handle(d)
                os.pwrite(fd, b"\0", off + 4)
                taken.append(d)
            if not any(True for _ in self._scan(fd)):
                os.ftruncate(fd, 0)  # nothing live is left: reclaim the space
        finally:
            os.close(fd)
        return taken

    def destroy(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
