"""The contenders of the queue cells: how to make each one's channel.

A peer: make(size) -> a handle the forked children inherit; the kind says how
producers put and consumers get (bench/harness.py).  A peer that is not
installed (or Redis without a server) is not available and shows as n/a.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ctx = mp.get_context("fork")


@dataclass(frozen=True)
class Peer:
    name: str
    make: Callable[[int], Any]
    kind: str
    ours: bool = False
    per_call: bool = True  # one call per message (else batched)
    pickled: bool = True  # objects through the peer's serializer (else raw bytes)
    needs: str = ""  # module that must import
    # What producers send (bench.harness.payload); other than bytes: 64 B cells only.
    payload: str = "bytes"
    variant: bool = False  # another payload or serializer of a ringbus row (--tiny skips it)


def _ringbus_make(size: int) -> Any:
    import ringbus

    return ringbus.Queue(
        maxsize=max(8192, 8 * 1024 * 1024 // max(size, 256)),
        max_message_size=max(1 << 20, 2 * size + 64),
    )


def _ringbus_msgpack_make(size: int) -> Any:
    import ringbus

    return ringbus.Queue(
        maxsize=max(8192, 8 * 1024 * 1024 // max(size, 256)),
        max_message_size=max(1 << 20, 2 * size + 64),
        serializer="msgpack",
    )


def _ff_make(size: int) -> Any:
    import faster_fifo

    return faster_fifo.Queue(max_size_bytes=max(64 << 20, 8 * size))


def _mpq_make(size: int) -> Any:
    return ctx.Queue()


def _sq_make(size: int) -> Any:
    return ctx.SimpleQueue()


@dataclass
class ZmqHandle:
    endpoints: list[str]


def _zmq_make(size: int) -> ZmqHandle:
    import zmq  # noqa: F401 - availability

    base = tempfile.mkdtemp(prefix="rb-zmq-")
    return ZmqHandle([f"ipc://{base}/c{i}" for i in range(8)])


@dataclass
class RedisHandle:
    url: str
    key: str


_REDIS_URL: list[str] = []  # the bench's redis-server, set by set_redis_url


def set_redis_url(url: str | None) -> None:
    """The redis-server the Redis peers use (None: they are not available)."""
    _REDIS_URL[:] = [url] if url else []


def _redis_make(size: int) -> RedisHandle:
    import redis  # noqa: F401 - availability

    if not _REDIS_URL:
        raise ImportError("no redis-server")
    return RedisHandle(_REDIS_URL[0], f"rb-bench-{os.getpid()}-{time.monotonic_ns()}")


PEERS = [
    Peer("ringbus put/get (pickled)", _ringbus_make, "obj", True),
    Peer("ringbus put_bytes/get_bytes", _ringbus_make, "bytes", True, pickled=False),
    Peer("ringbus put/get str", _ringbus_make, "obj", True, payload="str", variant=True),
    Peer("ringbus put/get int", _ringbus_make, "obj", True, payload="int", variant=True),
    Peer("ringbus put/get small tuple", _ringbus_make, "obj", True, payload="tuple", variant=True),
    Peer(
        "ringbus put/get dict (pickled)", _ringbus_make, "obj", True, payload="dict", variant=True
    ),
    Peer(
        "ringbus put/get msgpack",
        _ringbus_msgpack_make,
        "obj",
        True,
        needs="msgspec",
        variant=True,
    ),
    Peer("ringbus put_many/get_many (pickled)", _ringbus_make, "objmany", True, per_call=False),
    Peer(
        "ringbus put_bytes_many/get_bytes_many",
        _ringbus_make,
        "bytesmany",
        True,
        per_call=False,
        pickled=False,
    ),
    Peer("multiprocessing.Queue", _mpq_make, "obj"),
    Peer("multiprocessing.SimpleQueue", _sq_make, "obj"),
    Peer("faster-fifo put/get", _ff_make, "obj", needs="faster_fifo"),
    Peer("faster-fifo get_many", _ff_make, "ffmany", per_call=False, needs="faster_fifo"),
    Peer("pyzmq PUSH/PULL ipc", _zmq_make, "zmq", pickled=False, needs="zmq"),
    Peer("Redis list RPUSH/BLPOP", _redis_make, "redis", pickled=False, needs="redis"),
    Peer(
        "Redis list batched",
        _redis_make,
        "redismany",
        per_call=False,
        pickled=False,
        needs="redis",
    ),
]


def available(peer: Peer) -> bool:
    if peer.needs:
        try:
            __import__(peer.needs)
        except ImportError:
            return False
    if peer.kind.startswith("redis") and not _REDIS_URL:
        return False
    return True


def close_handle(q: Any) -> None:
    """Close a peer's channel and remove what it left (socket dir, Redis key)."""
    if hasattr(q, "close"):
        with contextlib.suppress(Exception):
            q.close()
    if isinstance(q, ZmqHandle):
        shutil.rmtree(os.path.dirname(q.endpoints[0][len("ipc://") :]), ignore_errors=True)
    if isinstance(q, RedisHandle):
        import redis

        with contextlib.suppress(Exception):
            redis.Redis.from_url(q.url).delete(q.key)
