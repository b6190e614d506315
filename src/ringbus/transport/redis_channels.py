"""Named queues and priorities over Redis (issue 16): one stream per
(queue, priority) channel.

Keys, all under the bus's ``{<bus>}`` hash tag (one cluster slot, so the
Lua scripts may touch several):

- ("default", 0) is the task stream ``ringbus:{<bus>}:tasks``, unchanged;
- every other channel is the stream ``ringbus:{<bus>}:tasks:<queue>:<priority>``
  with the same consumer group, made by the first producer that uses it
  (the group from its first entry by the first worker that looks at it, so
  tasks queued before any server serves the queue wait there, durably);
- ``ringbus:{<bus>}:channels``: the set of those channels
  (``<queue>:<priority>``); every put on one adds it in the same round
  trip, and workers read it to know which streams to take from.

A worker with one stream to serve (the default queue alone and no priority
used: the common case) blocks on it with ``XREADGROUP``, as before.  With
several it runs ``TAKE`` (``redis_queue_scripts``): one round trip takes up
to its free slots from the first non-empty channel on (strict order, within
a batch too), and when all are empty tells the group's last-delivered id of
each, from which one ``XREAD BLOCK`` (it consumes nothing) wakes on the next
put to any of them; idle workers all wake and one takes the task.  A new
channel (the first priority-9 task) is seen by a busy worker's next take
(each read also asks ``SCARD`` of the set, so the order breaks by one batch
at most) and wakes an idle worker that serves several channels (its
``XREAD`` also waits on the served queues' other priorities); an idle
worker on one stream finds it within ``_slice`` seconds (at most 1 s: the
worker reads the set with its reclaim round).

Starvation: as on shared memory, after ``AGING_EVERY`` takes in a row from
above a queue's lowest priority, one take starts from its lowest non-empty
priority.

Delivery tags of the default stream stay entry ids; the others are
``<stream key>|<entry id>`` (``tag_of``), so acknowledgements, claims and
their keeper find each entry's stream.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from ringbus import _names
from ringbus.transport.redis_combine import Combiner
from ringbus.transport.redis_conn import GROUP, R, RedisBase, as_bytes, as_text, log, redis
from ringbus.transport.redis_queue_scripts import MOVE_ROUTED

__all__ = [
    "AGING_EVERY",
    "Chan",
    "QueueChannels",
    "create_group",
    "envelope_of",
    "split_tag",
    "stream_entries",
    "stream_lag",
]

AGING_EVERY = 32
"""Takes in a row from above a queue's lowest priority before one aging take."""

_DEFAULT = (_names.DEFAULT_QUEUE, 0)
_MOVE_BATCH = 512
_MEMBER = re.compile(r"^([A-Za-z0-9._-]{1,120}):([0-9])$")


class Chan(NamedTuple):
    """A served channel: its stream, its queue's number in the served list,
    and whether it is that queue's lowest priority in use (aging counts
    takes from above it)."""

    queue: str
    priority: int
    key: str
    group: int
    lowest: bool


def split_tag(tag: bytes, default: str) -> tuple[str, bytes]:
    """(stream key, entry id) of a delivery tag (see the module docstring)."""
    key, sep, entry_id = tag.rpartition(b"|")
    return (key.decode(), entry_id) if sep else (default, tag)


def stream_lag(r: R, key: str) -> int:
    """Entries of ``key`` not yet delivered to the group (all of them when it
    has no group yet; 0 when there is no such stream)."""
    try:
        groups = r.xinfo_groups(key)
    except redis.ResponseError:
        return 0  # no stream yet
    for g in groups:
        if as_text(g.get("name", b"")) != GROUP:
            continue
        if g.get("lag") is not None:
            return int(g["lag"])
        return len(r.xrange(key, b"(" + as_bytes(g["last-delivered-id"]), "+"))
    return int(r.xlen(key))


