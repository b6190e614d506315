"""A small closed-loop HTTP/1.1 load generator: ``concurrency`` keep-alive
connections send ``n`` requests in total, each timing its own request from
the first byte sent to the last byte of the answer.

It speaks just enough HTTP/1.1 over asyncio streams (one write per request,
Content-Length or chunked answers).  A general client such as httpx costs
more CPU per request than the demo's whole fire-and-forget request path (on
2 cores its connection pool alone pushed p50 from 2 ms to 15 ms), so it
would measure itself rather than the server.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["HTTPConnection", "LoadResult", "percentile", "run_load"]

# (method, path, JSON body or None) for request number i
RequestFactory = Callable[[int], tuple[str, str, Any]]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank on sorted values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """Send one request; return (status, body).  Reconnects if the server
        closed the connection."""
        reader, writer = await self._connect()
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        writer.write(head.encode("ascii") + b"\r\n" + data)  # one write: no Nagle stall
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            await self.close()
            raise ConnectionError("the server closed the connection") from None
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            payload = b"".join(chunks)
        else:
            payload = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


@dataclass
class LoadResult:
    """Latencies (seconds) of the successful requests, and the failures."""

    name: str
    requests: int
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall if self.wall > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": len(self.errors),
            "first_errors": self.errors[:3],
            "p50_ms": round(percentile(ms, 50), 3),
            "p99_ms": round(percentile(ms, 99), 3),
            "mean_ms": round(sum(ms) / len(ms), 3) if ms else math.nan,
            "max_ms": round(max(ms), 3) if ms else math.nan,
            "wall_s": round(self.wall, 4),
            "throughput_rps": round(self.throughput, 1),
        }


async def run_load(
    base_url: str,
    name: str,
    n: int,
    concurrency: int,
    make_request: RequestFactory,
    expect_status: tuple[int, ...] = (200, 201, 202),
    timeout: float = 60.0,
) -> LoadResult:
    """Send ``n`` requests over ``concurrency`` keep-alive connections."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    result = LoadResult(name, n)
    counter = iter(range(n))
    conns = [HTTPConnection(host, port) for _ in range(concurrency)]
    try:
        # Connect first: connection setup is not what we measure.
        await asyncio.gather(*(c.request("GET", "/health") for c in conns))

        async def one_client(conn: HTTPConnection) -> None:
            perf = time.perf_counter
            for i in counter:
                method, path, body = make_request(i)
                start = perf()
                try:
                    status, _ = await asyncio.wait_for(conn.request(method, path, body), timeout)
                except (
                    OSError,
                    EOFError,
                    asyncio.TimeoutError,
                    asyncio.LimitOverrunError,
                    ValueError,
                ) as exc:
                    result.errors.append(f"{method} {path}: {type(exc).__name__}: {exc}")
                    await conn.close()
                    continue
                elapsed = perf() - start
                if status in expect_status:
                    result.latencies.append(elapsed)
                else:
                    result.errors.append(f"{method} {path}: HTTP {status}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in conns))
        result.wall = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return result
