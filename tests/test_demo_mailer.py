"""The demo's asyncio mail client: connections of its pool are reused, and one
the server closed while idle is replaced, with a real aiosmtpd server (in
this process, on a free loopback port).  Waits poll the connection's state,
never a time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("aiosmtpd")
pytest.importorskip("aiosmtplib")

from aiosmtpd.smtp import SMTP

from ringbus.demo.mailer import SENDER, pool_for, welcome_message


class _Recorder:
    def __init__(self) -> None:
        self.rcpts: list[str] = []
        self.peers: set[Any] = set()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.rcpts += envelope.rcpt_tos
        self.peers.add(session.peer)
        return "250 OK"


async def _serve(handler: _Recorder, idle_timeout: float) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="test-sink", timeout=idle_timeout), "127.0.0.1", 0
    )
    return server, server.sockets[0].getsockname()[1]


def test_one_connection_carries_mail_after_mail() -> None:
    async def run() -> tuple[list[str], int]:
        rec = _Recorder()
        server, port = await _serve(rec, 300)
        pool = pool_for("127.0.0.1", port)
        try:
            for i in range(5):
                to = f"user{i}@example.com"
                await pool.send(SENDER, [to], welcome_message(to, f"user{i}"))
        finally:
            pool.close()
            server.close()
        return rec.rcpts, len(rec.peers)

    rcpts, connections = asyncio.run(run())
    assert rcpts == [f"user{i}@example.com" for i in range(5)]
    assert connections == 1


def test_a_connection_the_server_closed_is_replaced() -> None:
    async def run() -> list[str]:
        rec = _Recorder()
        server, port = await _serve(rec, 0.2)  # the server drops idle clients
        pool = pool_for("127.0.0.1", port)
        try:
            first = "first@example.com"
            await pool.send(SENDER, [first], welcome_message(first, "a"))
            idle = pool._idle[0]
            while idle.is_connected:
                await asyncio.sleep(0.02)
            second = "second@example.com"
            await pool.send(SENDER, [second], welcome_message(second, "b"))
        finally:
            pool.close()
            server.close()
        return rec.rcpts

    assert asyncio.run(run()) == ["first@example.com", "second@example.com"]
