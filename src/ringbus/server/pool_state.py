"""The pool-state segment: what each worker of a TaskServer is doing.

``/dev/shm/ringbus-<bus>-pool-<server pid>``, one slot per worker: the
supervisor reads it when a worker dies, ``ringbus stats`` reads it from
outside, and each slot ends in the worker's *journal*: the transport writes
the envelope of the task in hand there before it leaves the channel, so a
worker killed at any instant leaves its task either in the channel or here.
After the journal, every slot ends in the worker's task run-time and
queue-wait histograms (``histograms.py``; sized by the header field at
``HIST_AREA_OFF``, 0 in segments of earlier servers).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from ringbus import _names
from ringbus._proc import mapped_pids, pid_alive
from ringbus.server import histograms as hist
from ringbus.transport.base import JOURNAL_DATA_AT

__all__ = ["POOL_MAGIC", "PoolState", "WorkerInfo", "read_pool_states", "server_holds"]


POOL_MAGIC = b"RBPOOL01"
POOL_VERSION = 1
# magic, version, slots, stride, server pid, created (Unix), bus name length (name at 64)
POOL_HEADER = struct.Struct("<8sIIIIdH")
BROKER_OFF = 36
"""u8 in the header: 1 when the bus's transport delivers a dead worker's task
again by itself (a broker), so whoever adopts the segment must not."""
PER_WORKER = struct.Struct("<I")
PER_WORKER_OFF = 40
"""u32 in the header: task slots per worker (its ``concurrency``; 0 reads as 1).
Worker w owns slots w*n .. w*n+n-1; its counters live in the first."""
HIST_AREA_OFF, HIST_LAYOUT_OFF = 44, 48
"""u32 in the header: bytes of the histogram area at the end of each slot
(0: none, a segment of an earlier server); u16: its layout (histograms.py).
The journal of a slot ends where the area starts."""
_HIST_HEAD = struct.Struct("<IH")
_HIST_HEAD_END = HIST_AREA_OFF + _HIST_HEAD.size
QUEUES_OFF, QUEUES_MAX = 256, 3800
"""u16 length, then the served queues, comma-separated, in taking order
(issue 16; zero length, as in segments of earlier servers: "default")."""
POOL_HEADER_SIZE = 4096
SLOT_HEAD = 512
PAGE = 4096
MAX_SLOTS = 4096
"""More worker slots than any pool has: a header saying otherwise is refused."""
MIN_STRIDE = -(-(SLOT_HEAD + PAGE) // PAGE) * PAGE
"""The smallest slot: its head and a page of envelope, in whole pages."""
NAME_OFF, NAME_MAX = 64, 120
REPLY_OFF, REPLY_MAX = 64, 256
TYPE_OFF, TYPE_MAX = 320, 128
DEFAULT_ENVELOPE_AREA = 1 << 20

EMPTY, STARTING, IDLE, RUNNING, EXITED = range(5)
STATE_NAMES = ("empty", "starting", "idle", "running", "exited")

# The whole fixed head of a slot (readers):
#   0 u32 worker pid        4 u32 dispatcher pid   8 u64 task id
#  16 f64 started (monotonic)  24 f64 deadline (monotonic, 0 none)
#  32 u16 attempt   34 u8 flags   35 u16 reply len   37 u8 state
#  38 u64 tasks done  46 u16 type len  48 f64 worker started (monotonic)
#  56 u64 reserved
#  64 reply address [256]   320 task type [128]
# 448 u32 tasks failed  452 u32 tasks retried  456 u32 dead-lettered
# 460 u16 deliveries allowed for the task in hand (0: not known yet)
# 504 the journal (see ringbus.transport.base): u32 length of the envelope
#     in hand (0: none), then from 512 the envelope itself
# stride - hist_area: the histogram area (histograms.py), up to the end of
#     the slot; never reset when a new worker takes the slot
SLOT = struct.Struct("<IIQddHBHBQHdII")
# What a worker writes when it takes a task (offset 4) and when it finishes (offset 37).
SLOT_RUN = struct.Struct("<IQddHBHB")
SLOT_RUN_OFF = 4
SLOT_DONE = struct.Struct("<BQ")
SLOT_DONE_OFF = 37
SLOT_TYPE_LEN = struct.Struct("<H")
SLOT_WORKER = struct.Struct("<I")
SLOT_STARTED = struct.Struct("<d")
JOURNAL_OFF = SLOT_HEAD - JOURNAL_DATA_AT
"""Where a slot's journal starts: its length field (the envelope follows at SLOT_HEAD)."""
SLOT_COUNTERS = struct.Struct("<IIIH")
SLOT_COUNTERS_OFF = 448
SLOT_MAXDEL_OFF = 460
_U16 = struct.Struct("<H")
_ZERO4 = bytes(4)


