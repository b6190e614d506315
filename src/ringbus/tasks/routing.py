"""Named queues and priorities on the task layer's side: which channel a task
goes to, and putting envelopes back into the channel they came from.

A task's channel is (its type's queue, the priority given at dispatch).
Tasks on the default queue at priority 0 keep today's envelope and path;
every other task carries its channel in the envelope's trailer
(``envelope.route``), so whoever queues it again (a supervisor after a
worker death, the scheduler when a delay ends, a retry, ``dead-letters
--retry``) puts it back where it belongs without the task's type.
"""

from __future__ import annotations

import queue
from typing import Any

from ringbus._names import DEFAULT_QUEUE
from ringbus.tasks import envelope as env
from ringbus.transport.base import Transport

__all__ = [
    "add_route",
    "check_priority",
    "put_envelope",
    "put_for",
    "put_routed_many",
    "route_for",
    "routed",
]

MAX_PRIORITY = 9


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise ValueError(f"priority must be an int in 0..{MAX_PRIORITY}, not {priority!r}")
    return priority


def route_for(registry: Any, cls: type, priority: Any) -> tuple[str, int] | None:
    """The channel of a task of type ``cls`` (None: the default one)."""
    p = check_priority(priority) if priority else 0
    q = registry.queue_of(cls)
    return None if q == DEFAULT_QUEUE and not p else (q, p)


def put_for(
    registry: Any, cls: type, priority: Any, data: bytes, timeout: float | None
) -> None:
    """Queue a task's envelope (built for the default route) on its channel."""
    chan = route_for(registry, cls, priority)
    if chan is None:
        registry.transport.put_task(data, timeout)
    else:
        registry.transport.put_task_to(chan[0], chan[1], add_route(registry, data, chan), timeout)


def routed(registry: Any, cls: type, priority: Any, data: bytes) -> bytes:
    """The envelope with its channel's trailer, where it needs one (delays)."""
    chan = route_for(registry, cls, priority)
    return data if chan is None else add_route(registry, data, chan)


def tagger(registry: Any) -> Any:
    """The bus's ``tag_task`` (a routed signed envelope is signed again)."""
    signer = registry.codec.signer
    return None if signer is None else signer.tag_task


def add_route(registry: Any, data: bytes, chan: tuple[str, int]) -> bytes:
    return env.route(data, chan[0], chan[1], tagger(registry))


def put_envelope(transport: Transport, data: bytes, timeout: float | None = None) -> None:
    """Queue an envelope again on the channel its trailer names."""
    q, p = env.route_of(data)
    if q == DEFAULT_QUEUE and not p:
        transport.put_task(data, timeout)
    else:
        transport.put_task_to(q, p, data, timeout)


def put_routed_many(
    registry: Any,
    chans: list[tuple[str, int] | None],
    datas: list[bytes],
    timeout: float | None,
) -> None:
    """``put_tasks`` for envelopes of several channels (None: the default
    one), runs of one channel per call, in order; ``queue.Full`` carries
    ``.done`` counted over all of them."""
    transport: Transport = registry.transport
    tag_task = tagger(registry)
    done = 0
    at = 0
    while at < len(datas):
        chan = chans[at]
        end = at
        while end < len(datas) and chans[end] == chan:
            end += 1
        part = datas[at:end]
        try:
            if chan is None:
                transport.put_tasks(part, timeout)
            else:
                items = [env.route(d, chan[0], chan[1], tag_task) for d in part]
                transport.put_tasks_to(chan[0], chan[1], items, timeout)
        except queue.Full as exc:
            exc.done = done + getattr(exc, "done", 0)  # type: ignore[attr-defined]
            raise
        done += len(part)
        at = end
