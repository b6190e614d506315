"""The two ways the demo delivers a welcome mail: ``send_welcome`` with
blocking ``smtplib`` (the inline request handler, one thread per mail) and
``send_welcome_async`` with the asyncio client ``aiosmtplib`` (the task
workers' ``async def`` handler: dozens of conversations on one event loop,
over connections it keeps open).  The server is ``ringbus.demo.sink``.
"""

from __future__ import annotations

import asyncio
import smtplib
import weakref
from email.mime.text import MIMEText

import aiosmtplib

__all__ = ["SMTPPool", "pool_for", "send_welcome", "send_welcome_async", "welcome_message"]

SENDER = "welcome@ringbus.example"


def welcome_message(to: str, name: str) -> bytes:
    """The welcome mail as it goes over the wire.  ``MIMEText`` (the compat32
    policy) builds it in about 80 µs; ``EmailMessage`` with the default policy
    parses every header it is given and takes about 380 µs, more than the
    whole SMTP conversation costs the asyncio client."""
    msg = MIMEText(f"Hello {name},\n\nthanks for signing up.\n\n-- the ringbus demo\n", "plain")
    msg["From"] = SENDER
    msg["To"] = to
    msg["Subject"] = f"Welcome, {name}!"
    return msg.as_bytes()


def send_welcome(host: str, port: int, to: str, name: str) -> str:
    """Deliver one welcome mail over SMTP, blocking; returns the recipient."""
    # local_hostname: no DNS lookup of our own name on every connection.
    with smtplib.SMTP(host, port, local_hostname="localhost", timeout=30) as smtp:
        smtp.sendmail(SENDER, [to], welcome_message(to, name))
    return to


class SMTPPool:
    """Open SMTP connections to one server, reused mail after mail, as a mailer
    under load keeps them: opening a connection (TCP, greeting, EHLO, QUIT)
    costs the client and the server about as much CPU as the mail it carries
    (here 1.1 ms per mail on new connections, 0.6 ms on open ones).  Each
    connection carries one mail at a time; the pool opens another when all
    are busy, so it grows to the number of mails sent at once.  A pool belongs
    to one event loop (``pool_for``)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._idle: list[aiosmtplib.SMTP] = []

    async def send(self, sender: str, recipients: list[str], data: bytes) -> None:
        while self._idle:
            smtp = self._idle.pop()
            if not smtp.is_connected:
                continue
            try:
                await smtp.sendmail(sender, recipients, data)
            except aiosmtplib.SMTPServerDisconnected:
                # Closed by the server while idle (its timeout), so MAIL failed
                # and nothing went out; were it lost after DATA, the mail goes
                # twice, as any at-least-once task may run twice.
                continue
            except BaseException:
                smtp.close()
                raise
            self._idle.append(smtp)
            return
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname="localhost",  # no DNS lookup of our own name
            start_tls=False,  # the loopback sink offers no TLS
            timeout=30,
        )
        await smtp.connect()
        try:
            await smtp.sendmail(sender, recipients, data)
        except BaseException:
            smtp.close()
            raise
        self._idle.append(smtp)

    def close(self) -> None:
        for smtp in self._idle:
            smtp.close()
        self._idle.clear()


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, int], SMTPPool]]
_pools = weakref.WeakKeyDictionary()


def pool_for(host: str, port: int) -> SMTPPool:
    """The running event loop's pool of connections to ``host:port``."""
    pools = _pools.setdefault(asyncio.get_running_loop(), {})
    pool = pools.get((host, port))
    if pool is None:
        pool = pools[host, port] = SMTPPool(host, port)
    return pool


async def send_welcome_async(host: str, port: int, to: str, name: str) -> str:
    """Deliver one welcome mail over SMTP with aiosmtplib, on a connection
    of this event loop's pool; returns the recipient."""
    await pool_for(host, port).send(SENDER, [to], welcome_message(to, name))
    return to
