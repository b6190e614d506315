"""The shared-memory transport's record store: an append-only file.

``/dev/shm/ringbus-<bus>-dead`` outlives every server (removed by
``TaskBus.destroy()``).  Appends and tombstones take ``flock``, which the
kernel drops when its holder dies, so a killed process can never wedge it;
each record carries a CRC, so a record torn by a crash is skipped on read.
Removing a record only sets its tombstone byte: a caller that must not
lose a record acts on it first, then removes it (a crash in between
duplicates, never loses).

The file follows the rings' rules: never through a symlink, created with
``O_EXCL`` and mode 0600, and used only while it is a regular file of our
uid that no group or other user can read or write (another local user who
planted it could read failed tasks' payloads or have ``--retry`` run
records of their making).  It has a size cap: past ``max_bytes`` an append
fails with ``ENOSPC`` (what is in the store stays).

Record layout (little-endian)::

    0   4  magic b"RBR1"
    4   1  live (1) / removed (0)       -- not covered by the CRC
    5   3  reserved
    8   4  body length n
    12  4  CRC-32 of the body
    16  n  body: u64 id, then the record's bytes (opaque here)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator

from ringbus.errors import RingError

__all__ = ["DEFAULT_MAX_BYTES", "RecordFile"]

DEFAULT_MAX_BYTES = 64 << 20

_MAGIC = b"RBR1"
_REC = struct.Struct("<4sB3xII")
_ID = struct.Struct("<Q")

Record = tuple[str, bytes]


class RecordFile:
    """Opaque records appended to one file (see the module docstring)."""

    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.end = 0

    def _open(self, write: bool) -> int | None:
        base = os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            if write:
                try:
                    return os.open(self.path, base | os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    fd = os.open(self.path, base | os.O_RDWR)
            else:
                fd = os.open(self.path, base | os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RingError(f"{self.path} is a symbolic link: refusing to use it") from None
            raise
        try:
            self._check(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check(self, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise RingError(f"{self.path} is not a regular file: refusing to use it")
        if st.st_uid != os.geteuid():
            raise RingError(
                f"{self.path} belongs to uid {st.st_uid}, not to this user "
                f"(uid {os.geteuid()}): refusing to use it"
            )
        if st.st_mode & 0o077:
            raise RingError(
                f"{self.path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                f"only 0600 is safe: refusing to use it"
            )

    def _locked(self, write: bool) -> int | None:
        """Open and lock the file now under the path (``compact`` replaces it:
        a process that locked the old one looks again)."""
        while True:
            fd = self._open(write)
            if fd is None:
                return None
            fcntl.flock(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
            if not write:
                return None

    def add(self, data: bytes) -> str:
        """Append a record; returns its id."""
        rid = secrets.randbits(63) | 1
        body = _ID.pack(rid) + data
        rec = _REC.pack(_MAGIC, 1, len(body), zlib.crc32(body)) + body
        fd = self._locked(True)
        assert fd is not None
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end + len(rec) > self.max_bytes:
                raise OSError(
                    errno.ENOSPC,
                    f"record store {self.path} is full ({end} of {self.max_bytes} bytes; "
                    f"a record of {len(rec)} bytes does not fit)",
                )
            # pwrite at the end under the lock: a torn write is cut off by the
            # next append's position check below (records never overlap).
            written = os.pwrite(fd, rec, end)
            if written != len(rec):
                os.ftruncate(fd, end)
                raise OSError(f"short write to {self.path}")
        finally:
            os.close(fd)
        return f"{rid:016x}"

    def _scan(self, fd: int, start: int = 0) -> Iterator[tuple[int, Record]]:
        """(offset, record) of every live record from ``start``; ``self.end``
        is then where the valid records stop."""
        size = os.fstat(fd).st_size
        raw = os.pread(fd, size - start, start) if size > start else b""
        off = 0
        while off + _REC.size <= len(raw):
            magic, live, n, crc = _REC.unpack_from(raw, off)
            body_at = off + _REC.size
            if magic != _MAGIC or body_at + n > len(raw):
                break  # a torn tail: nothing valid can follow it
            body = raw[body_at : body_at + n]
            if live and n >= _ID.size and zlib.crc32(body) == crc:
                (rid,) = _ID.unpack_from(body)
                yield start + off, (f"{rid:016x}", bytes(body[_ID.size :]))
            off = body_at + n
        self.end = start + off

    def records(self) -> list[Record]:
        fd = self._locked(False)
        if fd is None:
            return []
        try:
            return [r for _, r in self._scan(fd)]
        finally:
            os.close(fd)

    def scan_from(self, start: int) -> tuple[list[tuple[int, Record]], int]:
        """Live records appended at or after offset ``start`` (with their
        offsets), and the offset where the next scan starts."""
        fd = self._locked(False)
        if fd is None:
            return [], 0
        try:
            found = list(self._scan(fd, start))
            return found, self.end
        finally:
            os.close(fd)

    def kill(self, offsets: Iterable[int]) -> bool:
        """Tombstone the records at ``offsets``; True when nothing live is left
        and the file was emptied (later records start at offset 0 again)."""
        fd = self._locked(True)
        if fd is None:
            return True
        try:
            for off in offsets:
                os.pwrite(fd, b"\0", off + 4)
            if not any(True for _ in self._scan(fd)):
                os.ftruncate(fd, 0)
                return True
            return False
        finally:
            os.close(fd)

    def compact(self) -> None:
        """Rewrite the file with its live records only (a new file renamed
        over the old: a crash leaves one or the other whole)."""
        fd = self._locked(True)
        if fd is None:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            live = [r for _, r in self._scan(fd)]
            out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                for rid, data in live:
                    body = _ID.pack(int(rid, 16)) + data
                    os.write(out, _REC.pack(_MAGIC, 1, len(body), zlib.crc32(body)) + body)
            finally:
                os.close(out)
            os.rename(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.close(fd)

    def size(self) -> int:
        try:
            return os.stat(self.path, follow_symlinks=False).st_size
        except FileNotFoundError:
            return 0

    def __len__(self) -> int:
        return len(self.records())

    def take(
        self,
        ids: Iterable[str] | None = None,
        handle: Callable[[Record], object] | None = None,
    ) -> list[Record]:
        """Remove the selected records (all when ``ids`` is None) and return
        them; ``handle`` runs on each before its tombstone is written."""
        want = None if ids is None else {i.lower().removeprefix("0x").zfill(16) for i in ids}
        fd = self._locked(True)
        if fd is None:
            return []
        taken: list[Record] = []
        try:
            for off, r in list(self._scan(fd)):
                if want is not None and r[0] not in want:
                    continue
                if handle is not None:
                    handle(r)
                os.pwrite(fd, b"\0", off + 4)
                taken.append(r)
            if not any(True for _ in self._scan(fd)):
                os.ftruncate(fd, 0)  # nothing live is left: reclaim the space
        finally:
            os.close(fd)
        return taken

    def destroy(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
