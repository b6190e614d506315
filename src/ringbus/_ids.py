"""Global task ids: 16 bytes in the envelope, 32 hex digits for people.

An id is ``nonce (8) + sequence (4) + slot (4)``: the nonce is drawn from
``os.urandom`` once per process (again after ``fork`` and when the sequence
wraps), so ids are unique across processes and machines without a system
call per dispatch.  ``slot`` is where the shared-memory task table keeps the
task's record (``NO_SLOT`` elsewhere): a lookup by id is one index, no
search.  To everyone but the task table the id is opaque.
"""

from __future__ import annotations

import itertools
import os
import re
import struct
import threading

__all__ = ["NO_SLOT", "current_pid", "format_id", "id_slot", "new_id", "parse_id"]

NO_SLOT = 0xFFFFFFFF
_TAIL = struct.Struct("<II")  # sequence, slot
_HEX = re.compile(r"[0-9a-f]{32}")


class _Ids:
    __slots__ = ("lock", "nonce", "pid", "seq")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()  # cached: os.getpid() is a system call
        self.nonce = os.urandom(8)
        # next() on a count is atomic under the GIL: no lock per id.
        self.seq = itertools.count(1)


_ids = _Ids()


def _after_fork_in_child() -> None:
    global _ids
    _ids = _Ids()  # a child must never repeat its parent's ids


os.register_at_fork(after_in_child=_after_fork_in_child)


def new_id(slot: int = NO_SLOT) -> bytes:
    """A fresh 16-byte task id whose record lives at ``slot``."""
    ids = _ids
    seq = next(ids.seq)
    if seq > 0xFFFFFFFF:  # wrapped: a new nonce keeps ids unique
        with ids.lock:
            if ids is _ids:
                _renew(ids)
        return new_id(slot)
    return ids.nonce + _TAIL.pack(seq, slot)


def _renew(ids: _Ids) -> None:
    global _ids
    fresh = _Ids()
    fresh.pid = ids.pid
    _ids = fresh


def current_pid() -> int:
    """This process's pid (kept up to date across ``fork``)."""
    return _ids.pid


def id_slot(gid: bytes) -> int:
    """The task-table slot named by an id."""
    return _TAIL.unpack_from(gid, 8)[1]


def format_id(gid: bytes) -> str:
    return gid.hex()


def parse_id(task_id: object) -> bytes:
    """The 16 bytes of a task id string; ``ValueError`` for anything else."""
    if not isinstance(task_id, str) or not _HEX.fullmatch(task_id.lower()):
        raise ValueError(f"not a ringbus task id (32 hex digits): {task_id!r}")
    return bytes.fromhex(task_id)
