"""The demo web application: Starlette, served by uvicorn with several worker
processes, none of which created the task server.  Each imports ``bus`` from
here and dispatches to it by name, as a web application would.

- ``POST /signup``         queues a SendWelcomeEmail task (``bus.send``) and answers at once;
- ``POST /signup-inline``  delivers the mail itself before answering (the slow way);
- ``GET /report/{id}``     awaits a task's result (``await bus.dispatch_async``: taskwait).

Task workers serve the same ``bus``: ``ringbus worker ringbus.demo.app:bus -c 64``
runs up to 64 ``SendWelcomeEmail`` handlers at once in each worker, on its
event loop (the handler is ``async def`` and talks SMTP with aiosmtplib).
Configuration comes from the environment (the demo runner sets it):
``RINGBUS_DEMO_BUS`` (bus name) and ``RINGBUS_DEMO_SMTP`` (host:port of the mail server).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from ringbus import ShmTransport, TaskBus
from ringbus.demo.mailer import send_welcome, send_welcome_async

__all__ = ["BuildReport", "SendWelcomeEmail", "app", "bus"]

BUS_NAME = os.environ.get("RINGBUS_DEMO_BUS", "demo")
SMTP_HOST, _, _port = os.environ.get("RINGBUS_DEMO_SMTP", "127.0.0.1:8025").rpartition(":")
SMTP_PORT = int(_port)

# Every process of the demo (uvicorn's workers, the task workers) imports this
# one definition, so they all agree on the ring's geometry.  A worker with
# ``--concurrency 64`` reserves, in its pool-state segment in /dev/shm, one
# journal per task slot as large as the task ring's largest message (the task
# is copied there while it runs, so that a killed worker's tasks are delivered
# again): at the default of 1 MiB, 4 workers x 64 slots would reserve 256 MiB.
# A welcome mail task is a few hundred bytes: 64 KiB messages bring that down
# to 16 MiB.
bus = TaskBus(BUS_NAME, transport=ShmTransport(max_message_size=64 * 1024))


@dataclass
class SendWelcomeEmail:
    to: str
    name: str


@dataclass
class BuildReport:
    user_id: int
    rounds: int = 5_000


@bus.handler(SendWelcomeEmail)
async def send_welcome_email(task: SendWelcomeEmail) -> str:
    """Runs in a task worker: the slow SMTP conversation happens here, on the
    worker's event loop, while its other tasks wait for their own mail server."""
    return await send_welcome_async(SMTP_HOST, SMTP_PORT, task.to, task.name)


@bus.handler(BuildReport)
def build_report(task: BuildReport) -> dict[str, Any]:
    """Runs in a task worker: some CPU work whose result the request awaits."""
    digest = str(task.user_id).encode()
    for _ in range(task.rounds):
        digest = hashlib.sha256(digest).digest()
    return {"user_id": task.user_id, "digest": digest.hex()[:16], "worker_pid": os.getpid()}


async def _signup_fields(request: Request) -> tuple[str, str]:
    data = await request.json()
    return str(data["email"]), str(data.get("name", "friend"))


async def signup(request: Request) -> JSONResponse:
    email, name = await _signup_fields(request)
    # The ring has room for thousands of tasks, so this returns in microseconds.
    bus.send(SendWelcomeEmail(email, name))
    return JSONResponse({"queued": email}, status_code=202)


async def signup_inline(request: Request) -> JSONResponse:
    email, name = await _signup_fields(request)
    # The usual way: the request waits for the mail server.
    await run_in_threadpool(send_welcome, SMTP_HOST, SMTP_PORT, email, name)
    return JSONResponse({"sent": email}, status_code=201)


async def report(request: Request) -> JSONResponse:
    user_id = int(request.path_params["user_id"])
    result = await bus.dispatch_async(BuildReport(user_id), timeout=10)
    return JSONResponse(result)


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"ok {os.getpid()}")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    bus.close()  # removes this web worker's reply ring


app = Starlette(
    routes=[
        Route("/signup", signup, methods=["POST"]),
        Route("/signup-inline", signup_inline, methods=["POST"]),
        Route("/report/{user_id:int}", report, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ],
    lifespan=lifespan,
)


# uvicorn --workers N binds its listening socket with proto 0, so asyncio does not
# set TCP_NODELAY on the connections its workers accept (uvloop would): every
# keep-alive response then waits ~40 ms for the client's delayed ACK
# (https://github.com/Kludex/uvicorn/issues/3149).  The demo serves with this
# protocol (``--http ringbus.demo.app:NoDelayHTTP``) so that it measures the
# application, not that stall.
try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HTTPBase
except ImportError:  # no httptools: uvicorn's pure-Python h11 protocol
    from uvicorn.protocols.http.h11_impl import H11Protocol as _HTTPBase  # type: ignore[assignment]


class NoDelayHTTP(_HTTPBase):
    """uvicorn's HTTP protocol with Nagle's algorithm off on every connection."""

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
