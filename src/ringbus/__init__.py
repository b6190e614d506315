"""ringbus: tasks from server processes to task workers through a lock-free
shared-memory ring (and over Redis Streams beyond one machine)."""

from __future__ import annotations

from ringbus.errors import MessageTooLarge, RingClosed, RingError
from ringbus.queue import DEFAULT_CAPACITY, JoinableQueue, Queue

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CAPACITY",
    "JoinableQueue",
    "MessageTooLarge",
    "Queue",
    "RingClosed",
    "RingError",
    "__version__",
]
