"""The bus over Redis Streams: the same handlers and futures beyond one machine.

    bus = TaskBus("shop", transport="redis://10.0.0.5:6379/0", secret=os.environ["RINGBUS_SECRET"])

Keys (``<bus>`` is the bus name; the braces are Redis Cluster hash tags):

- ``ringbus:{<bus>}:tasks``: the task stream, consumer group ``workers``, one
  consumer per worker process (``host:pid:boot.pidns.start``, see
  ``redis_identity``).  Workers read with XREADGROUP BLOCK and acknowledge
  (XACK) only after the result was sent, so a task is never lost: a worker
  that dies leaves its entry pending, and after ``visibility_timeout``
  seconds another worker takes it over (after about a second when the
  consumer's name proves it ran in this pid namespace of this boot and is
  gone).  Its attempt is counted from the entry's delivery count, so the
  retry limit and the dead letters work as on shared memory.  A worker
  running a long task keeps its entries claimed (a thread refreshes them
  while the handler lets Python threads run), and no worker takes over an
  entry it holds itself or one it has finished.
- ``ringbus:{<bus>}:tasks:<queue>:<priority>``: the stream of every other
  (queue, priority) channel, listed in the set ``ringbus:{<bus>}:channels``;
  same group, same guarantees (``redis_channels``).
- ``ringbus:{<bus>}:reply:<host>:<pid>:<random>``: a list per dispatching
  process, read by its reader with BLMPOP; ``...:alive`` (refreshed by that
  reader, expiring ``reply_ttl`` seconds after the process is gone) tells
  workers whether anyone still listens.
- ``ringbus:{<bus>}:dead``: the record store (dead letters).
- ``ringbus:{<bus>}:delayed``, ``:timers-bell``, ``:leader``, ``:schedule``:
  delayed tasks, the leader's wake-up list, its lease and the schedule state
  (``redis_time``).
- ``ringbus:{<bus>}:task:<id>``: a task's status record and kept result
  (``redis_status``), written by a dispatch in the round trip of its XADD.

Trimming only removes entries that the group has acknowledged.  Connection
errors: a dispatch raises ``BrokerUnavailable`` at once when Redis is down,
and when no answer came within its ``timeout`` (else ``socket_timeout``);
workers and readers log and retry with exponential backoff, losing nothing,
and workers create the task stream again when it was deleted under them.
Every dispatch sets its process's ``:alive`` key in the same round trip, so
a Redis restarted without persistence drops no result of a later task.

Batches: a concurrent worker reads as many entries as it has free slots
(``take_tasks``); its results and acknowledgements go out pipelined, one
round trip per batch (``redis_sender``); dispatches of a process's threads
that overlap share round trips (``redis_combine``).  Redis Cluster
(``redis+cluster://host:port``): every key of a bus shares the ``{<bus>}``
hash tag, so the transport talks to the one node that holds that slot.

The transport carries opaque bytes (each entry's field ``d``).  Its parts:
``redis_conn`` (options, connections, retries, the cluster node),
``redis_scripts`` and ``redis_queue_scripts`` (Lua), ``redis_tasks`` (taking
tasks), ``redis_channels`` (named queues and priorities: a stream per
channel), ``redis_reclaim`` (claims: dead workers' entries, the keeper),
``redis_combine`` (shared dispatch round trips), ``redis_sender`` (a
worker's results and acknowledgements), ``redis_identity`` (consumer names),
``redis_replies`` (reply lists), ``redis_records`` (the record store) and
``redis_time`` (delayed tasks, the leader); this module puts them together.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable
from typing import Any

from ringbus.errors import BrokerUnavailable, TransportClosed
from ringbus.transport.redis_conn import R, as_text
from ringbus.transport.redis_limits import RedisLimits
from ringbus.transport.redis_records import RecordStore
from ringbus.transport.redis_replies import ReplyChannel
from ringbus.transport.redis_status import RedisTaskTable
from ringbus.transport.redis_tasks import TaskChannel
from ringbus.transport.redis_time import RedisTime

__all__ = ["BrokerUnavailable", "RedisTransport"]

_live: weakref.WeakSet[RedisTransport] = weakref.WeakSet()


def _after_fork() -> None:
    for t in list(_live):
        t._reset_process_state()


os.register_at_fork(after_in_child=_after_fork)


class RedisTransport(TaskChannel, ReplyChannel, RecordStore, RedisTime):
    """Task, reply and dead-letter channels on a Redis server (see the module
    docstring).

    ``stream_maxlen``: past this many entries, acknowledged ones are trimmed
    (never pending or undelivered ones).  ``visibility_timeout``: seconds
    after which a task taken by a worker that stopped answering is delivered
    to another worker; a task may thus run twice if a worker is frozen (not
    dead) for longer than that, or if its handler holds the GIL that long
    (the thread that keeps its claims fresh cannot run).  ``reply_ttl``:
    seconds after which the reply key of a vanished dispatcher expires.
    """

    redelivers_lost_tasks = True
    spans_hosts = True
    _table_here: RedisTaskTable | None

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        stream_maxlen: int = 100_000,
        visibility_timeout: float = 60.0,
        reply_ttl: float = 60.0,
        socket_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            url,
            stream_maxlen=stream_maxlen,
            visibility_timeout=visibility_timeout,
            reply_ttl=reply_ttl,
            socket_timeout=socket_timeout,
        )
        _live.add(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # Spawned workers get the configuration; connections are per process.
        return (_rebuild, (self.url, self._config(), self.bus_name))

    def reply_putter(self, address: bytes) -> Callable[[bytes, bool], object] | None:
        """A worker's results go out through one sending thread, pipelined with
        the acknowledgements of the tasks that made them (``redis_sender``)."""
        key = address.decode("utf-8", "replace")
        if not key.startswith(f"{self._prefix}:reply:"):
            return None  # send_reply logs and drops it
        sender = self._sender or self._the_sender()
        return functools.partial(sender.put, key)

    def limits(self) -> RedisLimits:
        """Handlers' rate limits and caps, shared by every machine (one per
        process: made anew after fork)."""
        held = self.__dict__.get("_limits_held")
        if held is None or held[0] != os.getpid():
            lim = RedisLimits(self._redis, self._prefix, holder_ttl=self.visibility_timeout)
            held = self._limits_held = (os.getpid(), lim)
        return held[1]

    def task_table(self) -> RedisTaskTable:
        """Task status and kept results: a hash per task (``bus.status``);
        one table per process (made anew after fork)."""
        table = self._table_here
        if table is not None:
            return table
        held = self.__dict__.get("_table_held")
        if held is None or held[0] != os.getpid():
            with self._lock:  # one table: a record kept by another would never go out
                held = self.__dict__.get("_table_held")
                if held is None or held[0] != os.getpid():
                    held = self._table_held = (os.getpid(), RedisTaskTable(self))
        self._table_here = held[1]
        return held[1]

    def _local_table(self) -> RedisTaskTable | None:
        # On every dispatch: no getpid() (a system call); a child forgets it
        # at fork (_reset_process_state).
        table = self._table_here
        if table is None:
            held = self.__dict__.get("_table_held")
            if held is not None and held[0] == os.getpid():
                table = self._table_here = held[1]
        return table

    def _reset_process_state(self) -> None:
        super()._reset_process_state()
        self._table_here = None  # this process's task table (made on first use)

    def _dispatch_commands(self) -> list[tuple[Any, ...]]:
        # New task records ride in the round trip of their tasks (redis_status).
        cmds = super()._dispatch_commands()
        table = self._local_table()
        if table is not None:
            cmds += table.unsent()
        return cmds

    def _read_commands(self) -> list[tuple[Any, ...]]:
        # The tasks cancelled while queued, read after the tasks themselves:
        # a worker starts a task with no round trip of its own (redis_status).
        return self.task_table().read_commands()

    def _after_read(self, replies: list[Any]) -> None:
        self.task_table().after_read(replies)

    def _status_later(self, cmds: list[tuple[Any, ...]], wake: bool = True) -> bool:
        # A task's running, progress and end writes ride with the worker's
        # results (redis_sender): no round trip of their own, and the end is
        # written before the result reaches the caller.
        sender = self._sender or self._the_sender()
        try:
            sender.put_commands(cmds, wake)
        except TransportClosed:
            return False
        return True

    def _dispatch_failed(self, cmds: list[tuple[Any, ...]]) -> None:
        table = self._local_table()
        if table is not None:
            table.resend(cmds)

    def move_due(self) -> float | None:
        """Due delayed envelopes to the channel each one's route names (the
        task layer's ``router``: a retry or a delayed task of a named queue
        or a priority goes back to it)."""
        if self.router is None:
            return super().move_due()
        return self._move_routed(self._delayed_key)

    def close(self) -> None:
        """Send queued results, acknowledge finished tasks, drop this process's
        reply key and consumer (when it holds nothing), close the connections
        (the streams stay)."""
        held = self.__dict__.pop("_limits_held", None)
        if held is not None and held[0] == os.getpid():
            held[1].close()
        table = self._local_table()
        if table is not None:
            table.close()
        sender, self._sender = self._sender, None
        if sender is not None:
            self._to_ack.extend(sender.close(self.socket_timeout))
        self._close_tasks()
        self.close_replies()
        self._close_connections()

    def destroy(self, *, force: bool = False) -> None:
        """Delete the task, channel and dead-letter streams and the reply keys
        of dispatchers that are gone (live ones keep theirs)."""
        self.close()

        def drop(r: R) -> None:
            keys: list[Any] = [self.stream, self.dead_stream, *self._time_keys()]
            keys += self._channel_streams(r)
            keys += list(r.scan_iter(f"{self._prefix}:limit:*", count=1000))
            keys += list(r.scan_iter(f"{self._prefix}:task:*", count=1000))
            keys.append(f"{self._prefix}:cancelled")
            for k in r.scan_iter(f"{self._prefix}:reply:*", count=1000):
                name = as_text(k)
                if name.endswith(":alive"):
                    continue
                if not r.exists(f"{name}:alive"):
                    keys.append(k)
            r.delete(*keys)

        self._once(drop, "removing the bus")

    def describe(self) -> str:
        return f"redis:{self.where()} {self.stream}" if self.bus_name else "redis:(unbound)"


def _rebuild(url: str, config: dict[str, Any], bus_name: str) -> RedisTransport:
    t = RedisTransport(url, **config)
    if bus_name:
        t.bind(bus_name)
    return t
