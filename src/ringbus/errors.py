"""Every exception ringbus raises, under one root: ``RingbusError``.

Pure Python (no imports of the package) so that the extension, the
transports and the task layer all raise the same classes.  Where a stdlib
base makes an error catchable the usual way (``OSError`` for a segment,
``ValueError`` for a bad size or a closed handle, ``TimeoutError`` for a
deadline), the class has that base too.
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "BusClosed",
    "CodecError",
    "EnvelopeError",
    "HeaderError",
    "MessageTooLarge",
    "NoHandlerError",
    "RemoteError",
    "RemoteTraceback",
    "RingClosed",
    "RingError",
    "RingbusError",
    "SignatureError",
    "TaskError",
    "TaskFailed",
    "TaskTimeout",
    "TransportClosed",
    "Unrecoverable",
    "UnsignedPickleError",
    "WorkerLost",
]


class RingbusError(Exception):
    """The root of every ringbus exception."""


# ---------------------------------------------------------------- ring and transport


class RingError(RingbusError, OSError):
    """A shared-memory ring could not be created, attached or used.

    The message says which: missing, truncated, foreign (wrong magic),
    newer/older layout, other user, unsafe permissions, bad name, no space.
    """


class MessageTooLarge(RingbusError, ValueError):
    """A message exceeds the ring's ``max_message_size`` (both sizes are named)."""

    def __init__(self, size: int, limit: int, name: str = "") -> None:
        where = f" of ring {name}" if name else ""
        super().__init__(f"message of {size} bytes exceeds max_message_size={limit} bytes{where}")
        self.size = size
        self.limit = limit


class TransportClosed(RingbusError):
    """A channel was closed or interrupted in this process (wakes blocked readers)."""


class RingClosed(TransportClosed, ValueError):
    """The ring handle was closed (message contains "is closed", like multiprocessing)."""


class BrokerUnavailable(RingbusError, ConnectionError):
    """The broker did not answer (the message says what was being done and where)."""


class EnvelopeError(RingbusError, ValueError):
    """Bytes on a task or reply channel are not a ringbus envelope."""


# ---------------------------------------------------------------- tasks


class HeaderError(RingbusError, ValueError):
    """A task's middleware headers cannot travel: not str -> str, or larger
    than the envelope allows (``envelope.MAX_HEADER_BYTES``).  Raised at
    dispatch; nothing was queued."""


class TaskError(RingbusError):
    """Base class of the task layer's own errors."""


class NoHandlerError(TaskError, LookupError):
    """No handler is registered for the task's type or any type in its MRO."""


class TaskTimeout(TaskError, TimeoutError):
    """The task missed its deadline (queued too long, or ran past a time limit)."""


class WorkerLost(TaskError):
    """The worker process running the task died before it answered."""


class TaskFailed(TaskError):
    """The task failed and its exception (or result) could not travel back as
    an object; the message carries the worker's formatted traceback."""


class CodecError(TaskFailed, ValueError):
    """A task or result could not be encoded or decoded: a payload that does
    not match the registered type (msgspec's message says where), an unknown
    task type name, a serializer the bus refuses, a bad signature."""


class SignatureError(CodecError):
    """A signed bus got a task or result whose tag is missing or does not
    verify with any of its secrets; nothing of it was decoded."""


class RemoteError(TaskFailed):
    """A handler's exception that travelled as text (msgpack/JSON buses):
    ``type_name``, ``message``; the worker's traceback is its ``__cause__``."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


class UnsignedPickleError(RingbusError, RuntimeError):
    """A bus over a network transport would move unsigned pickles (which run
    code when loaded): it refuses to dispatch and to serve."""


class Unrecoverable(TaskError):
    """Raise it in a handler to fail the task at once: no retry, whatever the
    handler's ``retries`` (the task goes to dead letters)."""


class BusClosed(TaskError):
    """The dispatching side of the bus was closed before the result arrived."""


class RemoteTraceback(RingbusError):
    """Set as ``__cause__`` of a remote exception: prints the worker's traceback
    (what ``concurrent.futures.process._RemoteTraceback`` does)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
