"""The demo's mail server: a real SMTP server (aiosmtpd) in a process of its
own, on a free loopback port, that counts what it receives.

It waits ``delay`` seconds per message before it answers, as a real mail
server (DNS, spam checks, disk) makes its clients wait: that is the slow work
a request handler should not do itself.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any

from ringbus._proc import set_parent_death_signal

__all__ = ["CATEGORIES", "MailSink"]

CATEGORIES = ("inline", "ringbus", "warmup", "other")
"""Mail is counted by the local part of its recipient: ``inline-7@...`` -> inline."""


def _category(rcpt: str) -> int:
    local = rcpt.partition("@")[0]
    head = local.partition("-")[0]
    return CATEGORIES.index(head) if head in CATEGORIES else CATEGORIES.index("other")


class _CountingHandler:
    """aiosmtpd handler: wait ``delay``, count each recipient by category."""

    def __init__(self, counts: SynchronizedArray[int], delay: float) -> None:
        self.counts = counts
        self.delay = delay

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        with self.counts.get_lock():
            for rcpt in envelope.rcpt_tos:
                self.counts[_category(rcpt)] += 1
        return "250 Message accepted for delivery"


def _sink_main(
    counts: SynchronizedArray[int], port: Any, ready: Any, delay: float
) -> None:  # pragma: no cover - runs in the child
    os.setsid()  # Ctrl-C at the terminal reaches the demo only; it tears us down
    set_parent_death_signal(signal.SIGTERM)  # a killed demo leaves no sink
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from aiosmtpd.smtp import SMTP

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()

        def on_term() -> None:
            if not stop.done():
                stop.set_result(None)

        loop.add_signal_handler(signal.SIGTERM, on_term)
        handler = _CountingHandler(counts, delay)
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="ringbus-demo-sink", ident="ringbus demo sink"),
            host="127.0.0.1",
            port=0,
            # asyncio's default backlog of 100 drops the SYNs of a burst of
            # clients beyond it, which retry after 1 s: task workers with
            # --concurrency 64 open a few hundred connections at once.
            backlog=4096,
        )
        port.value = server.sockets[0].getsockname()[1]
        ready.set()
        try:
            await stop
        finally:
            server.close()

    asyncio.run(serve())


class MailSink:
    """A real SMTP server on a free loopback port, in a process of its own."""

    def __init__(self, delay: float = 0.05) -> None:
        ctx = mp.get_context("fork")
        self.delay = delay
        self._counts: SynchronizedArray[int] = ctx.Array("q", len(CATEGORIES))
        self._port = ctx.Value("i", 0)
        self._ready = ctx.Event()
        self._proc = ctx.Process(
            target=_sink_main,
            args=(self._counts, self._port, self._ready, delay),
            name="ringbus-demo-smtp",
            daemon=True,
        )
        self.host = "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self._port.value)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def start(self, timeout: float = 30) -> MailSink:
        self._proc.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError("the SMTP sink did not start")
        return self

    def counts(self) -> dict[str, int]:
        with self._counts.get_lock():
            values = [int(self._counts[i]) for i in range(len(CATEGORIES))]
        return dict(zip(CATEGORIES, values, strict=True))

    def stop(self, timeout: float = 5) -> None:
        p = self._proc
        if p.pid is None:
            return
        if p.is_alive():
            p.terminate()
            p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(timeout)

    def __enter__(self) -> MailSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
