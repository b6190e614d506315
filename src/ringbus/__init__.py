"""ringbus: tasks from server processes to task workers through a lock-free
shared-memory ring (and over Redis Streams beyond one machine)."""

from __future__ import annotations

from ringbus.bus import RetryPolicy, TaskBus
from ringbus.deadletter import DeadLetter
from ringbus.envelope import (
    BusClosed,
    NoHandlerError,
    RemoteTraceback,
    TaskError,
    TaskFailed,
    TaskTimeout,
    Unrecoverable,
    WorkerLost,
)
from ringbus.errors import MessageTooLarge, RingClosed, RingError
from ringbus.executor import RingExecutor
from ringbus.queue import DEFAULT_CAPACITY, JoinableQueue, Queue
from ringbus.server import TaskServer
from ringbus.transport import ShmTransport, Transport, TransportClosed

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CAPACITY",
    "BusClosed",
    "DeadLetter",
    "JoinableQueue",
    "MessageTooLarge",
    "NoHandlerError",
    "Queue",
    "RemoteTraceback",
    "RetryPolicy",
    "RingClosed",
    "RingError",
    "RingExecutor",
    "ShmTransport",
    "TaskBus",
    "TaskError",
    "TaskFailed",
    "TaskServer",
    "TaskTimeout",
    "Transport",
    "TransportClosed",
    "Unrecoverable",
    "WorkerLost",
    "__version__",
]
