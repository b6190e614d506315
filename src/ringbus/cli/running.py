"""The tasks running now on this machine's workers of a bus, with their
progress (``ringbus stats``; issue 17).

A running worker slot holds its task's envelope in its journal (pool state
segment); the envelope names the task's id, and the bus's task table (shared
memory, or Redis with ``--transport``) holds its progress and message.
Nothing here writes: the task table file is only read (not created when missing).
"""

from __future__ import annotations

import os
from typing import Any

from ringbus import _names
from ringbus.server.pool_state import PoolState
from ringbus.tasks import envelope as env
from ringbus.transport.task_table import STATE_NAMES, TaskTable

__all__ = ["running_tasks"]


def _slots(paths: list[str]) -> list[tuple[int, str, int, bytes]]:
    """(worker pid, task type, attempt, task id) of every running slot."""
    out: list[tuple[int, str, int, bytes]] = []
    for path in paths:
        try:
            ps = PoolState.attach(path, writable=False)
        except (OSError, ValueError):  # gone, or refused (bus_snapshot says why)
            continue
        try:
            for slot in range(ps.slots):
                info = ps.read(slot)
                data = ps.inflight(slot) if info.state == "running" else None
                gid = env.task_gid(data) if data else env.NO_ID
                if gid != env.NO_ID:
                    out.append((info.worker_pid, info.task_type, info.attempt, gid))
        finally:
            ps.close()
    return out


def _table(bus: str, url: str | None) -> tuple[TaskTable | None, Any]:
    """The bus's task table for reading (and the transport to close)."""
    if url:
        from ringbus.transport.registry import make_transport

        t = make_transport(url)
        t.bind(bus)
        return t.task_table(), t
    path = _names.task_table_path(bus)
    if not os.path.exists(path):  # no task ever had a record: never make the file
        return None, None
    from ringbus.transport.shm_results import ShmTaskTable

    table = ShmTaskTable(path)
    return table, table


def running_tasks(bus: str, pool_paths: list[str], url: str | None = None) -> list[dict[str, Any]]:
    """One row per task running on the workers of ``pool_paths``: id, type,
    worker pid, attempt, state, progress (0..1 or None) and message."""
    slots = _slots(pool_paths)
    if not slots:
        return []
    table, closer = _table(bus, url)
    rows: list[dict[str, Any]] = []
    try:
        for pid, type_name, attempt, gid in slots:
            rec = None if table is None else table.get(gid)  # None: ended meanwhile
            state = rec.state if rec is not None and rec.state < len(STATE_NAMES) else 0
            rows.append(
                {
                    "id": gid.hex(),
                    "type": type_name,
                    "worker_pid": pid,
                    "attempt": rec.attempt if rec is not None else attempt,
                    "state": STATE_NAMES[state],
                    "progress": None if rec is None else rec.progress,
                    "message": "" if rec is None else rec.message,
                }
            )
    finally:
        if closer is not None:
            closer.close()
    return rows
