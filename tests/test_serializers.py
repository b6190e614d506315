"""Serializers end to end: tuple, dataclass and Struct tasks under pickle,
msgpack and JSON, over shared memory and a real redis-server; typed decoding
(a payload that does not match its type is dead-lettered with msgspec's
message, the handler never sees it); handlers registered for a base class."""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from _redis_tasks import TEST_SECRET
from _ser_tasks import Order, Point, RushOrder, make_ser_bus
from _tasks_support import bus_name_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import CodecError, TaskBus, TaskServer
from ringbus.tasks import envelope as env

msgspec = pytest.importorskip("msgspec")


@pytest.fixture(name="sbus", params=["shm", "redis"])
def sbus_fixture(
    bus_name: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TaskBus]:
    """A bus of _ser_tasks with the serializer of the test's ``serializer``
    parameter, on shared memory and on Redis (signed there), destroyed after."""
    monkeypatch.delenv("RINGBUS_SECRET", raising=False)
    serializer = request.getfixturevalue("serializer")
    if request.param == "redis":
        pytest.importorskip("redis")
        url = request.getfixturevalue("redis_server").url
        b = make_ser_bus(bus_name, transport=url, serializer=serializer, secret=TEST_SECRET)
    else:
        b = make_ser_bus(bus_name, serializer=serializer)
    try:
        yield b
    finally:
        b.destroy()


@pytest.mark.parametrize("serializer", ["pickle", "msgpack", "json"])
def test_round_trips(sbus: TaskBus, serializer: str) -> None:
    with TaskServer(sbus, workers=2):
        assert sbus.dispatch((4, 5)).result(30) == 9
        assert sbus.dispatch(Order(2, 3)).result(30) == {"type": "Order", "total": 6}
        assert sbus.dispatch(Point(1, 2)).result(30) == [1, 2, "Point"]
        futs = sbus.dispatch_many([Order(i, 2) for i in range(200)], timeout=60)
        assert [f.result(60)["total"] for f in futs] == [2 * i for i in range(200)]
        # A subclass of the registered type arrives as itself where it is known.
        assert sbus.dispatch(RushOrder(1, 7)).result(30) == {"type": "RushOrder", "total": 7}


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
def test_payload_not_matching_its_type_is_dead_lettered(
    sbus: TaskBus, serializer: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    with TaskServer(sbus, workers=1):
        # A dataclass does not check its fields: msgspec does, on the worker.
        bad = Order("seven", 2, note=str(marker))  # type: ignore[arg-type]
        with pytest.raises(CodecError, match=r"Expected `int`, got `str` - at `\$\.id`"):
            sbus.dispatch(bad).result(30)
        letters = wait_for(sbus.dead_letters, what="the dead letter")
    assert not marker.exists(), "the handler saw a payload that does not match its type"
    assert len(letters) == 1
    assert "Expected `int`, got `str` - at `$.id`" in letters[0].reason
    assert letters[0].task_type.endswith("_ser_tasks.Order")


def test_a_task_type_msgspec_cannot_encode_is_refused_at_dispatch(bus_name: str) -> None:
    bus = make_ser_bus(bus_name, serializer="msgpack")
    bus.register(object, lambda t: t)
    try:
        with pytest.raises(CodecError, match="cannot be encoded as msgpack"):
            bus.dispatch(object())
        assert bus.pending_tasks() == 0
    finally:
        bus.destroy()


def _msgpack_task(name: str, body: dict[str, object]) -> bytes:
    """A fire-and-forget msgpack envelope with the type name ``name``."""
    raw = name.encode()
    payload = bytes((len(raw),)) + raw + msgspec.msgpack.encode(body)
    return env.encode_task(payload, 0, 1 << env.SER_SHIFT, 1, b"")


def test_a_subclass_unknown_to_the_worker_arrives_as_the_registered_type(
    bus_name: str, tmp_path: Path
) -> None:
    bus = make_ser_bus(bus_name, serializer="msgpack")
    order_name = bus.type_name(Order)
    sub, base = tmp_path / "sub", tmp_path / "base"
    try:
        with TaskServer(bus, workers=1):
            # What a dispatcher writes for a subclass: its name, then the registered one.
            bus.transport.put_task(
                _msgpack_task(
                    f"{bus.type_name(RushOrder)} {order_name}",
                    {"id": 1, "qty": 1, "note": str(sub), "rush": True},
                )
            )
            bus.transport.put_task(
                _msgpack_task(
                    f"elsewhere.NotImported {order_name}",
                    {"id": 1, "qty": 1, "note": str(base), "extra": 5},
                )
            )
            wait_for(lambda: sub.exists() and base.exists(), what="both tasks to run")
        assert sub.read_text() == "RushOrder"
        assert base.read_text() == "Order"
        assert bus.dead_letters() == []
    finally:
        bus.destroy()


def test_an_unknown_type_name_is_dead_lettered(bus_name: str, tmp_path: Path) -> None:
    bus = make_ser_bus(bus_name, serializer="json")
    try:
        with TaskServer(bus, workers=1):
            raw = b"nowhere.Thing"
            doc = msgspec.json.encode({"path": str(tmp_path / "x")})
            data = env.encode_task(bytes((len(raw),)) + raw + doc, 0, 2 << env.SER_SHIFT, 1, b"")
            bus.transport.put_task(data)
            letters = wait_for(bus.dead_letters, what="the dead letter")
        assert "unknown task type 'nowhere.Thing'" in letters[0].reason
        assert letters[0].task_type == "nowhere.Thing"
    finally:
        bus.destroy()


def test_unsigned_pickle_on_shared_memory_keeps_its_bytes(bus_name: str) -> None:
    """The default bus writes the envelope of before: no flag bits, no tag."""
    bus = make_ser_bus(bus_name)
    try:
        assert bus.codec.signer is None
        data = bus.codec.encode_task((1, 2), 7, env.FLAG_REPLY, 42, b"/r")
        when = env.decode_task_header(data)[0].enqueued  # stamped at encoding
        assert data == env.encode_task(pickle.dumps((1, 2), 5), 7, 1, 42, b"/r", enqueued=when)
        assert struct.unpack_from("<B", data, 1)[0] == env.FLAG_REPLY
    finally:
        bus.destroy()
