"""A worker's claims on the task streams of ``RedisTransport``: taking over
the entries of workers that died (on every channel it serves, in taking
order), keeping its own entries claimed while their tasks run (on whatever
stream they came from), settling a buried task's entry, and trimming the
streams it acknowledged on."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque

from ringbus.transport.redis_channels import Chan, QueueChannels, envelope_of
from ringbus.transport.redis_conn import GROUP, NET_ERRORS, R, as_bytes, as_text, id_key, log, redis
from ringbus.transport.redis_identity import Identity
from ringbus.transport.redis_scripts import CLAIM, DROP_CONSUMER, KEEP

__all__ = ["Reclaims"]

_GONE = ("NOGROUP", "no such key")  # a channel stream not made yet, or deleted


class Reclaims(QueueChannels):
    """Claims of one worker process (a mixin of ``TaskChannel``)."""

    _identity: Identity
    _consumer: str
    _taken: deque[bytes]
    _to_ack: list[bytes]
    _keeper: threading.Thread | None
    _keeper_stop: threading.Event

    def _sender_holds(self) -> list[bytes]:
        return []

    def _reclaim(self, r: R, count: int, chans: list[Chan]) -> list[tuple[bytes, int, bytes]]:
        """Entries whose worker died, from the first channel that has any:
        those of dead processes on this host at once, the others once idle
        past the visibility timeout.  (envelope, deliveries, tag) each."""
        idle_ms = int(self.visibility_timeout * 1000)
        for c in chans:
            try:
                got = self._reclaim_local(r, c.key, count)
                if not got:
                    got = self._claim(r, c.key, idle_ms, count, "", "idle past the timeout")
            except redis.ResponseError as exc:
                if any(m in str(exc) for m in _GONE):
                    continue  # nothing was ever taken there
                raise
            if got:
                return got
        return []

    def _reclaim_local(self, r: R, key: str, count: int) -> list[tuple[bytes, int, bytes]]:
        grace_ms = int(min(self.visibility_timeout, 1.0) * 1000)
        for c in r.xinfo_consumers(key, GROUP):
            name = as_text(c.get("name", b""))
            pid = self._identity.dead_here(name)
            if not pid:
                continue  # alive, or not provably dead: the visibility timeout decides
            if not int(c.get("pending", 0)):
                self._script("drop", DROP_CONSUMER)(keys=[key], args=[GROUP, name])
                continue
            if int(c.get("idle", 0)) < grace_ms:
                continue
            got = self._claim(r, key, grace_ms, count, name, f"its worker pid {pid} died")
            if got:
                return got
        return []

    def _claim(
        self, r: R, key: str, idle_ms: int, count: int, owner: str, why: str
    ) -> list[tuple[bytes, int, bytes]]:
        """Take over entries of ``key`` idle for ``idle_ms`` (of ``owner`` only,
        if given), never one this consumer holds."""
        got = self._script("claim", CLAIM)(
            keys=[key],
            args=[GROUP, self._consumer, idle_ms, count, max(100, count), owner],
            client=r,
        )
        out: list[tuple[bytes, int, bytes]] = []
        for entry_id, flat, deliveries in got or ():
            entry_id = as_bytes(entry_id)
            fields = dict(zip(flat[::2], flat[1::2], strict=False))
            log.warning(
                "ringbus: worker %s took over task entry %s of %s (%s; delivery %d)",
                self._consumer,
                as_text(entry_id),
                key,
                why,
                int(deliveries),
            )
            tag = self.tag_of(key, entry_id)
            self._taken.append(tag)
            self._consumed.add(key)
            out.append((envelope_of(entry_id, fields, self.bus_name), int(deliveries), tag))
        return out

    def _start_keeper(self) -> None:
        """A thread that keeps this worker's entries claimed while their tasks
        run, so only those of dead or frozen workers are taken over (and of
        a worker whose handler holds the GIL past the visibility timeout:
        this thread cannot run then)."""
        if self._keeper is not None:
            return
        pid = os.getpid()
        period = self.visibility_timeout / 3
        stop = self._keeper_stop

        def keep() -> None:
            while not stop.wait(period) and os.getpid() == pid:
                tags = [*self._taken, *self._to_ack, *self._sender_holds()]
                for key, ids in self._by_stream(tags).items():
                    try:
                        self._script("keep", KEEP)(keys=[key], args=[GROUP, self._consumer, *ids])
                    except Exception as exc:  # the next round tries again
                        log.warning(
                            "ringbus: could not refresh claims of %s: %s", self._consumer, exc
                        )

        self._keeper = threading.Thread(target=keep, name="ringbus-redis-keeper", daemon=True)
        self._keeper.start()

    def settle(self, data: bytes) -> None:
        """Acknowledge the entry holding ``data`` pending at a dead consumer of
        this host (a supervisor buried the task of a worker it killed), on
        the channel its route names (every channel without a router)."""
        with contextlib.suppress(*NET_ERRORS, redis.ResponseError):
            r = self._redis()
            router = self.router
            if router is not None:
                keys = [self._chan_key(*router(data))]
            else:
                keys = list(self._all_channels(r).values())
            for key in keys:
                if self._settle_in(r, key, data):
                    return

    def _settle_in(self, r: R, key: str, data: bytes) -> bool:
        for c in r.xinfo_consumers(key, GROUP):
            name = as_text(c.get("name", b""))
            if not int(c.get("pending", 0)) or not self._identity.dead_here(name):
                continue
            for p in r.xpending_range(key, GROUP, "-", "+", 100, name):
                found = r.xrange(key, p["message_id"], p["message_id"])
                fields = found[0][1] if found else None
                if fields and fields.get(b"d", b"") == data:
                    r.xack(key, GROUP, p["message_id"])
                    return True
        return False

    def _trim_acked(self) -> None:
        """Trim the streams acknowledged on since the last time."""
        for key in list(self._ack_streams):
            self._ack_streams.discard(key)
            try:
                self._trim(self._redis(), key)
            except (*NET_ERRORS, redis.ResponseError) as exc:
                log.debug("ringbus: trimming %s skipped: %s", key, exc)

    def _trim(self, r: R, key: str) -> None:
        """Drop acknowledged entries once the stream is longer than
        stream_maxlen; never pending or undelivered ones (MINID below both)."""
        if r.xlen(key) <= self.stream_maxlen:
            return
        floor: bytes | None = None
        for g in r.xinfo_groups(key):
            if as_text(g.get("name", b"")) == GROUP:
                floor = g["last-delivered-id"]
        if floor is None or floor in (b"0-0", "0-0"):
            return
        summary = r.xpending(key, GROUP)
        if summary and summary.get("pending") and summary.get("min"):
            floor = min(floor, summary["min"], key=id_key)
        r.xtrim(key, minid=floor, approximate=True)

    def _drop_consumer(self) -> None:
        """This consumer leaves every stream it read or looked at (``TAKE``
        makes it a consumer of each served channel; it holds nothing)."""
        for key in {self.stream, *self._consumed, *(c.key for c in self._chans or ())}:
            with contextlib.suppress(Exception):
                self._script("drop", DROP_CONSUMER)(keys=[key], args=[GROUP, self._consumer])

    def _drop_stream_acks(self, key: str) -> None:
        """A stream was deleted: its finished entries are gone with it."""
        self._to_ack[:] = [t for t in self._to_ack if self._by_stream([t]).get(key) is None]
