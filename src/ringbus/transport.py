"""The transport boundary: how envelopes (opaque bytes) move between processes.

The bus and the server only ever call the methods of ``Transport``; they do
not know whether the bytes travel through shared-memory rings
(``ShmTransport``, the default, no broker) or through a broker such as Redis
Streams (issue 6).  Every transport keeps per-process state (handles,
connections) and re-creates it after ``fork()``.

Channels:

- one task channel per bus, many producers (dispatchers) and many consumers
  (workers);
- one reply channel per dispatching process, written by any worker and read by
  the dispatcher's single reader thread.  Its *address* (opaque bytes) travels
  in each task's envelope.
"""

from __future__ import annotations

import abc
import contextlib
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

from ringbus.deadletter import DeadLetter, DeadLetterFile, requeue_envelope
from ringbus.errors import MessageTooLarge, RingClosed, RingError
from ringbus.queue import Queue

__all__ = [
    "MessageTooLarge",
    "ShmTransport",
    "Transport",
    "TransportClosed",
    "make_transport",
    "pid_alive",
    "validate_bus_name",
]

log = logging.getLogger("ringbus.transport")

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,120}$")


class TransportClosed(Exception):
    """The channel was closed or interrupted in this process (wakes blocked readers)."""


def validate_bus_name(name: str) -> str:
    """Bus names become parts of segment names: keep them short and portable."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid bus name {name!r}: use 1-120 characters among letters, digits, '.', '_', '-'"
        )
    return name


class Transport(abc.ABC):
    """Moves task and result envelopes; all methods are thread-safe.

    Producer side: ``put_task`` / ``put_tasks``.  Consumer side:
    ``get_tasks`` (blocking), ``ack_tasks`` (a broker acknowledges after the
    result was sent; a no-op on shared memory), ``interrupt`` (wakes a
    blocked ``get_tasks`` in this process, e.g. from a signal handler).
    Reply side: ``reply_address`` / ``recv_replies`` / ``close_replies`` in
    the dispatcher, ``send_reply`` in workers and supervisors.
    """

    bus_name: str = ""

    redelivers_lost_tasks: bool = False
    """True when the transport itself delivers again the tasks a dead consumer
    had taken (a broker's visibility timeout, with the attempt counted from
    its delivery count).  The server then leaves a dead worker's in-flight
    task to the transport instead of queueing it again itself."""

    def bind(self, bus_name: str) -> None:
        """Called once by the TaskBus that owns this transport."""
        if self.bus_name and self.bus_name != bus_name:
            raise ValueError(f"transport already bound to bus {self.bus_name!r}")
        self.bus_name = validate_bus_name(bus_name)

    # ------------------------------------------------------------ tasks

    @abc.abstractmethod
    def open(self) -> None:
        """Make sure the task channel exists (a server calls it at start)."""

    @abc.abstractmethod
    def put_task(self, data: bytes, timeout: float | None = None) -> None:
        """Queue one envelope; ``queue.Full`` if ``timeout`` passes first."""

    @abc.abstractmethod
    def put_tasks(self, items: list[bytes], timeout: float | None = None) -> None:
        """Queue envelopes in order; ``queue.Full`` carries ``.done`` (how many went)."""

    @abc.abstractmethod
    def get_tasks(self, max_items: int = 1, timeout: float | None = None) -> list[bytes]:
        """Wait for at least one envelope.

        ``queue.Empty`` when ``timeout`` passes, ``TransportClosed`` once
        ``interrupt()`` or ``close()`` was called in this process.
        """

    def get_task(self, timeout: float | None = None) -> bytes:
        """``get_tasks(1, timeout)[0]`` (a worker's hot path; override to speed it up)."""
        return self.get_tasks(1, timeout)[0]

    def take_task(
        self, record: Any, len_at: int, data_at: int, timeout: float | None = None
    ) -> bytes:
        """``get_task`` that also records the envelope in ``record`` (a worker's
        in-flight record: u32 length at ``len_at``, bytes at ``data_at``; length
        0 when it does not fit).  Shared memory records it before the ring
        frees the slots, so a kill at any instant loses nothing; a broker that
        redelivers unacknowledged tasks may record it afterwards (this default)."""
        data = self.get_task(timeout)
        mv = memoryview(record)
        n = len(data) if len(data) <= len(mv) - data_at else 0
        if n:
            mv[data_at : data_at + n] = data
        mv[len_at : len_at + 4] = n.to_bytes(4, "little")
        return data

    def task_taker(self) -> Callable[..., bytes]:
        """``take_task`` itself, or a faster callable with its signature that
        may also raise ``RingClosed`` for a closed channel (a worker's loop)."""
        return self.take_task

    def reply_putter(self, address: bytes) -> Callable[[bytes, bool], object] | None:
        """A direct ``put(data, block)`` into a reply channel, or None.  Any
        exception it raises means: deliver through ``send_reply`` instead."""
        return None

    def ack_tasks(self, n: int = 1) -> None:  # noqa: B027 - optional hook
        """The oldest ``n`` envelopes taken by ``get_tasks`` are finished."""

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Wake ``get_tasks`` in this process; later calls raise ``TransportClosed``.

        Must be safe to call from a signal handler.
        """

    @abc.abstractmethod
    def pending_tasks(self) -> int:
        """Envelopes waiting in the task channel (an estimate)."""

    def max_task_size(self) -> int | None:
        """Largest envelope the task channel takes, if it has a limit (sizes
        the workers' in-flight records)."""
        return None

    def recover(self) -> int:
        """Repair the task channel after a consumer or producer died mid-operation
        (a server calls it when it reaps a killed worker).  Returns how many
        envelopes were handed back for delivery; 0 where there is nothing to do."""
        return 0

    # ------------------------------------------------------------ replies

    @abc.abstractmethod
    def reply_address(self) -> bytes:
        """This process's reply channel, created on first use (and after fork)."""

    @abc.abstractmethod
    def recv_replies(self, max_items: int, timeout: float | None = None) -> list[bytes]:
        """Wait for results on this process's reply channel (``queue.Empty`` on
        timeout, ``TransportClosed`` after ``close_replies``)."""

    @abc.abstractmethod
    def close_replies(self) -> None:
        """Close and remove this process's reply channel (wakes its reader)."""

    @abc.abstractmethod
    def send_reply(
        self, address: bytes, pid: int, data: bytes, patience: float | None = None
    ) -> bool:
        """Deliver a result to a dispatcher's reply channel.

        Waits while the channel is full and its dispatcher (``pid``) lives;
        gives up (False, with a log line) when the dispatcher is gone or
        ``patience`` seconds passed.  ``MessageTooLarge`` propagates so the
        caller can send a smaller error instead.
        """

    # ------------------------------------------------------------ dead letters

    @abc.abstractmethod
    def dead_letter(self, data: bytes, reason: str, task_type: str = "", attempts: int = 0) -> str:
        """Keep a task envelope that failed for good, with the reason; returns
        the record's id.  The store outlives servers and dispatchers."""

    @abc.abstractmethod
    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter of the bus, oldest first."""

    @abc.abstractmethod
    def take_dead_letters(
        self,
        ids: Iterable[str] | None = None,
        handle: Callable[[DeadLetter], object] | None = None,
    ) -> list[DeadLetter]:
        """Remove the selected dead letters (all when ``ids`` is None) and
        return them; ``handle(letter)`` runs before each one is removed."""

    def retry_dead_letters(self, ids: Iterable[str] | None = None) -> int:
        """Queue the selected dead letters again (attempt 1, no deadline, no
        reply); returns how many."""

        def requeue(d: DeadLetter) -> None:
            self.put_task(requeue_envelope(d.data))

        return len(self.take_dead_letters(ids, requeue))

    def purge_dead_letters(self, ids: Iterable[str] | None = None) -> int:
        """Drop the selected dead letters; returns how many."""
        return len(self.take_dead_letters(ids))

    # ------------------------------------------------------------ lifecycle

    @abc.abstractmethod
    def close(self) -> None:
        """Release this process's handles (the channels stay)."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Remove the bus's channels and dead letters (queued tasks are dropped)."""

    def describe(self) -> str:
        return f"{type(self).__name__}({self.bus_name!r})"


def make_transport(spec: Transport | str | None) -> Transport:
    """``None`` -> shared memory; a ``Transport`` as is; URLs by scheme."""
    if spec is None:
        return ShmTransport()
    if isinstance(spec, Transport):
        return spec
    if isinstance(spec, str):
        if spec in ("shm", "shm://"):
            return ShmTransport()
        if spec.startswith(("redis://", "rediss://", "unix://")):
            try:
                from ringbus.redis_transport import RedisTransport
            except ImportError as exc:
                raise ValueError(f"the Redis transport is not available: {exc}") from exc
            return RedisTransport(spec)
        raise ValueError(f"unknown transport {spec!r}: use None, 'shm' or a redis:// URL")
    raise TypeError(f"transport must be a Transport, a URL or None, not {type(spec).__name__}")


# ---------------------------------------------------------------- shared memory

SHM_DIR = "/dev/shm"
_REPLY_CACHE_SIZE = 64
_live_transports: weakref.WeakSet[ShmTransport] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for t in list(_live_transports):
        t._reset_process_state()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _proc_start_unix(pid: int) -> float | None:
    """Start time of ``pid`` in Unix seconds, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    ticks = int(fields[19])
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return int(line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    except OSError:
        pass
    return 0.0


def pid_alive(pid: int, born_before: float | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, if ``born_before`` (Unix
    seconds) is given, started before then (guards against pid reuse)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _proc_start_unix(pid)
    if start is None:
        return False
    return not (born_before is not None and start > born_before + 1.0)


class ShmTransport(Transport):
    """Shared-memory rings (``ringbus.Queue``): no broker, one machine.

    - task ring ``/ringbus-<bus>-tasks``, opened with ``Queue.open``: it
      persists across servers (queued tasks wait for the next server) until
      ``destroy()``; with ``persistent=False`` the first process to open it
      owns it and it is removed when that process closes it or exits;
    - reply ring ``/ringbus-<bus>-reply-<pid>-<random>`` per dispatching
      process, owned (auto-removed) by it; workers attach by name and keep a
      small cache of handles.
    """

    def __init__(
        self,
        *,
        maxsize: int = 0,
        slot_size: int = 256,
        max_message_size: int | None = None,
        reply_maxsize: int = 0,
        reply_max_message_size: int | None = None,
        persistent: bool = True,
    ) -> None:
        self.maxsize = maxsize
        self.slot_size = slot_size
        self.max_message_size = max_message_size
        self.reply_maxsize = reply_maxsize
        self.reply_max_message_size = reply_max_message_size
        self.persistent = persistent
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
        }

    def _reset_process_state(self) -> None:
        # Inherited handles are dropped, not closed: the parent keeps its
        # ownership, and a new lock replaces one another thread may have held.
        self._lock = threading.Lock()
        self._out: Queue | None = None
        self._in: Queue | None = None
        self._owned_tasks: Queue | None = None
        self._interrupted = False
        self._reply: Queue | None = None
        self._reply_addr = b""
        self._replies: OrderedDict[bytes, Queue] = OrderedDict()
        # (address, handle) of the last reply ring used: one tuple, read atomically.
        self._last: tuple[bytes, Queue | None] = (b"", None)
        # Reply addresses whose dispatcher is gone: later results are dropped at once.
        self._dead: OrderedDict[bytes, None] = OrderedDict()

    @property
    def task_ring_name(self) -> str:
        if not self.bus_name:
            raise RuntimeError("transport is not bound to a bus")
        return f"/ringbus-{self.bus_name}-tasks"

    def _reply_prefix(self) -> str:
        return f"ringbus-{self.bus_name}-reply-"

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
            return self._in

    def get_tasks(self, max_items: int = 1, timeout: float | None = None) -> list[bytes]:
        q = self._in or self._consumer()
        if self._interrupted:  # also covers a signal that landed before self._in existed
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        try:
            if max_items == 1:
                return [q.get_bytes(True, timeout)]
            return q.get_bytes_many(max_items, True, timeout)
        except RingClosed as exc:
            raise TransportClosed(str(exc)) from None

    def get_task(self, timeout: float | None = None) -> bytes:
        q = self._in or self._consumer()
        if self._interrupted:
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        try:
            return q.get_bytes(True, timeout)
        except RingClosed as exc:
            raise TransportClosed(str(exc)) from None

    def take_task(
        self, record: Any, len_at: int, data_at: int, timeout: float | None = None
    ) -> bytes:
        q = self._in or self._consumer()
        if self._interrupted:
            raise TransportClosed(f"task channel of bus {self.bus_name!r} was interrupted")
        try:
            return q.get_bytes_recorded(record, len_at, data_at, True, timeout)
        except RingClosed as exc:
            raise TransportClosed(str(exc)) from None

    def task_taker(self) -> Callable[..., bytes]:
        q = self._in or self._consumer()
        if self._interrupted:
            return self.take_task  # raises TransportClosed
        # interrupt() closes q, so the bound method raises RingClosed then.
        return q.get_bytes_recorded

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
        try:
            return q.get_bytes_many(max_items, True, timeout)
        except RingClosed as exc:
            raise TransportClosed(str(exc)) from None

    def close_replies(self) -> None:
        with self._lock:
            q, self._reply, self._reply_addr = self._reply, None, b""
        if q is not None:
            q.close()  # wakes the reader; the owner also removes the name

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
        """The reply ring is full: the dispatcher is slow, or dead.  Never block
        forever on the ring of a process that is gone."""
        give_up = None if patience is None else time.monotonic() + patience
        born: float | None = None
        path = f"{SHM_DIR}/{address.decode('ascii').lstrip('/')}"
        while True:
            step = 0.5 if give_up is None else max(0.0, min(0.5, give_up - time.monotonic()))
            try:
                q.put_bytes(data, True, step)
                return True
            except queue.Full:
                pass
            except RingClosed:
                return False
            if born is None:
                born = q.stats().get("created_unix_ns", 0) / 1e9 or None
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
            if give_up is not None and time.monotonic() >= give_up:
                log.warning(
                    "dropping a result: reply channel %s stayed full for %.1f s",
                    address.decode("ascii", "replace"),
                    patience,
                )
                return False

    # ------------------------------------------------------------ dead letters

    @property
    def dead_letter_path(self) -> str:
        if not self.bus_name:
            raise RuntimeError("transport is not bound to a bus")
        return f"{SHM_DIR}/ringbus-{self.bus_name}-dead"

    def dead_letter(self, data: bytes, reason: str, task_type: str = "", attempts: int = 0) -> str:
        return DeadLetterFile(self.dead_letter_path).add(data, reason, task_type, attempts)

    def dead_letters(self) -> list[DeadLetter]:
        return DeadLetterFile(self.dead_letter_path).records()

    def take_dead_letters(
        self,
        ids: Iterable[str] | None = None,
        handle: Callable[[DeadLetter], object] | None = None,
    ) -> list[DeadLetter]:
        return DeadLetterFile(self.dead_letter_path).take(ids, handle)

    # ------------------------------------------------------------ lifecycle

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
        if owned is not None:
            owned.close()  # the owner removes the name

    def destroy(self) -> None:
        """Remove the task ring, this process's reply ring and the reply rings
        left by dead dispatchers of this bus (live ones are left alone)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{SHM_DIR}/{self.task_ring_name.lstrip('/')}")
        DeadLetterFile(self.dead_letter_path).destroy()
        stale = re.compile(re.escape(self._reply_prefix()) + r"(\d+)-[0-9a-f]+$")
        try:
            names = os.listdir(SHM_DIR)
        except OSError:
            return
        for name in names:
            m = stale.match(name)
            if m and not pid_alive(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{SHM_DIR}/{name}")

    def describe(self) -> str:
        return f"shm:{self.task_ring_name}" if self.bus_name else "shm:(unbound)"


def _rebuild_shm(bus_name: str, config: dict[str, Any]) -> ShmTransport:
    t = ShmTransport(**config)
    if bus_name:
        t.bind(bus_name)
    return t