class WorkerInfo(NamedTuple):
    """One worker slot of a pool, as read from the pool state segment."""

    slot: int
    worker_pid: int
    state: str
    task_id: int
    dispatcher_pid: int
    started: float
    deadline: float
    attempt: int
    flags: int
    reply: bytes
    task_type: str
    tasks_done: int
    worker_started: float
    tasks_failed: int = 0
    tasks_retried: int = 0
    dead_lettered: int = 0
    max_deliveries: int = 0
    inflight: int = 0
    """Length of the envelope in the slot's journal (0: none)."""
    worker: int = 0
    """Which worker of the pool owns the slot (slot // concurrency)."""


def _check_file(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file, not a pool state segment")
    if st.st_uid != os.geteuid():
        raise ValueError(
            f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}): "
            "not trusted as a pool state segment"
        )
    if st.st_mode & 0o077:
        raise ValueError(
            f"{path} is open to group/other (mode {stat.S_IMODE(st.st_mode):04o}, "
            "a pool state segment is 0600): not trusted"
        )


def _check_header(path: str, head: bytes, size: int) -> tuple[int, int, int]:
    """(slots, stride, histogram area) of a header that describes a file of
    ``size`` bytes."""
    if size < POOL_HEADER_SIZE or len(head) < POOL_HEADER.size:
        raise ValueError(
            f"{path} is not a ringbus pool state segment "
            f"(too small: {size} bytes, the header alone is {POOL_HEADER_SIZE})"
        )
    magic, version, slots, stride, _, _, name_len = POOL_HEADER.unpack_from(head)
    if magic != POOL_MAGIC:
        raise ValueError(f"{path} is not a ringbus pool state segment (magic {magic!r})")
    if version != POOL_VERSION:
        raise ValueError(f"{path}: pool state version {version}, this ringbus reads {POOL_VERSION}")
    if not 0 <= slots <= MAX_SLOTS:
        raise ValueError(f"{path}: bad geometry: {slots} worker slots (at most {MAX_SLOTS})")
    if stride % PAGE or stride < MIN_STRIDE:
        raise ValueError(
            f"{path}: bad geometry: slot stride {stride} "
            f"(a multiple of {PAGE} of at least {MIN_STRIDE})"
        )
    expected = POOL_HEADER_SIZE + slots * stride
    if size != expected:
        raise ValueError(
            f"{path}: bad geometry: {size} bytes, but its header says {POOL_HEADER_SIZE} + "
            f"{slots} slots x {stride} = {expected} (truncated or not a pool state segment)"
        )
    if not 1 <= name_len <= NAME_MAX:
        raise ValueError(f"{path}: bad header: bus name length {name_len} (1..{NAME_MAX})")
    (per_worker,) = PER_WORKER.unpack_from(head, PER_WORKER_OFF) if len(head) >= 44 else (1,)
    if per_worker > max(slots, 1) or (per_worker and slots % per_worker):
        raise ValueError(
            f"{path}: bad geometry: {per_worker} task slots per worker do not divide {slots} slots"
        )
    area = _HIST_HEAD.unpack_from(head, HIST_AREA_OFF)[0] if len(head) >= _HIST_HEAD_END else 0
    if area % 8 or area > stride - SLOT_HEAD - PAGE:
        raise ValueError(
            f"{path}: bad geometry: a histogram area of {area} bytes in slots of {stride} "
            f"(a multiple of 8 that leaves the slot head and a page of journal)"
        )
    return slots, stride, area


