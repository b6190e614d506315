"""The server layer: worker processes, their supervisor and the executor."""

from __future__ import annotations

from ringbus.server.executor import RingExecutor
from ringbus.server.pool_state import PoolState, WorkerInfo, read_pool_states
from ringbus.server.supervisor import TaskServer

__all__ = ["PoolState", "RingExecutor", "TaskServer", "WorkerInfo", "read_pool_states"]
