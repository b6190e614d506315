"""Tasks whose worker died holding them: deliver again, or bury and answer.

Used by the supervisor for its own workers, and at start (and by ``ringbus
gc``) for the workers of servers that died with them: a server and its
workers killed together (an OOM kill of the cgroup, ``systemctl kill -s
KILL``) leave their tasks in hand in the pool-state segment, and only a
later process can deliver them again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable

from ringbus import _names
from ringbus._proc import pid_alive
from ringbus.server.pool_state import PoolState, WorkerInfo, server_holds
from ringbus.tasks import envelope as env
from ringbus.tasks.dead_letters import DeadLetterStore
from ringbus.tasks.envelope import FLAG_REPLY
from ringbus.tasks.routing import put_envelope
from ringbus.transport.base import Transport
from ringbus.transport.task_table import FAILED, QUEUED

__all__ = ["LostTask", "adopt_orphaned_pools", "adopt_pool_file", "bury", "deliver_again"]

log = logging.getLogger("ringbus.server")


class LostTask:
    """The envelope a dead worker held, read with its pool slot."""

    __slots__ = ("allowed", "attempt", "hdr", "record", "reply", "type_name")

    def __init__(self, record: bytes, info: WorkerInfo | None) -> None:
        """Raises ``EnvelopeError`` for bytes that are no task envelope."""
        self.record = record
        self.hdr, self.reply, _ = env.decode_task_header(record)
        same = (
            info is not None and info.task_id == self.hdr.task_id and info.state == "running"
        )
        self.type_name = (info.task_type if same and info else "") or env.describe_envelope(
            record
        )[0]
        # The slot has the attempt in hand (retries raise it); the journal the
        # envelope as taken.
        self.attempt = max(self.hdr.attempt, info.attempt) if same and info else self.hdr.attempt
        self.allowed = info.max_deliveries if same and info else 0

    @property
    def what(self) -> str:
        return f"task #{self.hdr.task_id} ({self.type_name or 'unknown type'})"


def deliver_again(transport: Transport, task: LostTask, died: str) -> bool:
    """Queue the task again (attempt + 1) unless it used up its deliveries."""
    if task.allowed and task.attempt >= task.allowed:
        return False
    try:
        # Back to its own (queue, priority), which the envelope names.
        put_envelope(transport, env.with_attempt(task.record, task.attempt + 1), timeout=5.0)
    except Exception as exc:
        log.error("ringbus: %s; could not queue it again: %s", died, exc)
        return False
    log.warning("ringbus: %s; delivering it again (attempt %d)", died, task.attempt + 1)
    _mark(transport, task.record, QUEUED, task.attempt + 1)
    return True


def _mark(transport: Transport, record: bytes, state: int, attempt: int = 0) -> None:
    """Keep the task's status record true (``bus.status``) when a supervisor,
    not a worker, decides what becomes of it."""
    try:
        table = transport.task_table()
        gid = env.task_gid(record)
        if table is None or gid == env.NO_ID:
            return
        if state == FAILED:
            table.finish(gid, FAILED, 0.0, None)
        else:
            table.set_state(gid, state, attempt)
    except Exception:
        log.exception("ringbus: could not update the status of a dead worker's task")


def bury(
    transport: Transport, record: bytes, reason: str, type_name: str = "", attempt: int = 0
) -> bool:
    """Keep a dead worker's task in dead letters; the transport must not
    deliver it again (a broker would, after its visibility timeout)."""
    kept = False
    try:
        DeadLetterStore(transport).add(
            env.with_attempt(record, attempt) if attempt else record, reason, type_name, attempt
        )
        kept = True
    except Exception:
        log.exception("ringbus: could not keep a dead letter (%s)", reason)
    try:
        transport.settle(record)
    except Exception:
        log.exception("ringbus: could not settle a buried task (%s)", reason)
    _mark(transport, record, FAILED)
    return kept


def answer(
    transport: Transport,
    task: LostTask,
    status: int,
    text: str,
    encode_text: Callable[[int, int, str], bytes] = env.encode_text,
) -> None:
    """Tell the task's caller (if it waits) why it will get no result
    (``encode_text``: the bus codec's, which signs on a signed bus)."""
    if not (task.hdr.flags & FLAG_REPLY and task.reply):
        return
    try:
        transport.send_reply(
            task.reply, task.hdr.pid, encode_text(task.hdr.task_id, status, text), patience=5.0
        )
    except Exception:
        log.exception("ringbus: could not answer %s", task.what)


def adopt_orphaned_pools(
    transport: Transport,
    bus_name: str,
    encode_text: Callable[[int, int, str], bytes] = env.encode_text,
) -> int:
    """Deliver again the tasks in hand of dead servers' workers of this bus,
    then remove their pool-state segments; returns how many tasks were
    handed on.  A segment is left alone while its server or any of its
    workers lives (they finish their tasks), or while another process
    adopts it (an flock)."""
    prefix = _names.pool_prefix(bus_name)
    try:
        names = sorted(os.listdir(_names.SHM_DIR))
    except OSError:
        return 0
    handed = 0
    for name in names:
        if name.startswith(prefix):
            handed += adopt_pool_file(f"{_names.SHM_DIR}/{name}", transport, encode_text) or 0
    return handed


def adopt_pool_file(
    path: str,
    transport: Transport | None = None,
    encode_text: Callable[[int, int, str], bytes] = env.encode_text,
) -> int | None:
    """Adopt one pool-state segment (see ``adopt_orphaned_pools``): None when
    it is not an orphan (or not readable, or adopted by another process
    now), else how many tasks were handed on before it was removed.  With
    no ``transport``, the shared-memory transport of the pool's bus."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # another process adopts it now
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return None  # adopted and removed meanwhile
            pool = PoolState.attach(path, writable=False)
        except (OSError, ValueError):
            return None
        try:
            if server_holds(path, pool.server_pid, pool.created):
                return None
            slots = pool.snapshot()
            if any(pid_alive(s.worker_pid) for s in slots if s.worker_pid):
                return None  # workers of a dead server finish their tasks, then exit
            records = [(s, r) for s in slots if (r := pool.inflight(s.slot)) is not None]
            broker, bus_name = pool.broker, pool.bus_name
        finally:
            pool.close()
        handed = 0
        if records and not broker:  # a broker delivers them again by itself
            owned = transport is None
            if transport is None:
                from ringbus.transport.shm import ShmTransport

                transport = ShmTransport()
                transport.bind(bus_name)
            try:
                for info, record in records:
                    handed += _hand_on(transport, path, info, record, encode_text)
            finally:
                if owned:
                    transport.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return handed
    finally:
        os.close(fd)


def _hand_on(
    transport: Transport,
    path: str,
    info: WorkerInfo,
    record: bytes,
    encode_text: Callable[[int, int, str], bytes],
) -> int:
    try:
        task = LostTask(record, info)
    except env.EnvelopeError as exc:
        bury(transport, record, f"malformed envelope in an orphaned pool's journal: {exc}")
        return 0
    died = (
        f"the server of {os.path.basename(path)} died with worker pid {info.worker_pid} "
        f"running {task.what}"
    )
    if deliver_again(transport, task, died):
        return 1
    text = f"{died}, attempt {task.attempt} of at most {task.allowed or task.attempt}"
    log.error("ringbus: %s; it goes to dead letters", text)
    bury(transport, record, text, task.type_name, task.attempt)
    answer(transport, task, env.LOST, text, encode_text)
    return 0
