"""The task layer: the bus, its handlers, envelopes, results and dead letters."""

from __future__ import annotations

from ringbus.tasks.bus import TaskBus
from ringbus.tasks.dead_letters import DeadLetter, DeadLetterStore
from ringbus.tasks.handlers import DEFAULT_REDELIVERIES, RetryPolicy

__all__ = ["DEFAULT_REDELIVERIES", "DeadLetter", "DeadLetterStore", "RetryPolicy", "TaskBus"]
