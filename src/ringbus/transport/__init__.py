"""Transports: opaque bytes between dispatchers and workers.

``ShmTransport`` (shared-memory rings, no broker) and ``RedisTransport``
(Redis Streams) behind one interface, ``Transport``; ``make_transport``
turns a spec or URL into one.  Imported lazily: naming one loads only it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ringbus.errors import TransportClosed
from ringbus.transport.base import Transport
from ringbus.transport.registry import make_transport

if TYPE_CHECKING:
    from ringbus.transport.redis import RedisTransport
    from ringbus.transport.shm import ShmTransport

__all__ = ["RedisTransport", "ShmTransport", "Transport", "TransportClosed", "make_transport"]


def __getattr__(name: str) -> Any:
    if name == "ShmTransport":
        from ringbus.transport.shm import ShmTransport

        return ShmTransport
    if name == "RedisTransport":
        from ringbus.transport.redis import RedisTransport

        return RedisTransport
    raise AttributeError(f"module 'ringbus.transport' has no attribute {name!r}")
