"""``multiprocessing.Queue``-compatible queues over a shared-memory ring.

The hot methods (put/get and their batch and bytes forms) live in the
extension class ``ringbus._ring.Ring``; this module only adds construction,
pickling and ``JoinableQueue``.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ringbus import _ring
from ringbus._ring import Ring

if TYPE_CHECKING:
    from ringbus._ring import Serializer

__all__ = ["DEFAULT_CAPACITY", "JoinableQueue", "Queue", "read_stats", "unlink_ring"]

DEFAULT_CAPACITY: int = _ring.DEFAULT_CAPACITY
"""Capacity in slots of a ``Queue(maxsize=0)``."""

_CREATE, _ATTACH, _OPEN = 0, 1, 2


def read_stats(name: str) -> dict[str, Any]:
    """Snapshot the ring ``name`` from outside: its header counters, geometry,
    flags and attached threads.  Takes no attach entry and changes nothing
    (what ``ringbus stats`` and ``ringbus ls`` show); RingError if there is
    no such ring or it is not one."""
    return _ring.read_stats(name)


def unlink_ring(name: str) -> None:
    """Remove the ring ``name``'s name (processes that map it keep working);
    RingError if there is no such ring."""
    _ring.unlink(name)


_Q = TypeVar("_Q", bound="Queue")


def _rebuild(cls: type[Queue], name: str, serializer: Serializer | str | None) -> Queue:
    return cls.attach(name, serializer=serializer)


class Queue(Ring):
    """A bounded multi-producer multi-consumer queue in POSIX shared memory.

    ``maxsize`` counts messages that fit one slot (``slot_size`` bytes); a
    larger message takes several consecutive slots.  ``maxsize=0`` means
    ``DEFAULT_CAPACITY`` slots.  ``max_message_size`` defaults to half the
    ring's bytes; a larger message is refused with ``MessageTooLarge``.

    The process that creates a queue owns its name and unlinks it when it
    closes the queue or exits; processes that attach never do.
    """

    __slots__ = ()  # no instance __dict__: method lookups go straight to the type

    def __init__(
        self,
        maxsize: int = 0,
        *,
        name: str | None = None,
        slot_size: int = _ring.DEFAULT_SLOT_SIZE,
        max_message_size: int | None = None,
        serializer: Serializer | str | None = None,
    ) -> None:
        self._open(name, _CREATE, maxsize, slot_size, max_message_size, serializer)

    @classmethod
    def attach(cls, name: str, *, serializer: Serializer | str | None = None) -> Queue:
        """Attach to an existing ring by name (its geometry comes from its header)."""
        q = cls.__new__(cls)
        q._open(name, _ATTACH, 0, 0, None, serializer)
        return q

    @classmethod
    def open(
        cls,
        name: str,
        maxsize: int = 0,
        *,
        slot_size: int = _ring.DEFAULT_SLOT_SIZE,
        max_message_size: int | None = None,
        serializer: Serializer | str | None = None,
    ) -> Queue:
        """Attach to ``name``, creating it first if it does not exist.

        A ring opened this way outlives every handle on it (nothing unlinks it
        automatically): use it for rings that must keep their messages across
        restarts, and ``unlink()`` it when it is no longer wanted.
        """
        q = cls.__new__(cls)
        q._open(name, _OPEN, maxsize, slot_size, max_message_size, serializer)
        return q

    def unlink(self) -> None:
        """Remove the ring's name now; open handles keep working.  On the
        creating handle it is idempotent (also after ``close()``, which
        already removed the name); elsewhere a missing name is a RingError."""
        self.unlink_name()

    def __reduce__(self) -> tuple[Any, ...]:
        # Attaching by name works under fork, spawn and forkserver alike.
        return (_rebuild, (type(self), self.name, self.serializer))

    def __enter__(self: _Q) -> _Q:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"qsize={self.qsize()}"
        kind = type(self).__name__
        return f"<{kind} {self.name} capacity={self.capacity} {state} pid={os.getpid()}>"


class JoinableQueue(Queue):
    """``Queue`` plus ``task_done()`` and ``join()``, counted across processes."""

    __slots__ = ()

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        self._task_add(1)
        try:
            super().put(obj, block, timeout)
        except BaseException:
            self._task_add(-1)
            raise

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    def put_bytes(
        self, data: bytes | bytearray | memoryview, block: bool = True, timeout: float | None = None
    ) -> None:
        self._task_add(1)
        try:
            super().put_bytes(data, block, timeout)
        except BaseException:
            self._task_add(-1)
            raise

    def put_many(self, items: Any, block: bool = True, timeout: float | None = None) -> None:
        items = list(items)
        self._task_add(len(items))
        try:
            super().put_many(items, block, timeout)
        except BaseException as exc:
            self._task_add(-(len(items) - getattr(exc, "done", 0)))
            raise

    def put_bytes_many(self, items: Any, block: bool = True, timeout: float | None = None) -> None:
        items = list(items)
        self._task_add(len(items))
        try:
            super().put_bytes_many(items, block, timeout)
        except BaseException as exc:
            self._task_add(-(len(items) - getattr(exc, "done", 0)))
            raise

    def task_done(self) -> None:
        """Mark one item taken by ``get`` as processed (ValueError if overcalled)."""
        self._task_done()

    def join(self, timeout: float | None = None) -> None:
        """Block until every item put has been marked ``task_done``.

        ``timeout`` is a ringbus extension; on expiry ``TimeoutError`` is raised.
        """
        if not self._task_join(timeout):
            raise TimeoutError(f"join() timed out with {self._unfinished()} unfinished tasks")
