"""ringbus: tasks from server processes to task workers through a lock-free
shared-memory ring (and over Redis Streams beyond one machine).

Names are loaded on first use: ``from ringbus import Queue`` imports the
ring and the queue only, no task code, and installs no fork or exit hooks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ringbus.errors import (
    BrokerUnavailable,
    BusClosed,
    CodecError,
    HeaderError,
    MessageTooLarge,
    NoHandlerError,
    RemoteError,
    RemoteTraceback,
    RingbusError,
    RingClosed,
    RingError,
    SignatureError,
    TaskError,
    TaskFailed,
    TaskTimeout,
    TransportClosed,
    Unrecoverable,
    UnsignedPickleError,
    WorkerLost,
)

if TYPE_CHECKING:
    from ringbus.cli.logs import TaskLogFilter
    from ringbus.queue import DEFAULT_CAPACITY, JoinableQueue, Queue
    from ringbus.server.executor import RingExecutor
    from ringbus.server.supervisor import TaskServer
    from ringbus.tasks.bus import TaskBus
    from ringbus.tasks.context import TaskContext, current_task
    from ringbus.tasks.dead_letters import DeadLetter
    from ringbus.tasks.handlers import RetryPolicy
    from ringbus.tasks.middleware import Middleware, TaskMessage
    from ringbus.tasks.status import TaskStatus
    from ringbus.transport.base import Transport
    from ringbus.transport.redis import RedisTransport
    from ringbus.transport.shm import ShmTransport

__version__ = "0.1.0"

# Public name -> the module that defines it (imported when the name is used).
_LAZY = {
    "DEFAULT_CAPACITY": "ringbus.queue",
    "JoinableQueue": "ringbus.queue",
    "Queue": "ringbus.queue",
    "RingExecutor": "ringbus.server.executor",
    "TaskServer": "ringbus.server.supervisor",
    "TaskBus": "ringbus.tasks.bus",
    "TaskContext": "ringbus.tasks.context",
    "current_task": "ringbus.tasks.context",
    "TaskStatus": "ringbus.tasks.status",
    "DeadLetter": "ringbus.tasks.dead_letters",
    "RetryPolicy": "ringbus.tasks.handlers",
    "Middleware": "ringbus.tasks.middleware",
    "TaskMessage": "ringbus.tasks.middleware",
    "TaskLogFilter": "ringbus.cli.logs",
    "Transport": "ringbus.transport.base",
    "RedisTransport": "ringbus.transport.redis",
    "ShmTransport": "ringbus.transport.shm",
}

__all__ = [
    "DEFAULT_CAPACITY",
    "BrokerUnavailable",
    "BusClosed",
    "CodecError",
    "DeadLetter",
    "HeaderError",
    "JoinableQueue",
    "MessageTooLarge",
    "Middleware",
    "NoHandlerError",
    "Queue",
    "RedisTransport",
    "RemoteError",
    "RemoteTraceback",
    "RetryPolicy",
    "RingClosed",
    "RingError",
    "RingExecutor",
    "RingbusError",
    "ShmTransport",
    "SignatureError",
    "TaskBus",
    "TaskContext",
    "TaskError",
    "TaskFailed",
    "TaskLogFilter",
    "TaskMessage",
    "TaskServer",
    "TaskStatus",
    "TaskTimeout",
    "Transport",
    "TransportClosed",
    "Unrecoverable",
    "UnsignedPickleError",
    "WorkerLost",
    "__version__",
    "current_task",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ringbus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
