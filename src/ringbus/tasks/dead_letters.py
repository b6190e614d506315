"""Dead letters: tasks whose last attempt failed, kept until someone looks.

A task lands here when its handler failed on its last allowed attempt (or
raised ``Unrecoverable``), when every worker that took it died (a poison
task), when it overran ``task_timeout``, or when its envelope could not be
decoded at all.  The letter keeps the whole envelope, so ``ringbus
dead-letters NAME --retry`` can queue the very same bytes again.

Letters live in the transport's record store (an append-only file in
``/dev/shm`` on shared memory, a stream on Redis); this module owns their
bytes.  Record body (little-endian)::

    0   1  version (1)
    1   8  f64 unix time
    9   2  u16 attempts
    11  2  u16 reason length r
    13  2  u16 task type length t
    15  r  reason (UTF-8), then t bytes task type, then the envelope
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

from ringbus.tasks.codec import requeue_task
from ringbus.tasks.envelope import describe_envelope
from ringbus.tasks.routing import put_envelope
from ringbus.tasks.signing import Signer, load_secret
from ringbus.transport.base import Record, Transport

if TYPE_CHECKING:
    from ringbus.tasks.codec import Codec

__all__ = ["BusDeadLetters", "DeadLetter", "DeadLetterStore"]

_VERSION = 1
_HEAD = struct.Struct("<BdHHH")
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


def encode_letter(data: bytes, reason: str, task_type: str = "", attempts: int = 0) -> bytes:
    if not task_type or not attempts:
        t, a = describe_envelope(data)
        task_type, attempts = task_type or t, attempts or a
    rb = reason.encode("utf-8", "replace")[:_MAX_TEXT]
    tb = task_type.encode("utf-8", "replace")[:_MAX_TEXT]
    head = _HEAD.pack(_VERSION, time.time(), min(attempts, 0xFFFF), len(rb), len(tb))
    return head + rb + tb + data


def decode_letter(record: Record) -> DeadLetter:
    """A record of the store as a letter (an unreadable one keeps its bytes)."""
    rid, body = record
    if len(body) < _HEAD.size or body[0] != _VERSION:
        return DeadLetter(rid, 0.0, "unreadable dead-letter record", "", 0, body)
    _, when, attempts, rl, tl = _HEAD.unpack_from(body)
    p = _HEAD.size
    reason = body[p : p + rl].decode("utf-8", "replace")
    ttype = body[p + rl : p + rl + tl].decode("utf-8", "replace")
    return DeadLetter(rid, when, reason, ttype, attempts, bytes(body[p + rl + tl :]))


class DeadLetterStore:
    """The dead letters of a bus, kept in its transport's record store.

    ``signer``: the bus's keys, to retry signed letters (which are checked,
    then signed anew); None takes them from ``$RINGBUS_SECRET`` when set.
    """

    def __init__(self, transport: Transport, signer: Signer | None = None) -> None:
        self.transport = transport
        self.signer = signer

    def add(self, data: bytes, reason: str, task_type: str = "", attempts: int = 0) -> str:
        """Keep a task envelope that failed for good; returns the letter's id."""
        return self.transport.add_record(encode_letter(data, reason, task_type, attempts))

    def letters(self) -> list[DeadLetter]:
        """Every dead letter of the bus, oldest first."""
        return [decode_letter(r) for r in self.transport.records()]

    def __len__(self) -> int:
        return len(self.transport.records())

    def take(
        self,
        ids: Iterable[str] | None = None,
        handle: Callable[[DeadLetter], object] | None = None,
    ) -> list[DeadLetter]:
        """Remove the selected letters (all when ``ids`` is None) and return
        them; ``handle(letter)`` runs before each one is removed."""

        def on_record(r: Record) -> None:
            if handle is not None:
                handle(decode_letter(r))

        return [decode_letter(r) for r in self.transport.take_records(ids, on_record)]

    def retry(self, ids: Iterable[str] | None = None) -> int:
        """Queue the selected letters again (attempt 1, no deadline, no
        reply); returns how many.  A signed letter whose tag does not verify
        raises ``SignatureError`` and stays (purge it)."""
        signer = self.signer
        if signer is None:
            keys = load_secret(None)
            signer = Signer(keys) if keys else None

        def requeue(d: DeadLetter) -> None:
            put_envelope(self.transport, requeue_task(d.data, signer))  # to its own queue

        return len(self.take(ids, requeue))

    def purge(self, ids: Iterable[str] | None = None) -> int:
        """Drop the selected letters; returns how many."""
        return len(self.take(ids))


class BusDeadLetters:
    """``TaskBus``'s dead-letter methods."""

    transport: Transport
    codec: Codec

    @property
    def dead_letter_store(self) -> DeadLetterStore:
        return DeadLetterStore(self.transport, self.codec.signer)

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter of the bus, oldest first."""
        return self.dead_letter_store.letters()

    def retry_dead_letters(self, ids: Iterable[str] | None = None) -> int:
        """Queue the selected dead letters again (all when ``ids`` is None)."""
        return self.dead_letter_store.retry(ids)

    def purge_dead_letters(self, ids: Iterable[str] | None = None) -> int:
        """Drop the selected dead letters (all when ``ids`` is None)."""
        return self.dead_letter_store.purge(ids)
