"""Middleware hooks and headers across real processes, on shared memory and
over a real redis-server: the order of the hooks, the process each runs in,
the headers a worker sees (through dispatch, dispatch_many, send,
dispatch_async, delays, priorities, retries and ``dead-letters --retry``),
raising hooks that lose nothing, the header size check, the inline bus, and
the headers trailer's bytes."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _mw_tasks import (
    AlwaysFails,
    AsyncEcho,
    BigHeader,
    Echo,
    FailsTwice,
    Raiser,
    Recorder,
    Sleepy,
    log_to,
    make_bus,
    read_events,
)
from _redis_tasks import TEST_SECRET
from _tasks_support import bus_name_fixture, servers_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import HeaderError, TaskBus, TaskServer, TaskTimeout, Unrecoverable
from ringbus.errors import EnvelopeError
from ringbus.tasks import envelope as env
from ringbus.tasks.codec import requeue_task

ECHO = "_mw_tasks.Echo"
IN_ORDER = ["a", "b"]
REVERSED = ["b", "a"]


@pytest.fixture(name="kind", params=["shm", "redis"])
def kind_fixture(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(name="make")
def make_fixture(kind: str, bus_name: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``make(middleware, **kw) -> TaskBus`` on this test's transport; destroyed after."""
    made: list[TaskBus] = []

    def make(middleware: list[Any]) -> TaskBus:
        if kind == "redis":
            pytest.importorskip("redis", reason="redis-py is not installed")
            from ringbus.transport.redis import RedisTransport

            url = request.getfixturevalue("redis_server").url
            bus = make_bus(bus_name, middleware, transport=RedisTransport(url), secret=TEST_SECRET)
        else:
            bus = make_bus(bus_name, middleware)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        bus.destroy(force=True)


def _side(events: list[dict[str, Any]], task_id: str, hook: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("id") == task_id and e["hook"] == hook]


def _labels(events: list[dict[str, Any]]) -> list[str]:
    return [e["mw"] for e in events]


async def _dispatch_async(bus: TaskBus, task: Any) -> tuple[str, Any]:
    fut = bus.dispatch_async(task)
    return fut.task_id, await fut


@pytest.mark.parametrize("concurrency", [1, 4])
def test_hooks_run_in_order_in_the_process_of_their_event(
    make: Any, servers: list[TaskServer], tmp_path: Path, concurrency: int
) -> None:
    path = str(tmp_path / "events.jsonl")
    bus = make([Recorder("a", path), Recorder("b", path)])
    server = TaskServer(bus, workers=1, concurrency=concurrency)
    servers.append(server)
    server.start()
    me = os.getpid()

    fut = bus.dispatch(Echo(1))
    many = bus.dispatch_many([Echo(2), Echo(3)])
    later = bus.dispatch(Echo(4), delay=0.05)
    urgent = bus.dispatch(Echo(5), priority=7)  # a route trailer after the headers
    sent = bus.send(Echo(6))
    async_id, async_value = asyncio.run(_dispatch_async(bus, AsyncEcho(7)))
    futs = [fut, *many, later, urgent]
    values = [f.result(timeout=60) for f in futs] + [async_value]
    assert [v[0] for v in values] == [1, 2, 3, 4, 5, 7]
    worker_pid = values[0][1]
    assert worker_pid != me and all(v[1] == worker_pid for v in values)
    ids = [f.task_id for f in futs] + [sent, async_id]

    def processed() -> bool:
        ev = read_events(path)
        return all(len(_side(ev, i, "after_process")) == 2 for i in ids)

    wait_for(processed, 60, "every task's after_process hooks (the sent one has no result)")
    server.stop()
    events = read_events(path)

    headers = {"x-a": f"a-{me}", "x-b": f"b-{me}"}
    for task_id in ids:
        before = _side(events, task_id, "before_dispatch")
        assert _labels(before) == IN_ORDER
        assert before[1]["headers"] == {"x-a": f"a-{me}"}  # b runs after a added its header
        after = _side(events, task_id, "after_dispatch")
        assert _labels(after) == REVERSED
        assert all(e["pid"] == me and e.get("exception") is None for e in before + after)
        begin = _side(events, task_id, "before_process")
        end = _side(events, task_id, "after_process")
        assert _labels(begin) == IN_ORDER and _labels(end) == REVERSED
        for e in begin + end:
            assert e["pid"] == worker_pid
            assert e["headers"] == headers
            assert e["attempt"] == 1 and e["has_task"]
            assert e["queue"] == "default"
        assert all(e["current"] == task_id for e in begin)  # current_task() is set
        assert all(e["exception"] is None for e in end)
    assert [e["type"] for e in _side(events, async_id, "before_process")] == [
        "_mw_tasks.AsyncEcho"
    ] * 2
    assert _side(events, ids[0], "after_process")[0]["result"] == repr((1, worker_pid))
    start = [e for e in events if e["hook"] == "worker_start"]
    stop = [e for e in events if e["hook"] == "worker_stop"]
    assert _labels(start) == IN_ORDER and _labels(stop) == REVERSED
    assert {e["pid"] for e in start + stop} == {worker_pid}
    in_worker = [e["hook"] for e in events if e["pid"] == worker_pid]
    assert in_worker[:2] == ["worker_start"] * 2 and in_worker[-2:] == ["worker_stop"] * 2