def create_group(r: R, key: str) -> None:
    """The stream ``key`` and its consumer group, from its first entry (so
    tasks queued before any worker existed are served)."""
    try:
        r.xgroup_create(key, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def stream_entries(resp: Any, bus_name: str) -> list[tuple[str, bytes, bytes]]:
    """(stream key, entry id, envelope) from a raw XREADGROUP reply (RESP2
    list or RESP3 map)."""
    if not resp:
        return []
    streams = resp.items() if isinstance(resp, dict) else resp
    out: list[tuple[str, bytes, bytes]] = []
    for key, entries in streams:
        for entry_id, fields in entries:
            if not fields:
                continue  # deleted meanwhile
            if not isinstance(fields, dict):
                fields = dict(zip(fields[::2], fields[1::2], strict=False))
            out.append((as_text(key), as_bytes(entry_id), envelope_of(entry_id, fields, bus_name)))
    return out


def envelope_of(entry_id: Any, fields: dict[bytes, bytes], bus_name: str) -> bytes:
    """The envelope an entry carries in its field ``d``.  An entry without
    one (written by something else) is handed out as an empty envelope, which
    the task layer dead-letters as malformed, then acknowledged like any
    other: it never stops a worker."""
    data = fields.get(b"d")
    if isinstance(data, bytes):
        return data
    log.error(
        "ringbus: task entry %s of bus %r has no envelope (fields %s); "
        "handing it out empty, to be dead-lettered",
        as_text(entry_id),
        bus_name,
        sorted(as_text(k) for k in fields)[:8],
    )
    return b""


class QueueChannels(RedisBase):
    """Channels of ``RedisTransport``: producers' puts, the served list,
    depths, due delayed tasks to their channel (a mixin of ``TaskChannel``)."""

    def _reset_process_state(self) -> None:
        super()._reset_process_state()
        self._served: list[str] | None = None
        self._chans: list[Chan] | None = None  # served channels in taking order
        self._chans_stale = True
        self._chan_count = -1  # members of the channel set when last read
        self._registered = False  # this process added its served queues to the set
        self._chan_puts: dict[tuple[str, int], Combiner] = {}
        self._chan_keys: dict[tuple[str, int], str] = {}
        self._consumed: set[str] = set()  # streams this process read as a consumer
        self._ack_streams: set[str] = set()  # streams acknowledged since the last trim
        self._streak = 0

    # -------------------------------------------------------- names

    @property
    def _registry(self) -> str:
        return f"{self._prefix}:channels"

    def _chan_key(self, queue_name: str, priority: int) -> str:
        key = self._chan_keys.get((queue_name, priority))
        if key is None:
            if (
                isinstance(priority, bool)
                or not isinstance(priority, int)
                or not 0 <= priority <= 9
            ):
                raise ValueError(f"priority must be an int in 0..9, not {priority!r}")
            _names.validate_queue_name(queue_name)
            if queue_name == _names.DEFAULT_QUEUE and priority == 0:
                key = self.stream
            else:
                key = f"{self._prefix}:tasks:{queue_name}:{priority}"
            self._chan_keys[(queue_name, priority)] = key
        return key

    def _task_key(self) -> str:
        """``self.stream``, looked up once (it is on every task's path)."""
        return self._chan_keys.get(_DEFAULT) or self._chan_key(*_DEFAULT)

    def tag_of(self, key: str, entry_id: bytes) -> bytes:
        """The delivery tag of entry ``entry_id`` of stream ``key``."""
        return entry_id if key == self._task_key() else key.encode() + b"|" + entry_id

    def _by_stream(self, tags: Iterable[bytes]) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        default = self._task_key()
        for tag in tags:
            key, entry_id = split_tag(tag, default)
            out.setdefault(key, []).append(entry_id)
        return out

    def _xack_commands(self, tags: list[bytes]) -> list[tuple[Any, ...]]:
        """One XACK per stream for delivery tags (also for ``redis_sender``)."""
        cmds: list[tuple[Any, ...]] = []
        for key, ids in self._by_stream(tags).items():
            self._ack_streams.add(key)
            cmds.append(("XACK", key, GROUP, *ids))
        return cmds

    # -------------------------------------------------------- producers

    def put_task_to(
        self, queue: str, priority: int, data: bytes, timeout: float | None = None
    ) -> None:
        if queue == _names.DEFAULT_QUEUE and priority == 0:
            self.put_task(data, timeout)
        else:
            self._chan_put(queue, priority).put([data], timeout)

    def put_tasks_to(
        self, queue: str, priority: int, items: list[bytes], timeout: float | None = None
    ) -> None:
        if queue == _names.DEFAULT_QUEUE and priority == 0:
            self.put_tasks(items, timeout)
        elif items:
            self._chan_put(queue, priority).put(items, timeout)

    def _chan_put(self, queue: str, priority: int) -> Combiner:
        """Overlapping puts of this process's threads on one channel share
        round trips (``redis_combine``), as on the task stream."""
        c = self._chan_puts.get((queue, priority))
        if c is None:
            key = self._chan_key(queue, priority)
            with self._lock:
                c = self._chan_puts.get((queue, priority))
                if c is None:
                    send = functools.partial(self._send_to, key, f"{queue}:{priority}")
                    c = self._chan_puts[(queue, priority)] = Combiner(send)
        return c

    def _send_to(self, key: str, member: str, items: list[bytes], timeout: float | None) -> None:
        cmds = self._dispatch_commands()
        cmds.append(("SADD", self._registry, member))  # before the entries: workers find them
        cmds += [("XADD", key, "*", b"d", data) for data in items]
        self._call(cmds, "queueing tasks", timeout)

    # -------------------------------------------------------- consumers

    def serve(self, queues: list[str]) -> None:
        """Takes from now on serve ``queues``, in this order (no request here:
        a worker started while Redis is down waits for it in its take)."""
        for q in queues:
            _names.validate_queue_name(q)
        self._served = list(queues)
        self._chans = None
        self._chans_stale = True

    def _default_chans(self) -> list[Chan]:
        return [Chan(_names.DEFAULT_QUEUE, 0, self.stream, 0, True)]

    def _channels_of(self, members: Iterable[Any]) -> list[Chan]:
        """The served channels in taking order, from the set's members (the
        priority-0 channel of each served queue is always among them)."""
        used: set[tuple[str, int]] = set()
        for m in members:
            found = _MEMBER.match(as_text(m))
            if found:
                used.add((found.group(1), int(found.group(2))))
        out: list[Chan] = []
        for n, q in enumerate(self._served or [_names.DEFAULT_QUEUE]):
            prios = [p for p in range(9, -1, -1) if p == 0 or (q, p) in used]
            out += [Chan(q, p, self._chan_key(q, p), n, p == prios[-1]) for p in prios]
        return out

    def _refresh_channels(self, r: R) -> list[Chan]:
        """Read the channel set (adding this process's served queues to it
        the first time, so ``ringbus stats`` lists them)."""
        if self._served is None:
            chans = self._default_chans()
        else:
            if not self._registered:
                # A server's queues have their channel from its start (tasks
                # may wait there), as the task stream has (``open``).
                ours = [q for q in self._served if q != _names.DEFAULT_QUEUE]
                for q in ours:
                    create_group(r, self._chan_key(q, 0))
                if ours:
                    r.sadd(self._registry, *(f"{q}:0" for q in ours))
                self._registered = True
            members = r.smembers(self._registry)
            self._chan_count = len(members)
            chans = self._channels_of(members)
        self._chans = chans
        self._chans_stale = False
        return chans

    # channels_key() stays None: a worker reads the set itself once per slice
    # (with its reclaim round, busy or idle), so no supervisor needs to ask
    # Redis on its behalf, nor wait for it while Redis does not answer.

    def rescan(self) -> None:
        # Signal-safe: a flag; the next take reads the set first.
        self._chans_stale = True

    def _watch_command(self) -> tuple[Any, ...]:
        """Sent ahead of every read of a worker: a change in the channel set
        (a first priority-9 task) is seen by the next take (one batch late
        at most), also while the worker is busy."""
        return ("SCARD", self._registry)

    def _watched(self, reply: Any) -> None:
        if not isinstance(reply, Exception) and int(reply) != self._chan_count:
            self._chans_stale = True

    def _unknown_channels(self, chans: list[Chan]) -> list[str]:
        """Streams of the served queues not (yet) in the set: an idle worker
        also waits on them, so the first put to a new channel wakes it."""
        known = {c.key for c in chans}
        out = []
        for q in self._served or [_names.DEFAULT_QUEUE]:
            out += [k for p in range(10) if (k := self._chan_key(q, p)) not in known]
        return out

    def _count_takes(self, chans: list[Chan], taken: Iterable[int]) -> None:
        """Aging: count takes from above a queue's lowest priority in use."""
        for i in taken:
            self._streak = 0 if chans[i].lowest else self._streak + 1

    def _aging(self, chans: list[Chan]) -> bool:
        return self._streak >= AGING_EVERY and any(not c.lowest for c in chans)

    # -------------------------------------------------------- looking on

    def _all_channels(self, r: R) -> dict[tuple[str, int], str]:
        out = {(_names.DEFAULT_QUEUE, 0): self.stream}
        for m in r.smembers(self._registry):
            found = _MEMBER.match(as_text(m))
            if found:
                q, p = found.group(1), int(found.group(2))
                out[(q, p)] = self._chan_key(q, p)
        return out

    def queue_depths(self) -> dict[tuple[str, int], int]:
        """Entries not yet delivered per channel of the bus (``ringbus stats``,
        the Prometheus collector)."""

        def look(r: R) -> dict[tuple[str, int], int]:
            chans = self._all_channels(r)
            return {c: stream_lag(r, key) for c, key in sorted(chans.items())}

        return self._once(look, "counting tasks per channel")

    def _channel_streams(self, r: R) -> list[Any]:
        """Every channel stream but the task stream, and the set (``destroy``);
        streams missing from the set (it was deleted) are found too."""
        keys: set[Any] = {k for k in self._all_channels(r).values() if k != self.stream}
        keys.update(as_text(k) for k in r.scan_iter(f"{self._prefix}:tasks:*", count=1000))
        return [*sorted(keys), self._registry]

    # -------------------------------------------------------- due tasks

    def _move_routed(self, delayed_key: str) -> float | None:
        """The leader's ``move_due`` with a router: each due envelope to the
        channel its route names, in due order, each moved once however many
        processes race (``MOVE_ROUTED``)."""
        router = self.router
        assert router is not None
        script = self._script("move_routed", MOVE_ROUTED)
        while True:
            now_ms = int(time.time() * 1000)
            due: list[bytes] = self._retrying(
                lambda r, now_ms=now_ms: r.zrangebyscore(  # type: ignore[misc]
                    delayed_key, "-inf", now_ms, start=0, num=_MOVE_BATCH
                ),
                "moving due tasks",
                patience=self.socket_timeout,
            )
            if due:
                keys, args = self._routes(delayed_key, due)
                self._retrying(
                    lambda r, k=keys, a=args: script(keys=k, args=a, client=r),  # type: ignore[misc]
                    "moving due tasks",
                    patience=self.socket_timeout,
                )
            if len(due) < _MOVE_BATCH:
                first = self._retrying(
                    lambda r: r.zrange(delayed_key, 0, 0, withscores=True),
                    "moving due tasks",
                    patience=self.socket_timeout,
                )
                return float(first[0][1]) / 1000.0 if first else None

    def _routes(self, delayed_key: str, due: list[bytes]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ``MOVE_ROUTED`` for the members ``due``."""
        router = self.router
        assert router is not None
        keys = [delayed_key, self._registry]
        at: dict[str, int] = {}
        args: list[Any] = []
        for m in due:
            q, p = router(m[8:])
            try:
                key = self._chan_key(q, p)
            except ValueError:  # a route no bus could make: the default channel
                q, p, key = _names.DEFAULT_QUEUE, 0, self.stream
            if key not in at:
                keys.append(key)
                at[key] = len(keys)
            member = "" if key == self.stream else f"{q}:{p}"
            args += [m, at[key], member]
        return keys, args