class PoolState:
    """The pool state segment: a header page, then one slot per worker."""

    def __init__(
        self, path: str, mm: mmap.mmap, slots: int, stride: int, owner: bool, hist_area: int = 0
    ) -> None:
        self.path = path
        self.mm = mm
        self.slots = slots
        self.stride = stride
        self.owner = owner
        self.hist_area = hist_area
        """Bytes of each slot's histogram area (0: none)."""
        self.journal_end = stride - hist_area
        """Where a slot's journal ends (offset in the slot)."""
        layout = _HIST_HEAD.unpack_from(mm, HIST_AREA_OFF)[1] if hist_area else 0
        self._hist_readable = hist_area == hist.HIST_AREA and layout == hist.HIST_LAYOUT
        self._writers: dict[int, hist.SlotHistograms] = {}

    @classmethod
    def create(
        cls,
        bus_name: str,
        slots: int,
        envelope_area: int = DEFAULT_ENVELOPE_AREA,
        *,
        broker: bool = False,
        per_worker: int = 1,
        queues: list[str] | None = None,
    ) -> PoolState:
        if not 0 <= slots <= MAX_SLOTS:
            raise ValueError(f"a pool state holds 0..{MAX_SLOTS} worker slots, not {slots}")
        if per_worker < 1 or slots % per_worker:
            raise ValueError(f"{per_worker} task slots per worker do not divide {slots} slots")
        area = SLOT_HEAD + max(envelope_area, PAGE) + hist.HIST_AREA
        stride = -(-area // PAGE) * PAGE
        size = POOL_HEADER_SIZE + slots * stride
        base = f"{_names.SHM_DIR}/{_names.pool_prefix(bus_name)}{os.getpid()}"
        path, n = base, 1
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileExistsError:
                n += 1
                path = f"{base}-{n}"
        try:
            os.fchmod(fd, 0o600)  # the umask may not widen it, but make it exact
            # Reserve every page now: on a full /dev/shm this fails cleanly here
            # instead of a SIGBUS in the worker that copies a task into its journal.
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"cannot create the pool state of bus {bus_name!r}: no room for {size} bytes "
                    f"in {_names.SHM_DIR} ({slots} worker slots of {stride} bytes, each with a "
                    f"journal for the largest task) ({exc.strerror})",
                    path,
                ) from None
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        name = bus_name.encode()
        POOL_HEADER.pack_into(
            mm, 0, POOL_MAGIC, POOL_VERSION, slots, stride, os.getpid(), time.time(), len(name)
        )
        mm[NAME_OFF : NAME_OFF + len(name)] = name
        mm[BROKER_OFF] = 1 if broker else 0
        PER_WORKER.pack_into(mm, PER_WORKER_OFF, per_worker)
        _HIST_HEAD.pack_into(mm, HIST_AREA_OFF, hist.HIST_AREA, hist.HIST_LAYOUT)
        served = ",".join(queues or []).encode("ascii")
        if len(served) > QUEUES_MAX:
            mm.close()
            os.unlink(path)
            raise ValueError(f"the served queues take {len(served)} bytes; at most {QUEUES_MAX}")
        _U16.pack_into(mm, QUEUES_OFF, len(served))
        mm[QUEUES_OFF + 2 : QUEUES_OFF + 2 + len(served)] = served
        return cls(path, mm, slots, stride, owner=True, hist_area=hist.HIST_AREA)

    @classmethod
    def attach(cls, path: str, writable: bool = True) -> PoolState:
        """Map an existing segment.  ValueError naming the problem if it is not
        a pool state segment this process may trust: a symbolic link or not a
        regular file, owned by another user or open to group/other, or a
        header whose geometry does not match the file (a crafted header must
        not make a reader loop over billions of slots)."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ValueError(f"{path} is a symbolic link, not a pool state segment") from None
            raise
        try:
            st = os.fstat(fd)
            _check_file(path, st)
            head = os.pread(fd, _HIST_HEAD_END, 0)
            slots, stride, area = _check_header(path, head, st.st_size)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        if bytes(mm[: len(head)]) != head:  # rewritten between the read and the map
            mm.close()
            raise ValueError(f"{path}: the header changed while it was being read")
        return cls(path, mm, slots, stride, owner=False, hist_area=area)

    @property
    def server_pid(self) -> int:
        return int(POOL_HEADER.unpack_from(self.mm, 0)[4])

    @property
    def per_worker(self) -> int:
        """Task slots per worker (the pool's ``concurrency``)."""
        return max(1, PER_WORKER.unpack_from(self.mm, PER_WORKER_OFF)[0])

    def worker_slots(self, worker: int) -> range:
        """The slots of worker number ``worker`` (its first holds its counters)."""
        n = self.per_worker
        return range(worker * n, worker * n + n)

    @property
    def queues(self) -> list[str]:
        """The queues the server serves, in taking order."""
        (n,) = _U16.unpack_from(self.mm, QUEUES_OFF)
        raw = bytes(self.mm[QUEUES_OFF + 2 : QUEUES_OFF + 2 + min(n, QUEUES_MAX)])
        names = [q for q in raw.decode("ascii", "replace").split(",") if q]
        return names or ["default"]

    @property
    def broker(self) -> bool:
        """Whether the bus's transport redelivers a dead worker's task itself."""
        return self.mm[BROKER_OFF] == 1

    @property
    def created(self) -> float:
        """When the server created the segment (Unix seconds)."""
        return float(POOL_HEADER.unpack_from(self.mm, 0)[5])

    @property
    def bus_name(self) -> str:
        n = min(POOL_HEADER.unpack_from(self.mm, 0)[6], NAME_MAX)
        return bytes(self.mm[NAME_OFF : NAME_OFF + n]).decode("utf-8", "replace")

    def offset(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} out of range 0..{self.slots - 1}")
        return POOL_HEADER_SIZE + slot * self.stride

    def reset(self, slot: int, worker_pid: int = 0) -> None:
        """Supervisor: a fresh slot for a new worker."""
        off = self.offset(slot)
        self.mm[off : off + SLOT_HEAD] = bytes(SLOT_HEAD)
        SLOT_WORKER.pack_into(self.mm, off, worker_pid)
        self.mm[off + SLOT_DONE_OFF] = STARTING

    def set_state(self, slot: int, state: int) -> None:
        self.mm[self.offset(slot) + SLOT_DONE_OFF] = state

    def worker_up(self, slot: int, pid: int) -> None:
        """Worker: record its pid and start time, and go idle."""
        off = self.offset(slot)
        SLOT_WORKER.pack_into(self.mm, off, pid)
        SLOT_STARTED.pack_into(self.mm, off + 48, time.monotonic())
        self.mm[off + SLOT_DONE_OFF] = IDLE

    def set_type(self, slot: int, name: str) -> None:
        off = self.offset(slot)
        b = name.encode("utf-8", "replace")[:TYPE_MAX]
        self.mm[off + TYPE_OFF : off + TYPE_OFF + len(b)] = b
        SLOT_TYPE_LEN.pack_into(self.mm, off + 46, len(b))

    def read(self, slot: int) -> WorkerInfo:
        """A consistent snapshot of a slot (re-read while a live worker changes it)."""
        off = self.offset(slot)
        raw = bytes(self.mm[off : off + SLOT_HEAD])
        for _ in range(4):
            again = bytes(self.mm[off : off + SLOT_HEAD])
            if again == raw:
                break
            raw = again
        fields = SLOT.unpack_from(raw)
        (wpid, dpid, tid, started, deadline, attempt, flags, rlen, state, done, tlen, wstart) = (
            fields[:12]
        )
        (inflight,) = SLOT_WORKER.unpack_from(raw, JOURNAL_OFF)
        failed, retried, dead, maxdel = SLOT_COUNTERS.unpack_from(raw, SLOT_COUNTERS_OFF)
        rlen = min(rlen, REPLY_MAX)
        tlen = min(tlen, TYPE_MAX)
        return WorkerInfo(
            slot=slot,
            worker_pid=wpid,
            state=STATE_NAMES[state] if state < len(STATE_NAMES) else f"unknown({state})",
            task_id=tid,
            dispatcher_pid=dpid,
            started=started,
            deadline=deadline,
            attempt=attempt,
            flags=flags,
            reply=raw[REPLY_OFF : REPLY_OFF + rlen],
            task_type=raw[TYPE_OFF : TYPE_OFF + tlen].decode("utf-8", "replace"),
            tasks_done=done,
            worker_started=wstart,
            tasks_failed=failed,
            tasks_retried=retried,
            dead_lettered=dead,
            max_deliveries=maxdel,
            inflight=inflight,
            worker=slot // self.per_worker,
        )

    def journal(self, slot: int) -> memoryview:
        """A worker's journal (a view into the segment: release it when done)."""
        off = self.offset(slot)
        return memoryview(self.mm)[off + JOURNAL_OFF : off + self.journal_end]

    def inflight(self, slot: int) -> bytes | None:
        """The envelope in a worker's journal, if it holds one."""
        off = self.offset(slot)
        (n,) = SLOT_WORKER.unpack_from(self.mm, off + JOURNAL_OFF)
        if not n or n > self.journal_end - SLOT_HEAD:
            return None
        return bytes(self.mm[off + SLOT_HEAD : off + SLOT_HEAD + n])

    def snapshot(self) -> list[WorkerInfo]:
        return [self.read(i) for i in range(self.slots)]

    # ------------------------------------------------------------ histograms

    def observe(
        self,
        slot: int,
        started: float,
        enqueued: float,
        task_type: str,
        data: bytes,
        succeeded: bool = False,
    ) -> None:
        """Worker: count one task whose handler ran in the histograms of
        ``slot``: ``started`` is when the worker took it (``time.monotonic()``),
        ``enqueued`` when it was queued or became due (the envelope's field;
        0: not known), ``data`` its envelope; one more started (and
        ``succeeded``) task of its type.  Plain stores in shared memory: no
        lock, no syscall."""
        self.observer(slot)(started, enqueued, task_type, data, succeeded)

    def observer(self, slot: int) -> Callable[..., None]:
        """``observe`` for one slot, bound once (a hot loop saves a call):
        ``(started, enqueued, task_type, data, succeeded=False)``."""
        w = self._slot_histograms(slot)
        return _no_observer if w is None else w.observe

    def tally(self, slot: int) -> Callable[[str, bytes, int], None]:
        """``count(task_type, data, outcome)`` of one slot: a failed, retried
        or dead-lettered task (``histograms.FAILED`` ...)."""
        w = self._slot_histograms(slot)
        return _no_tally if w is None else w.count

    def _slot_histograms(self, slot: int) -> hist.SlotHistograms | None:
        w = self._writers.get(slot)
        if w is None:
            if not self._hist_readable:
                return None  # a segment without histograms
            w = self._writers[slot] = hist.SlotHistograms(
                self.mm, self.offset(slot) + self.journal_end
            )
        return w

    def histograms(self) -> dict[tuple[str, str], hist.TaskTimes]:
        """Run time and queue wait by (task type, queue), summed over every
        slot (empty for a segment without histograms)."""
        out: dict[tuple[str, str], hist.TaskTimes] = {}
        if self._hist_readable:
            for slot in range(self.slots):
                hist.merge_into(out, hist.read_area(self.mm, self.offset(slot) + self.journal_end))
        return out

    def close(self) -> None:
        for w in self._writers.values():
            w.release()
        self._writers.clear()
        with contextlib.suppress(BufferError, ValueError):
            self.mm.close()

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _no_observer(
    started: float, enqueued: float, task_type: str, data: bytes, succeeded: bool = False
) -> None:
    pass


def _no_tally(task_type: str, data: bytes, outcome: int) -> None:
    pass


def server_holds(path: str, server_pid: int, created: float | None = None) -> bool:
    """Whether ``server_pid`` is alive and holds the segment ``path``.

    The pid in a pool's name and header is the server's pid in *its* pid
    namespace: seen from another one it can name an unrelated live process,
    and pid 1 (the server was a container's entrypoint) is always alive.  So
    the pid counts if that process maps the file.  When its mappings cannot
    be read (a process of another user, or with more privileges), a pid
    other than 1 is still trusted (keeping a stale file beats removing a
    live pool's, which its next worker could not attach); pid 1 never is:
    judge such a file by the processes that visibly map it."""
    if not pid_alive(server_pid, created):
        return False
    try:
        with open(f"/proc/{server_pid}/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return server_pid != 1
    return any(line.endswith(" " + path) for line in maps.splitlines())


def read_pool_states(
    bus_name: str,
    errors: dict[str, str] | None = None,
    histograms: dict[str, dict[tuple[str, str], hist.TaskTimes]] | None = None,
) -> dict[str, list[WorkerInfo]]:
    """Worker slots of every live server of ``bus_name`` on this machine
    (path -> slots), for ``ringbus stats``.  A server is live if the pid in
    the segment's name holds it or, failing that, some live process maps it
    (see ``server_holds``).  Segments that cannot be read or are refused (see
    ``PoolState.attach``) are skipped; with ``errors``, the reason for each
    goes there (path -> message); with ``histograms``, each segment's task
    times (path -> ``PoolState.histograms()``)."""
    prefix = _names.pool_prefix(bus_name)
    out: dict[str, list[WorkerInfo]] = {}
    try:
        names = sorted(os.listdir(_names.SHM_DIR))
    except OSError:
        return out
    mapped: dict[str, set[int]] | None = None
    for name in names:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :].split("-")
        if not rest[0].isdigit() or len(rest) > 2 or not all(r.isdigit() for r in rest):
            continue
        path = f"{_names.SHM_DIR}/{name}"
        if not server_holds(path, int(rest[0])) and not server_holds(path, os.getpid()):
            if mapped is None:  # other processes (this one is not in it)
                mapped = mapped_pids(_names.SHM_DIR)
            if not mapped.get("/" + name):
                continue
        try:
            ps = PoolState.attach(path, writable=False)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            if errors is not None:
                errors[path] = str(exc)
            continue
        try:
            out[ps.path] = ps.snapshot()
            if histograms is not None:
                histograms[ps.path] = ps.histograms()
        finally:
            ps.close()
    return out
