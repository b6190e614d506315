"""Shared-memory transport: rings in ``/dev/shm``, no broker, one machine.

- task ring ``/ringbus-<bus>-tasks`` (``Queue.open``): it persists across
  servers (queued tasks wait for the next server) until ``destroy()``; with
  ``persistent=False`` the first process to open it owns it and it is
  removed when that process closes it or exits;
- reply ring ``/ringbus-<bus>-reply-<pid>-<random>`` per dispatching process,
  owned (auto-removed) by it; workers attach by name and keep a small cache
  of handles;
- record store (dead letters): an append-only file (``RecordFile``),
  ``/dev/shm/ringbus-<bus>-dead`` (RAM: a reboot clears it), or in
  ``record_dir`` (a directory on disk, to keep dead letters across reboots);
  at most ``record_max_bytes`` (64 MiB);
- limits segment ``/dev/shm/ringbus-<bus>-limits`` (``shm_limits``): the
  handlers' rate limits and concurrency caps, made on first use.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import re
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from ringbus import _names
from ringbus._proc import mapped_pids, pid_alive
from ringbus.errors import RingClosed, RingError, TransportClosed
from ringbus.queue import Queue
from ringbus.transport.base import JOURNAL_DATA_AT, Record, Transport
from ringbus.transport.record_file import DEFAULT_MAX_BYTES, RecordFile
from ringbus.transport.shm_limits import ShmLimitsMixin
from ringbus.transport.shm_queues import ShmQueues
from ringbus.transport.shm_results import DEFAULT_RECORD_SIZE, DEFAULT_SLOTS, ShmTaskTable
from ringbus.transport.shm_time import ShmTime

__all__ = ["ShmTransport"]

log = logging.getLogger("ringbus.transport")

_REPLY_CACHE_SIZE = 64
_STALL = 0.25  # seconds a full reply ring may go unread before results spill
_SPILL_CHECK = 1.0  # an idle reader looks at its spill file this often
_NAME_CHECK = 1.0  # an idle consumer checks its ring still has the bus's name this often


def _file_ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
_live_transports: weakref.WeakSet[ShmTransport] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for t in list(_live_transports):
        t._reset_process_state()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ShmTransport(ShmQueues, ShmTime, ShmLimitsMixin, Transport):
    """Shared-memory rings (``ringbus.Queue``); see the module docstring."""

    replies_poll_cheaply = True

    def __init__(
        self,
        *,
        maxsize: int = 0,
        slot_size: int = 256,
        max_message_size: int | None = None,
        reply_maxsize: int = 0,
        reply_max_message_size: int | None = None,
        persistent: bool = True,
        record_dir: str | None = None,
        record_max_bytes: int = DEFAULT_MAX_BYTES,
        task_slots: int = DEFAULT_SLOTS,
        task_record_size: int = DEFAULT_RECORD_SIZE,
    ) -> None:
        if record_max_bytes < 4096:
            raise ValueError(f"record_max_bytes must be >= 4096, not {record_max_bytes!r}")
        self.record_dir = record_dir
        self.record_max_bytes = int(record_max_bytes)
        self.maxsize = maxsize
        self.slot_size = slot_size
        self.max_message_size = max_message_size
        self.reply_maxsize = reply_maxsize
        self.reply_max_message_size = reply_max_message_size
        self.persistent = persistent
        self.task_slots = task_slots  # the task table's geometry (shm_results.py)
        self.task_record_size = task_record_size
        self._table: ShmTaskTable | None = None
        self._reset_process_state()
        _live_transports.add(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # Spawned workers get the configuration; handles are per process.
        return (_rebuild_shm, (self.bus_name, self._config()))

    def _config(self) -> dict[str, Any]:
        return {
            "maxsize": self.maxsize,
            "slot_size": self.slot_size,
            "max_message_size": self.max_message_size,
            "reply_maxsize": self.reply_maxsize,
            "reply_max_message_size": self.reply_max_message_size,
            "persistent": self.persistent,
            "record_dir": self.record_dir,
            "record_max_bytes": self.record_max_bytes,
            "task_slots": self.task_slots,
            "task_record_size": self.task_record_size,
        }

    def _reset_process_state(self) -> None:
        # Inherited handles are dropped, not closed: the parent keeps its
        # ownership, and a new lock replaces one another thread may have held.
        self._lock = threading.Lock()
        self._out: Queue | None = None
        self._in: Queue | None = None
        self._owned_tasks: Queue | None = None
        self._in_ident: tuple[int, int] | None = None
        self._reset_time()
        self._reset_queues()
        self._interrupted = False
        self._reply: Queue | None = None
        self._reply_addr = b""
        self._replies: OrderedDict[bytes, Queue] = OrderedDict()
        # (address, handle) of the last reply ring used: one tuple, read atomically.
        self._last: tuple[bytes, Queue | None] = (b"", None)
        # Reply addresses whose dispatcher is gone: later results are dropped at once.
        self._dead: OrderedDict[bytes, None] = OrderedDict()
        # Reply addresses not read for a while -> their read count then: later
        # results spill at once while that count stands still.
        self._stalled: OrderedDict[bytes, int] = OrderedDict()

    @property
    def task_ring_name(self) -> str:
        if not self.bus_name:
            raise RuntimeError("transport is not bound to a bus")
        return _names.task_ring_name(self.bus_name)

    def _reply_prefix(self) -> str:
        return _names.reply_prefix(self.bus_name)

    # ------------------------------------------------------------ tasks

    def _open_ring(self) -> Queue:
        name = self.task_ring_name
        if self.persistent:
            return Queue.open(
                name,
                self.maxsize,
                slot_size=self.slot_size,
                max_message_size=self.max_message_size,
            )
        try:
            return Queue.attach(name)
        except RingError:
            # Not persistent: the first process to open it owns it.
            q = Queue(
                self.maxsize,
                name=name,
                slot_size=self.slot_size,
                max_message_size=self.max_message_size,
            )
            self._owned_tasks = q
            return q

    def open(self) -> None:
        self._producer()

    def _producer(self) -> Queue:
        q = self._out
        if q is None:
            with self._lock:
                if self._out is None:
                    self._out = self._open_ring()
                q = self._out
        return q

    def put_task(self, data: bytes, timeout: float | None = None) -> None:
        q = self._out or self._producer()
        q.put_bytes(data, True, timeout)

    def put_tasks(self, items: list[bytes], timeout: float | None = None) -> None:
        q = self._out or self._producer()
        q.put_bytes_many(items, True, timeout)

    def _consumer(self) -> Queue:
        self._producer()
        with self._lock:
            if self._in is None:
                # A handle of its own, so interrupt() never closes the producer's.
                self._in = Queue.attach(self.task_ring_name)
                self._in_ident = _file_ident(_names.shm_path(self.task_ring_name))
            return self._in

    def get_tasks(self, max_items: int = 1, timeout: float | None = None) -> list[bytes]:
        q = self._in or self._consumer()
        if self._interrupted:  # also covers a signal that landed before self._in existed
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        if max_items == 1:
            return [q.get_bytes(True, timeout)]
        return q.get_bytes_many(max_items, True, timeout)

    def take_task(self, journal: Any, timeout: float | None = None) -> bytes:
        q = self._in or self._consumer()
        if self._interrupted:
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        return q.get_bytes_recorded(journal, 0, JOURNAL_DATA_AT, True, timeout)

    def task_taker(self, journal: Any) -> Callable[[], bytes]:
        if self._served is not None:  # serve() was called: a worker of a TaskServer
            groups = self._served_rings()
            if not self._fast(groups) and not self._interrupted:
                return self._multi_taker(journal, groups)
        self._rescan = False
        q = self._in or self._consumer()
        if self._interrupted:
            return functools.partial(self.take_task, journal)  # raises TransportClosed
        # interrupt() closes q: the bound method raises RingClosed, a TransportClosed.
        # It wakes with queue.Empty when idle: time for check_channel().
        return functools.partial(
            q.get_bytes_recorded, journal, 0, JOURNAL_DATA_AT, True, _NAME_CHECK
        )

    def check_channel(self) -> None:
        if not self._interrupted:
            self._check_queues()
        if self._in is None or self._interrupted:
            return
        if _file_ident(_names.shm_path(self.task_ring_name)) == self._in_ident:
            return
        log.error(
            "the task ring %s of bus %r was removed or made anew under this process; "
            "moving to the ring now under that name",
            self.task_ring_name,
            self.bus_name,
        )
        with self._lock:
            old = [self._in, self._out]
            self._in = self._out = None
        for q in old:
            if q is not None:
                q.close()
        self._consumer()

    def reply_putter(self, address: bytes) -> Callable[[bytes, bool], object] | None:
        if address in self._dead:
            return None
        with self._lock:
            q = self._attach_reply(address)
        # A handle evicted from the cache later is closed: its put raises.
        return None if q is None else q.put_bytes

    def interrupt(self) -> None:
        # Runs in signal handlers: no locks (the handler may have interrupted
        # a holder of self._lock in this very thread).
        self._interrupted = True
        q = self._in
        if q is not None:
            q.close()
        self._interrupt_queues()

    def pending_tasks(self) -> int:
        return self._producer().qsize()

    def max_task_size(self) -> int | None:
        return int(self._producer().max_message_size)

    def recover(self) -> int:
        try:
            out = self._producer().recover(requeue=True)
        except (RingError, RingClosed) as exc:
            log.warning("recovery of %s did not run: %s", self.task_ring_name, exc)
            return 0
        return int(out.get("recovered", 0))

    # ------------------------------------------------------------ replies

    def reply_address(self) -> bytes:
        if self._reply is None:
            with self._lock:
                if self._reply is None:
                    name = f"/{self._reply_prefix()}{os.getpid()}-{secrets.token_hex(4)}"
                    self._reply = Queue(
                        self.reply_maxsize,
                        name=name,
                        max_message_size=self.reply_max_message_size,
                    )
                    self._reply_addr = name.encode("ascii")
        return self._reply_addr

    def recv_replies(self, max_items: int, timeout: float | None = None) -> list[bytes]:
        q = self._reply
        if q is None:
            raise TransportClosed("no reply channel in this process")
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _SPILL_CHECK if end is None else min(_SPILL_CHECK, end - time.monotonic())
            try:
                batch = q.get_bytes_many(max_items, True, max(0.0, wait))
            except queue.Empty:
                batch = []
            # Results spill only while the ring is full: look after a backlog,
            # and now and then when idle (a spill may land just after one).
            if not batch or len(batch) >= max_items // 2:
                batch += self._take_spill()
            if batch:
                return batch
            if end is not None and time.monotonic() >= end:
                raise queue.Empty

    def _take_spill(self) -> list[bytes]:
        path = _names.spill_path(self._reply_addr.decode("ascii"))
        try:
            if os.stat(path).st_size == 0:
                return []
        except OSError:
            return []
        return [data for _, data in RecordFile(path).take()]

    def close_replies(self) -> None:
        with self._lock:
            q, addr = self._reply, self._reply_addr
            self._reply, self._reply_addr = None, b""
        if q is not None:
            q.close()  # wakes the reader; the owner also removes the name
            RecordFile(_names.spill_path(addr.decode("ascii"))).destroy()

    def _attach_reply(self, address: bytes) -> Queue | None:
        q = self._replies.get(address)
        if q is not None:
            self._replies.move_to_end(address)
            return q
        try:
            q = Queue.attach(address.decode("ascii"))
        except (RingError, ValueError, UnicodeDecodeError) as exc:
            log.warning("dropping a result: reply channel %r is gone (%s)", address, exc)
            return None
        self._replies[address] = q
        while len(self._replies) > _REPLY_CACHE_SIZE:
            _, old = self._replies.popitem(last=False)
            if old is self._last[1]:
                self._last = (b"", None)
            old.close()
        return q

    def _forget_reply(self, address: bytes) -> None:
        q = self._replies.pop(address, None)
        if self._last[0] == address:
            self._last = (b"", None)
        if q is not None:
            q.close()

    def send_reply(
        self, address: bytes, pid: int, data: bytes, patience: float | None = None
    ) -> bool:
        last_addr, q = self._last
        if q is None or address != last_addr:
            if address in self._dead:
                return False
            with self._lock:
                q = self._attach_reply(address)
                if q is None:
                    return False
                self._last = (address, q)
        try:
            q.put_bytes(data, False)
            return True
        except queue.Full:
            if address in self._dead:
                return False
        except RingClosed:
            return False
        return self._send_slow(q, address, pid, data, patience)

    def _send_slow(
        self, q: Queue, address: bytes, pid: int, data: bytes, patience: float | None
    ) -> bool:
        """The reply ring is full.  A dispatcher that reads, slowly, holds the
        worker back (bounded memory); one that stopped reading (SIGSTOP, a
        debugger) gets its results in a spill file beside its ring, so it never
        stops service for the others; one that is gone loses them."""
        give_up = None if patience is None else time.monotonic() + patience
        born: float | None = None
        path = _names.shm_path(address.decode("ascii"))
        stalled = self._stalled.get(address)
        reads = int(q.stats()["gets"])
        if stalled is not None and stalled == reads:
            return self._spill(address, data)  # still not reading: no wait
        self._stalled.pop(address, None)
        while True:
            step = _STALL if give_up is None else max(0.0, min(_STALL, give_up - time.monotonic()))
            try:
                q.put_bytes(data, True, step)
                return True
            except queue.Full:
                pass
            except RingClosed:
                return False
            st = q.stats()
            if born is None:
                born = st.get("created_unix_ns", 0) / 1e9 or None
            if not pid_alive(pid, born) or not os.path.exists(path):
                log.warning(
                    "dropping a result: dispatcher pid %d of reply channel %s is gone",
                    pid,
                    address.decode("ascii", "replace"),
                )
                with self._lock:
                    self._forget_reply(address)
                    self._dead[address] = None
                    while len(self._dead) > 1024:
                        self._dead.popitem(last=False)
                return False
            if int(st["gets"]) == reads:  # a whole step without one read
                log.warning(
                    "dispatcher pid %d does not read its reply channel %s: its results go "
                    "to %s until it does",
                    pid,
                    address.decode("ascii", "replace"),
                    _names.spill_path(address.decode("ascii")),
                )
                self._stalled[address] = reads
                while len(self._stalled) > 1024:
                    self._stalled.popitem(last=False)
                return self._spill(address, data)
            reads = int(st["gets"])
            if give_up is not None and time.monotonic() >= give_up:
                log.warning(
                    "dropping a result: reply channel %s stayed full for %.1f s",
                    address.decode("ascii", "replace"),
                    patience,
                )
                return False

    def _spill(self, address: bytes, data: bytes) -> bool:
        try:
            RecordFile(_names.spill_path(address.decode("ascii")), self.record_max_bytes).add(data)
        except OSError as exc:
            log.warning("dropping a result for %s: %s", address.decode("ascii", "replace"), exc)
            return False
        return True

    # ------------------------------------------------------------ records

    @property
    def record_path(self) -> str:
        if not self.bus_name:
            raise RuntimeError("transport is not bound to a bus")
        path = _names.dead_letter_path(self.bus_name)
        return path if self.record_dir is None else f"{self.record_dir}/{os.path.basename(path)}"

    def _records(self) -> RecordFile:
        return RecordFile(self.record_path, self.record_max_bytes)

    def add_record(self, data: bytes) -> str:
        return self._records().add(data)

    def records(self) -> list[Record]:
        return self._records().records()

    def take_records(
        self,
        ids: Iterable[str] | None = None,
        handle: Callable[[Record], object] | None = None,
    ) -> list[Record]:
        return self._records().take(ids, handle)

    # ------------------------------------------------------------ lifecycle

    def task_table(self) -> ShmTaskTable:
        t = self._table
        if t is None:
            with self._lock:
                if self._table is None:
                    path = _names.task_table_path(self.bus_name)
                    self._table = ShmTaskTable(path, self.task_slots, self.task_record_size)
                t = self._table
        return t

    def close(self) -> None:
        self.close_replies()
        with self._lock:
            handles = [self._out, self._in, *self._replies.values()]
            self._out = self._in = None
            self._replies.clear()
            self._last = (b"", None)
            owned, self._owned_tasks = self._owned_tasks, None
        for q in handles:
            if q is not None:
                q.close()
        self._close_queues()
        if owned is not None:
            owned.close()  # the owner removes the name
        if self._table is not None:
            self._table.close()
        self._close_time()
        self._close_limits()

    def users(self) -> list[int]:
        """Pids of the other live processes that map the task ring or the
        ring of another (queue, priority) of the bus."""
        maps = mapped_pids(_names.SHM_DIR)
        pids: set[int] = set()
        for name in [self.task_ring_name, *self._queue_ring_names()]:
            pids |= maps.get(name, set())
        return sorted(pids)

    def destroy(self, *, force: bool = False) -> None:
        """Remove the task ring, this process's reply ring and the reply rings
        left by dead dispatchers of this bus (live ones are left alone)."""
        self.close()
        users = [] if force else self.users()
        if users:
            raise RingError(
                f"bus {self.bus_name!r} is in use: pids {users} map its task ring "
                f"{self.task_ring_name} (a TaskServer, dispatchers); stop them first, "
                f"or destroy(force=True)"
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_names.shm_path(self.task_ring_name))
        self._destroy_queues()
        self._records().destroy()
        self.task_table().destroy()
        self._destroy_time()
        self._destroy_limits()
        stale = re.compile(re.escape(self._reply_prefix()) + r"(\d+)-[0-9a-f]+(\.spill)?$")
        try:
            names = os.listdir(_names.SHM_DIR)
        except OSError:
            return
        for name in names:
            m = stale.match(name)
            if m and not pid_alive(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{_names.SHM_DIR}/{name}")

    def describe(self) -> str:
        return f"shm:{self.task_ring_name}" if self.bus_name else "shm:(unbound)"


def _rebuild_shm(bus_name: str, config: dict[str, Any]) -> ShmTransport:
    t = ShmTransport(**config)
    if bus_name:
        t.bind(bus_name)
    return t
