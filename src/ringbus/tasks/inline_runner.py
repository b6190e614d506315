"""Run one task envelope in this process: the worker's steps, for the inline bus.

The same steps as a worker (``server/worker.py``) on the same bytes:
unpickle the task, resolve its handler, run it with ``current_task()`` set
and its status record kept, retry by its policy (the backoff is recorded
on the transport, not slept), dead-letter the last failure, and answer the
dispatcher with a result message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import time
from typing import TYPE_CHECKING, Any

from ringbus._ids import format_id
from ringbus.errors import EnvelopeError, Unrecoverable
from ringbus.tasks import envelope as env
from ringbus.tasks.context import TaskContext, reset_current, set_current
from ringbus.tasks.envelope import FLAG_REPLY
from ringbus.tasks.tracking import Tracker, await_cancellable

if TYPE_CHECKING:
    from ringbus.tasks.bus import TaskBus
    from ringbus.transport.inline import InlineTransport

__all__ = ["run_envelope"]

log = logging.getLogger("ringbus.inline")


def _await(ctx: TaskContext, value: Any) -> Any:
    """An awaitable handler's result: on a fresh loop, in another thread
    when this one already runs a loop (``dispatch_async`` in a test)."""
    coro = await_cancellable(ctx, value)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    run = contextvars.copy_context().run  # current_task() in that thread too
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ringbus-inline") as ex:
        return ex.submit(run, asyncio.run, coro).result()


def run_envelope(bus: TaskBus, transport: InlineTransport, data: bytes) -> None:
    data = env.from_legacy(data, bus.codec.signer)  # the layout before task ids
    try:
        hdr, reply, start = env.decode_task_header(data)
    except EnvelopeError as exc:
        bus.dead_letter_store.add(data, f"malformed task envelope: {exc}")
        return
    tid, gid, attempt, flags = hdr.task_id, hdr.gid, hdr.attempt, hdr.flags
    codec = bus.codec  # the bus's serializer and signer, as on a worker
    tracker = Tracker(transport.task_table(), bus.name, codec)
    verify = codec.verify_task
    if verify is not None and (why := verify(data, flags)) is not None:
        bus.dead_letter_store.add(data, f"malformed task envelope: {why}")
        return

    def answer(out: bytes) -> None:
        if flags & FLAG_REPLY:
            transport.send_reply(reply, hdr.pid, out)

    mw = bus._mw  # middleware (tasks/middleware.py)

    def fail(exc: BaseException, type_name: str, keep: bool = True) -> None:
        if keep:
            reason = f"{type(exc).__name__}: {exc} (attempt {attempt})"
            bus.dead_letter_store.add(env.with_attempt(data, attempt), reason, type_name, attempt)
            if mw is not None:
                mw.dead_letter(bus, data, reason, type_name, attempt)
        out = codec.encode_error(tid, exc, flags)
        tracker.failed(data, out)
        answer(out)

    if hdr.deadline and time.monotonic() > hdr.deadline:
        out = codec.encode_text(tid, env.TIMEOUT, f"task #{tid} reached its deadline; not run")
        tracker.failed(data, out)
        answer(out)
        return
    type_name = ""
    try:
        task = codec.decode_task(data, start, flags, True)
        cls = type(task)
        type_name = f"{cls.__module__}.{cls.__qualname__}"
        fn = bus.resolve(cls)
        policy = bus.policy(cls)
    except Exception as exc:
        fail(exc, type_name)
        return
    ctx = tracker.begin(
        gid, attempt, type_name, policy.max_attempts, hdr.deadline, policy.keep_result
    )
    if ctx is None:
        tracker.cancelled(gid)
        answer(codec.encode_text(tid, env.CANCELLED, "cancelled"))
        return
    msg = None
    if mw is not None:  # the task's message for the hooks; the handler in them
        msg = mw.received(bus, data, task, gid, type_name, attempt)
        fn = mw.wrap(fn, msg)
    token = set_current(ctx)
    try:
        while True:
            try:
                value = fn(task)
                if inspect.isawaitable(value):
                    value = _await(ctx, value)
            except BaseException as exc:
                if ctx.cancelled:
                    tracker.cancelled(gid)
                    answer(codec.encode_text(tid, env.CANCELLED, "cancelled"))
                    return
                if not isinstance(exc, Exception) or isinstance(exc, Unrecoverable):
                    fail(exc, type_name, policy.dead_letter)
                    return
                if attempt >= policy.max_attempts:
                    fail(exc, type_name, policy.dead_letter)
                    return
                delay = policy.delay(attempt)
                transport.backoffs.append((format_id(gid), attempt, delay))
                if mw is not None:
                    mw.retry(bus, exc, attempt, delay)
                log.warning(
                    "ringbus inline: task %s (%s) raised %s: attempt %d of %d (backoff "
                    "%.3f s recorded, not slept)",
                    ctx.id, type_name, type(exc).__name__, attempt + 1, policy.max_attempts,
                    delay,
                )  # fmt: skip
                attempt += 1
                ctx.attempt = attempt
                tracker.again(gid, attempt)
                task = codec.decode_task(data, start, flags, True)  # fresh: it may be mutated
                continue
            if ctx.cancelled:
                tracker.cancelled(gid)
                answer(codec.encode_text(tid, env.CANCELLED, "cancelled"))
                return
            out = codec.encode_ok(tid, value, flags)
            tracker.done(gid, tid, value, policy.keep_result, out)
            answer(out)
            return
    finally:
        reset_current(token)
        if mw is not None and msg is not None:
            mw.finished(msg)
