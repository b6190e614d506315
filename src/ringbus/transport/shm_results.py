"""The task table on shared memory: a fixed-size file of fixed-size records.

``/dev/shm/ringbus-<bus>-tasktable`` (0600, this uid, never through a
symlink, removed by ``bus.destroy()``).  A header page, a table of block
owners, then ``slots`` records of ``record_size`` bytes.

Writing a record takes no lock and no system call: each field has one
writer at a time, and the per-task steps (a new record, a worker starting
and ending the task, a cancel racing a start) are C (csrc/task_records.h).
The slots are cut into blocks of 256; a dispatching process owns one block
at a time (claimed under ``flock``, which the kernel drops if it dies, once
per 256 dispatches; its pages mapped in one ``madvise``) and is the only one
to put new records in it.  It claims its own block again when that block's
oldest record is free, so a steady dispatcher reuses warm pages, and
after a burst it takes back the blocks it used before ahead of fresh ones.  A task's
id names its slot (``ringbus/_ids.py``), so a lookup is one read.  A worker
writes the running task's state and progress; a canceller its cancel flag.
Readers re-read a record until two reads agree.

Full table: a free slot is an empty one, or one whose task finished and
whose keep time passed.  With none left, a new task's record replaces a
kept result before its time (a block at a time, in slot order; counted as
``evicted``).  Records of tasks not finished are never replaced: when all of
them are such, ``add`` raises ``StoreFull`` and the task is not queued.

Record (little-endian)::

    0  16 id             16 u8 state    17 u8 cancel flag   18 u16 attempt
    20 u32 worker pid    24 u32 dispatcher pid   28 u32 result length
    32 u64 dispatcher's counter   40 f64 queued   48 f64 started
    56 f64 finished      64 f64 expires (0: not finished)
    72 f32 progress (NaN: none)   76 u16 message length   80 message [128]
    208 the kept result message (at most record_size - 208 bytes)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import mmap
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator

from ringbus._ids import NO_SLOT, current_pid, id_slot
from ringbus._proc import pid_alive
from ringbus._ring import TaskRecords
from ringbus.errors import RingError
from ringbus.transport.task_table import (
    CANCEL,
    CANCELLED_HOLD,
    EMPTY,
    FINAL,
    TERMINATE,
    Bound,
    LocalSteps,
    StoreFull,
    TaskRecord,
    TaskTable,
)

__all__ = ["DEFAULT_RECORD_SIZE", "DEFAULT_SLOTS", "ShmTaskTable"]

MAGIC = b"RBTTAB01"
HEAD = struct.Struct("<8sIIIId")  # magic, slots, record size, block, blocks, created
EVICTED_OFF = 40  # u64 results evicted before their time
OWNERS_OFF = 64
OWNER = struct.Struct("<Id")  # pid, claimed at (Unix): a reused pid is not the owner
OWNER_SIZE = 16
BLOCK = 256
DEFAULT_SLOTS = 65536
DEFAULT_RECORD_SIZE = 1024
PAGE = 4096
REC = struct.Struct("<16sBBHIIIQddddfHH")
RESULT_OFF = 208
MSG_OFF, MSG_MAX = 80, 128
_F64 = struct.Struct("<d")
_PROG = struct.Struct("<fH")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SLOT = struct.Struct("<I")  # an id's slot, at byte 12 (_ids.py)
_NAN = float("nan")
NOT_KEPT = 0xFFFFFFFF
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _populate(mm: mmap.mmap, start: int, length: int) -> None:
    """Map the pages of a block now, in one system call (MADV_POPULATE_WRITE,
    Linux 5.14), instead of one page fault per four records on the hot path;
    older kernels just fault them in as before."""
    with contextlib.suppress(OSError, ValueError):
        mm.madvise(_MADV_POPULATE_WRITE, start, length)


def _header_size(blocks: int) -> int:
    return -(-(OWNERS_OFF + blocks * OWNER_SIZE) // PAGE) * PAGE


class ShmTaskTable(TaskTable):
    """See the module docstring."""

    def __init__(
        self, path: str, slots: int = DEFAULT_SLOTS, record_size: int = DEFAULT_RECORD_SIZE
    ) -> None:
        if slots < BLOCK or slots % BLOCK or slots >= NO_SLOT:
            raise ValueError(f"task table slots must be a multiple of {BLOCK}, not {slots}")
        if record_size < RESULT_OFF + 64 or record_size % 8:
            raise ValueError(f"task table record size must be >= 272 and 8-aligned: {record_size}")
        self.path = path
        self._want = (slots, record_size)
        self.slots: int = slots  # as asked until the file is open (it may exist: then its own)
        self._lock = threading.Lock()
        self._mm: mmap.mmap | None = None
        self._fd = -1
        self._pid = 0
        self._block = -1

    # ------------------------------------------------------------ the file

    def _map(self) -> mmap.mmap:
        mm = self._mm
        # current_pid() is cached (updated at fork): os.getpid() is a system
        # call, and this runs several times per task.
        if mm is not None and self._pid == current_pid():
            return mm
        with self._lock:
            if self._mm is None or self._pid != current_pid():
                self._open()  # a forked child claims a block of its own
            assert self._mm is not None
            return self._mm

    def _open(self) -> None:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            fd = self._create()
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RingError(f"{self.path} is a symbolic link: refusing to use it") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise RingError(
                    f"{self.path} is not a private regular file of this user "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}): not trusted"
                )
            head = os.pread(fd, HEAD.size, 0)
            magic, slots, size, block, blocks, _ = HEAD.unpack(head)
            if magic != MAGIC or block != BLOCK or blocks * BLOCK != slots:
                raise RingError(f"{self.path} is not a ringbus task table")
            if st.st_size != _header_size(blocks) + slots * size:
                raise RingError(f"{self.path}: {st.st_size} bytes do not match its header")
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._mm, self._pid = fd, mm, current_pid()
        self.slots, self.record_size, self.blocks = slots, size, blocks
        self._base = _header_size(blocks)
        # The per-task steps (fill, begin, finish, cancel) in C: csrc/task_records.h.
        self._recs = TaskRecords(mm, self._base, slots, size)
        self._block = -1  # a new map (a forked child, say) claims a block of its own
        # Blocks allocated in the file and mapped in this map: the file never
        # shrinks while it exists, so they need no fallocate/madvise again.
        self._ready: set[int] = set()

    def _create(self) -> int:
        """Made whole under a temporary name, then linked: nobody sees half a header."""
        slots, size = self._want
        blocks = slots // BLOCK
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            # Sparse: pages are reserved a block at a time when a block is claimed.
            os.ftruncate(fd, _header_size(blocks) + slots * size)
            os.pwrite(fd, HEAD.pack(MAGIC, slots, size, BLOCK, blocks, time.time()), 0)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass  # another process made it first: use theirs
        finally:
            os.close(fd)
            os.unlink(tmp)
        return os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)

    def close(self) -> None:
        with self._lock:
            if self._mm is not None and self._pid == os.getpid():
                if self._block >= 0:
                    self._release_block()
                self._recs.release()  # the map cannot close while C holds its buffer
                with contextlib.suppress(BufferError, ValueError):
                    self._mm.close()
                with contextlib.suppress(OSError):
                    os.close(self._fd)
            self._mm, self._fd, self._block = None, -1, -1

    def destroy(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _off(self, gid: bytes) -> int:
        """Where the record of ``gid`` is (-1: not a slot of this table)."""
        self._map()
        slot = id_slot(gid)
        return -1 if slot >= self.slots else self._base + slot * self.record_size

    # ------------------------------------------------------------ blocks

    def _owner_alive(self, mm: mmap.mmap, block: int) -> bool:
        pid, since = OWNER.unpack_from(mm, OWNERS_OFF + block * OWNER_SIZE)
        return bool(pid) and pid_alive(pid, since)

    def _release_block(self) -> None:
        assert self._mm is not None
        with self._flocked():
            self._flush_evictions(self._mm)
            OWNER.pack_into(self._mm, OWNERS_OFF + self._block * OWNER_SIZE, 0, 0.0)
        self._block = -1

    @contextlib.contextmanager
    def _flocked(self):  # type: ignore[no-untyped-def]
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _claim(self) -> None:
        """Own a block with room (under the file lock)."""
        mm = self._mm
        assert mm is not None
        me = current_pid()
        with self._flocked():
            self._flush_evictions(mm)
            if self._block >= 0:
                OWNER.pack_into(mm, OWNERS_OFF + self._block * OWNER_SIZE, 0, 0.0)
            now = time.time()
            # Its own block again when its oldest record is free (likely most of
            # them are): a dispatcher whose tasks finish keeps reusing the same
            # warm pages instead of walking, and faulting in, the whole table.
            start = (self._block + 1) % self.blocks
            if self._block >= 0 and self._recs.any_usable(self._block * BLOCK, 1, now, False):
                start = self._block
            for evict in (False, True):
                for b, need in self._candidates(start, evict):
                    if self._owner_alive(mm, b):
                        continue
                    if not self._recs.any_usable(b * BLOCK, need, now, evict):
                        continue
                    first = self._base + b * BLOCK * self.record_size
                    if b not in self._ready:  # once per block and map: 30-90 us each
                        try:  # a full /dev/shm fails here, not with a SIGBUS later
                            os.posix_fallocate(self._fd, first, BLOCK * self.record_size)
                        except OSError as exc:
                            raise StoreFull(f"no room in {self.path} for a block: {exc}") from None
                        _populate(mm, first, BLOCK * self.record_size)
                        self._ready.add(b)
                    OWNER.pack_into(mm, OWNERS_OFF + b * OWNER_SIZE, me, time.time())
                    self._block = b
                    self._recs.use_block(b * BLOCK, BLOCK, evict, os.urandom(8))
                    return
            self._block = -1
        raise StoreFull(
            f"the task table {self.path} is full: all {self.slots} records belong to tasks "
            "not finished (or to other dispatchers' blocks); the task was not queued"
        )

    def _candidates(self, start: int, evict: bool) -> Iterator[tuple[int, int]]:
        """Blocks to try, each with how many of its first records to check
        for one usable.  Blocks this map used before come first, when their
        oldest record is free: their pages are allocated and mapped, while a
        fresh block costs fallocate, populate and a page fault per four
        records in each process that touches it.  Then every block from
        ``start`` on, any usable record counting."""
        if not evict:
            for b in sorted(self._ready):
                yield b, 1
        for i in range(self.blocks):
            yield (start + i) % self.blocks, BLOCK

    # ------------------------------------------------------------ records

    def add(self, state: int, dispatcher_pid: int, counter: int) -> bytes:
        if self._mm is None or self._pid != current_pid():
            self._map()
        # The next usable record of this process's block, in C (one call that
        # holds the GIL: threads need no lock for it); None when the block is
        # used up, then claim another under the lock.
        gid = self._recs.add(state, dispatcher_pid, counter, time.time())
        if gid is not None:
            return gid
        with self._lock:
            while True:
                gid = self._recs.add(state, dispatcher_pid, counter, time.time())
                if gid is not None:
                    return gid
                if not self._fill_own_block_again():
                    self._claim()

    def adder(self) -> Callable[[int, int, int], bytes]:
        """``add`` for this process's dispatches: the C step straight away,
        ``add`` only to claim a block (or when the map changed: closed and
        opened again, the old records are released)."""
        self._map()
        recs = self._recs
        step, clock, slow = recs.add, time.time, self.add

        def add(state: int, dispatcher_pid: int, counter: int) -> bytes:
            nonlocal recs, step
            if self._recs is recs and self._mm is not None:  # not closed since
                gid = step(state, dispatcher_pid, counter, clock())
                if gid is not None:
                    return gid
            gid = slow(state, dispatcher_pid, counter)
            recs = self._recs
            step = recs.add
            return gid

        return add

    def _fill_own_block_again(self) -> bool:
        """Start over in the block this process owns when its oldest record is
        free (likely most of them are): a steady dispatcher keeps reusing the
        same warm pages.  No file lock: a block with a live owner is only
        ever filled by its owner.  (Through ``_claim`` this took flock,
        fallocate and madvise: 30-50 us per 256 tasks.)"""
        mm, b = self._mm, self._block
        if mm is None or b < 0 or self._recs.evicted:
            return False  # evictions are counted under the lock, in _claim
        if not self._recs.any_usable(b * BLOCK, 1, time.time(), False):  # its oldest record
            return False
        self._recs.use_block(b * BLOCK, BLOCK, False, os.urandom(8))
        return True

    def _flush_evictions(self, mm: mmap.mmap) -> None:
        n = self._recs.evicted
        if n:
            self._recs.evicted = 0
            total = _U64.unpack_from(mm, EVICTED_OFF)[0]
            _U64.pack_into(mm, EVICTED_OFF, total + n)  # under the file lock

    def _head(self, gid: bytes) -> tuple[int, tuple[object, ...]] | None:
        off = self._off(gid)
        if off < 0:
            return None
        mm = self._mm
        assert mm is not None
        raw = mm[off : off + RESULT_OFF]
        for _ in range(4):
            again = mm[off : off + RESULT_OFF]
            if again == raw:
                break
            raw = again
        fields = REC.unpack_from(raw)
        if fields[0] != gid or fields[1] == EMPTY:
            return None
        if fields[1] in FINAL and 0 < fields[11] <= time.time():
            return None  # expired
        return off, fields

    def get(self, gid: bytes) -> TaskRecord | None:
        found = self._head(gid)
        if found is None:
            return None
        off, f = found
        (_, state, cancel, attempt, wpid, dpid, rlen, counter, q, s, fin, exp, prog, mlen, _) = f
        mm = self._mm
        assert mm is not None
        msg = bytes(mm[off + MSG_OFF : off + MSG_OFF + min(int(mlen), MSG_MAX)])  # type: ignore[call-overload]
        result = None
        dropped = ""
        if state in FINAL and rlen == NOT_KEPT:
            dropped = (
                f"the result was larger than the task table's {self.record_size - RESULT_OFF} "
                f"bytes for one, and was not kept"
            )
        elif state in FINAL and rlen:
            result = bytes(mm[off + RESULT_OFF : off + RESULT_OFF + int(rlen)])  # type: ignore[call-overload]
        if mm[off : off + 16] != gid:  # replaced while we read
            return None
        return TaskRecord(
            gid, int(state), int(cancel), int(attempt), int(wpid), int(dpid), int(counter),  # type: ignore[call-overload]
            float(q), float(s), float(fin), float(exp),  # type: ignore[arg-type]
            None if math.isnan(prog) else float(prog),  # type: ignore[arg-type]
            msg.decode("utf-8", "replace"), result, dropped,
        )  # fmt: skip

    def _mine(self, gid: bytes) -> int:
        """Offset of a live record of ``gid`` (-1: none)."""
        off = self._off(gid)
        if off < 0:
            return -1
        mm = self._mm
        assert mm is not None
        return off if mm[off : off + 16] == gid and mm[off + 16] != EMPTY else -1

    def begin(self, gid: bytes, attempt: int, worker_pid: int) -> Bound | None:
        # start() and accessors() in one step, in C: this runs once per task.
        # The accessors take the record's offset: no closures per task.
        if self._mm is None or self._pid != current_pid():
            self._map()
        recs = self._recs
        rel = recs.begin(gid, attempt, worker_pid, time.time())
        if rel >= 0:
            return recs.cancel_flag, self._write_progress_rel, rel
        if rel == -2:
            return None
        flag, progress = super().accessors(gid)  # -1: untracked, run it
        return flag, progress, None

    def local_steps(self) -> LocalSteps:
        self._map()
        recs = self._recs
        return recs.begin, recs.finish, recs.cancel_flag, self._write_progress_rel

    def _write_progress_rel(self, rel: int, fraction: float | None, message: str) -> None:
        self.write_progress(self._base + rel, fraction, message)

    def start(self, gid: bytes, attempt: int, worker_pid: int) -> bool:
        self._map()
        return self._recs.begin(gid, attempt, worker_pid, time.time()) != -2

    def set_state(self, gid: bytes, state: int, attempt: int = 0) -> None:
        off = self._mine(gid)
        if off >= 0:
            mm = self._mm
            assert mm is not None
            if attempt:
                struct.pack_into("<H", mm, off + 18, min(attempt, 0xFFFF))
            mm[off + 16] = state

    def progress(self, gid: bytes, fraction: float | None, message: str) -> None:
        off = self._mine(gid)
        if off >= 0:
            self.write_progress(off, fraction, message)

    def write_progress(self, off: int, fraction: float | None, message: str) -> None:
        mm = self._mm
        assert mm is not None
        b = message.encode("utf-8", "replace")[:MSG_MAX]
        mm[off + MSG_OFF : off + MSG_OFF + len(b)] = b
        _PROG.pack_into(mm, off + 72, _NAN if fraction is None else fraction, len(b))

    def finish(self, gid: bytes, state: int, keep: float, result: bytes | None) -> None:
        if self._mm is None or self._pid != current_pid():
            self._map()
        self._recs.finish(gid, state, time.time(), keep, result)

    def request_cancel(self, gid: bytes, terminate: bool = False) -> TaskRecord | None:
        before = self.get(gid)
        if before is None or before.state in FINAL:
            return before
        self._map()
        # Flag, and a waiting task cancelled now (the worker that meets it
        # drops it): one CAS against the worker's start, in C.
        flag = TERMINATE if terminate else CANCEL
        if self._recs.cancel(gid, flag, time.time(), CANCELLED_HOLD) < 0:
            return None
        return before

    def accessors(
        self, gid: bytes
    ) -> tuple[Callable[[], int], Callable[[float | None, str], None]]:
        off = self._mine(gid)
        if off < 0:
            return super().accessors(gid)
        # Bound to the record's offset: a read or a write into the map, no lookup.
        recs, rel = self._recs, off - self._base
        return (lambda: recs.cancel_flag(rel)), (lambda f, m: self.write_progress(off, f, m))

    def stats(self) -> dict[str, int]:
        """Records in use (tasks not finished, kept ones) and evictions."""
        mm = self._map()
        now = time.time()
        live = kept = 0
        for slot in range(self.slots):
            off = self._base + slot * self.record_size
            state = mm[off + 16]
            if state == EMPTY:
                continue
            if state in FINAL:
                if _F64.unpack_from(mm, off + 64)[0] > now:
                    kept += 1
            else:
                live += 1
        # The header's count, plus this process's own not yet flushed (each
        # dispatcher adds its count when it moves to another block).
        evicted = _U64.unpack_from(mm, EVICTED_OFF)[0] + self._recs.evicted
        return {"slots": self.slots, "live": live, "kept": kept, "evicted": evicted}