@pytest.mark.parametrize("concurrency", [1, 4])
def test_retry_and_dead_letter_hooks_keep_the_headers(
    make: Any, servers: list[TaskServer], tmp_path: Path, concurrency: int
) -> None:
    path = str(tmp_path / "events.jsonl")
    bus = make([Recorder("a", path)])
    server = TaskServer(bus, workers=1, concurrency=concurrency)
    servers.append(server)
    server.start()
    me = os.getpid()
    headers = {"x-a": f"a-{me}"}

    ok = bus.dispatch(FailsTwice(7))
    bad = bus.dispatch(AlwaysFails(1))
    assert ok.result(timeout=60) == 7
    with pytest.raises(Unrecoverable):
        bad.result(timeout=60)
    wait_for(lambda: _side(read_events(path), bad.task_id, "on_dead_letter"), 60, "the letter")

    events = read_events(path)
    begin = _side(events, ok.task_id, "before_process")
    assert [e["attempt"] for e in begin] == [1, 2, 3]
    end = _side(events, ok.task_id, "after_process")
    assert [e["exception"] for e in end] == ["ValueError", "ValueError", None]
    retries = _side(events, ok.task_id, "on_retry")
    assert [e["attempt"] for e in retries] == [1, 2]
    assert all(e["exception"] == "ValueError" and e["delay"] > 0 for e in retries)
    assert all(e["headers"] == headers for e in begin + end + retries)  # through the retries
    assert not _side(events, ok.task_id, "on_dead_letter")

    assert [e["attempt"] for e in _side(events, bad.task_id, "on_retry")] == [1]
    (letter,) = _side(events, bad.task_id, "on_dead_letter")
    assert letter["attempt"] == 2 and "Unrecoverable" in letter["reason"]
    assert letter["has_task"] and letter["headers"] == headers and letter["pid"] != me

    # dead-letters --retry queues the same bytes: the headers come along.
    assert bus.retry_dead_letters() == 1
    wait_for(
        lambda: len(_side(read_events(path), bad.task_id, "on_dead_letter")) == 2,
        60,
        "the retried letter to fail again",
    )
    server.stop()
    again = _side(read_events(path), bad.task_id, "before_process")
    assert [e["attempt"] for e in again] == [1, 2, 1, 2]
    assert all(e["headers"] == headers for e in again)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_raising_hook_loses_nothing(
    make: Any,
    servers: list[TaskServer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    concurrency: int,
) -> None:
    path = str(tmp_path / "events.jsonl")
    worker_log = tmp_path / "worker.log"
    bus = make([Raiser(path), Recorder("a", path)])
    server = TaskServer(
        bus,
        workers=1,
        concurrency=concurrency,
        initializer=log_to,
        initargs=(str(worker_log),),
    )
    servers.append(server)
    server.start()
    with caplog.at_level(logging.ERROR, logger="ringbus.middleware"):
        ok = bus.dispatch(Echo(1))
        aok = bus.dispatch(AsyncEcho(4))  # on the loop when concurrency > 1
        flaky = bus.dispatch(FailsTwice(2))
        bad = bus.dispatch(AlwaysFails(3))
        assert ok.result(timeout=60)[0] == 1  # the result still arrives
        assert aok.result(timeout=60)[0] == 4
        assert flaky.result(timeout=60) == 2  # the retries still happen
        with pytest.raises(Unrecoverable):
            bad.result(timeout=60)
    wait_for(lambda: _side(read_events(path), bad.task_id, "on_dead_letter"), 60, "the letter")
    server.stop()

    dispatched = caplog.text
    for hook in ("before_dispatch", "after_dispatch"):
        assert f"Raiser.{hook} raised" in dispatched
    text = worker_log.read_text()
    for hook in (
        "worker_start",
        "before_process",
        "after_process",
        "on_retry",
        "on_dead_letter",
        "worker_stop",
    ):
        assert f"Raiser.{hook} raised" in text, hook
    assert "hook before_process raised on purpose" in text  # with its traceback
    events = read_events(path)
    ran = {e["hook"] for e in events if e["mw"] == "raiser"}
    assert ran == {
        "before_dispatch",
        "after_dispatch",
        "worker_start",
        "before_process",
        "after_process",
        "on_retry",
        "on_dead_letter",
        "worker_stop",
    }
    # The other middleware ran every hook too, with the header the raiser added.
    begin = _side(events, flaky.task_id, "before_process")
    assert [e["attempt"] for e in begin] == [1, 2, 3]
    assert all(e["headers"]["x-raiser"] == "kept" for e in begin)
    assert len(bus.dead_letters()) == 1


def test_the_supervisor_calls_on_dead_letter_for_a_task_it_buries(
    bus_name: str, servers: list[TaskServer], tmp_path: Path
) -> None:
    """A worker killed for task_timeout cannot call the hook: the supervisor does."""
    path = str(tmp_path / "events.jsonl")
    bus = make_bus(bus_name, [Recorder("a", path)])
    try:
        server = TaskServer(bus, workers=1, task_timeout=0.5)
        servers.append(server)
        server.start()
        fut = bus.dispatch(Sleepy(60))
        with pytest.raises(TaskTimeout):
            fut.result(timeout=60)
        (letter,) = wait_for(lambda: _side(read_events(path), fut.task_id, "on_dead_letter"), 60)
        server.stop()
    finally:
        bus.destroy()
    assert letter["pid"] == os.getpid()  # this process supervises the pool
    assert letter["type"] == "_mw_tasks.Sleepy" and not letter["has_task"]
    assert letter["headers"] == {"x-a": f"a-{os.getpid()}"} and letter["attempt"] == 1
    assert "0.5" in letter["reason"]


def test_headers_are_checked_at_dispatch_and_nothing_is_queued(
    bus_name: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "events.jsonl")
    bus = make_bus(bus_name, [Recorder("a", path), BigHeader(5000)])
    try:
        with pytest.raises(HeaderError, match=r"4096 bytes.*MAX_HEADER_BYTES") as info:
            bus.dispatch(Echo(1))
        assert "'big'" in str(info.value)
        with pytest.raises(HeaderError):
            bus.send(Echo(2))
        with pytest.raises(HeaderError):
            bus.dispatch_many([Echo(3), Echo(4)])
        assert bus.pending_tasks() == 0
        assert bus.outstanding() == []
        # Told of each refusal (dispatch_many stopped at its first task).
        refused = [e for e in read_events(path) if e["hook"] == "after_dispatch"]
        assert len(refused) == 3 and all("HeaderError" in e["exception"] for e in refused)
    finally:
        bus.destroy()
    typed = make_bus(bus_name, [BigHeader(-1)], transport="inline")
    with pytest.raises(HeaderError, match=r"header 'big': values must be strings, not int"):
        typed.dispatch(Echo(1))
    typed.destroy()


@pytest.mark.parametrize(("size", "fits"), [(4087, True), (4088, False)])
def test_the_header_limit_is_exact(bus_name: str, size: int, fits: bool) -> None:
    # 4096 = 3 (length and magic) + 1 + len("big") + 2 + the value.
    bus = make_bus(bus_name, [BigHeader(size)], transport="inline")
    if fits:
        assert bus.dispatch(Echo(1)).result(timeout=10)[0] == 1
    else:
        with pytest.raises(HeaderError):
            bus.dispatch(Echo(1))


def test_the_inline_bus_calls_the_hooks(bus_name: str, tmp_path: Path) -> None:
    path = str(tmp_path / "events.jsonl")
    bus = make_bus(bus_name, [Recorder("a", path), Recorder("b", path)], transport="inline")
    fut = bus.dispatch(Echo(1))
    assert fut.result(timeout=10)[0] == 1
    assert bus.dispatch(FailsTwice(2)).result(timeout=10) == 2
    bad = bus.dispatch(AlwaysFails(3))
    with pytest.raises(Unrecoverable):
        bad.result(timeout=10)
    events = read_events(path)
    seq = [(e["hook"], e["mw"]) for e in events if e.get("id") == fut.task_id]
    assert seq == [
        ("before_dispatch", "a"),
        ("before_dispatch", "b"),
        ("before_process", "a"),
        ("before_process", "b"),
        ("after_process", "b"),
        ("after_process", "a"),
        ("after_dispatch", "b"),
        ("after_dispatch", "a"),
    ]
    assert all(
        e["headers"] == {"x-a": f"a-{os.getpid()}", "x-b": f"b-{os.getpid()}"}
        for e in events
        if e.get("id") == fut.task_id and e["hook"] == "after_process"
    )
    kinds = [e["hook"] for e in events if e["mw"] == "a"]
    assert kinds.count("on_retry") == 3  # FailsTwice: 2, AlwaysFails: 1
    assert kinds.count("on_dead_letter") == 1
    assert not any(e["hook"].startswith("worker_") for e in events)


# ---------------------------------------------------------------- the trailer's bytes


def _envelope(bus: TaskBus, task: Any, headers: dict[str, str]) -> bytes:
    signer = bus.codec.signer
    data = bus.codec.encode_task(task, 1, env.FLAG_REPLY, os.getpid(), b"reply", gid=b"g" * 16)
    if headers:
        tag = None if signer is None else signer.tag_task
        data = env.with_headers(data, env.encode_headers(headers), tag)
    return data


@pytest.mark.parametrize("serializer", ["pickle", "msgpack"])
@pytest.mark.parametrize("signed", [False, True])
def test_the_trailer_travels_with_routes_signatures_and_requeues(
    bus_name: str, serializer: str, signed: bool
) -> None:
    if serializer == "msgpack":
        pytest.importorskip("msgspec")
    secret = "s3cret" if signed else None
    bus = make_bus(bus_name, [], transport="inline", serializer=serializer, secret=secret)
    headers = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "ünï": "çødé"}
    plain = _envelope(bus, Echo(5), {})
    data = _envelope(bus, Echo(5), headers)
    assert not plain[1] & env.FLAG_HEADERS and data[1] & env.FLAG_HEADERS
    assert env.headers_of(plain) == {} and env.headers_of(data) == headers
    tag = None if bus.codec.signer is None else bus.codec.signer.tag_task
    routed = env.route(data, "mail", 3, tag)
    for d in (data, routed):
        hdr, _, start = env.decode_task_header(d)
        if signed:
            assert bus.codec.verify_task is not None
            assert bus.codec.verify_task(d, hdr.flags) is None
        assert bus.codec.decode_task(d, start, hdr.flags, True) == Echo(5)
        assert env.headers_of(d) == headers
    assert env.route_of(routed) == ("mail", 3)
    retried = requeue_task(env.with_attempt(routed, 4), bus.codec.signer)
    assert env.headers_of(retried) == headers and env.route_of(retried) == ("mail", 3)
    hdr, _, start = env.decode_task_header(retried)
    assert hdr.attempt == 1 and bus.codec.decode_task(retried, start, hdr.flags, True) == Echo(5)
    with pytest.raises(EnvelopeError):
        env.with_headers(routed, env.encode_headers({"a": "b"}), tag)  # once, before the route
    if signed:  # the tag covers the headers
        forged = bytearray(routed)
        at = bytes(routed).index("çødé".encode())
        forged[at] ^= 1
        assert bus.codec.verify_task is not None
        assert bus.codec.verify_task(bytes(forged), forged[1]) is not None


def test_a_malformed_trailer_is_an_envelope_error(bus_name: str) -> None:
    bus = make_bus(bus_name, [], transport="inline")
    data = bytearray(_envelope(bus, Echo(1), {"k": "v"}))
    data[-2] = 0xFF  # the entries' length now runs past the payload
    with pytest.raises(EnvelopeError, match="headers trailer"):
        env.headers_of(bytes(data))
    data = bytearray(_envelope(bus, Echo(1), {"k": "v"}))
    data[-1] = 0  # no magic
    with pytest.raises(EnvelopeError, match="no headers trailer"):
        env.headers_of(bytes(data))
