"""The record store of ``RedisTransport``: a stream per bus (dead letters
live there), each entry one opaque record in its field ``d``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ringbus.transport.base import Record
from ringbus.transport.redis_conn import RedisBase, as_text

__all__ = ["RecordStore"]


class RecordStore(RedisBase):
    """``add_record`` / ``records`` / ``take_records`` on ``ringbus:{<bus>}:dead``."""

    def add_record(self, data: bytes) -> str:
        entry = self._retrying(
            lambda r: r.xadd(self.dead_stream, {b"d": data}),
            "keeping a record",
            patience=self.socket_timeout,
        )
        return as_text(entry)

    def records(self) -> list[Record]:
        entries = self._once(lambda r: r.xrange(self.dead_stream), "reading records")
        return [(as_text(eid), f.get(b"d", b"")) for eid, f in entries]

    def take_records(
        self,
        ids: Iterable[str] | None = None,
        handle: Callable[[Record], object] | None = None,
    ) -> list[Record]:
        want = None if ids is None else set(ids)
        taken: list[Record] = []
        for rec in self.records():
            if want is not None and rec[0] not in want:
                continue
            if handle is not None:
                handle(rec)  # first: a crash in between duplicates, never loses
            self._once(lambda r, i=rec[0]: r.xdel(self.dead_stream, i), "removing a record")  # type: ignore[misc]
            taken.append(rec)
        return taken
