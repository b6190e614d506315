"""Signed envelopes over a real redis-server: forged task entries and forged
replies run nothing, a worker with another secret runs nothing, keys rotate;
unsigned pickle over Redis is refused unless explicitly allowed."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _redis_support import RedisServer
from _ser_tasks import Order, Point, Touch, evil_pickle, make_ser_bus
from _tasks_support import bus_name_fixture, wait_for  # noqa: F401 - fixtures
from ringbus import SignatureError, TaskBus, TaskServer, UnsignedPickleError
from ringbus.tasks import envelope as env

redis = pytest.importorskip("redis", reason="redis-py is not installed")
msgspec = pytest.importorskip("msgspec")

SECRET = "the-right-secret"


@pytest.fixture(autouse=True)
def _no_secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RINGBUS_SECRET", raising=False)


@pytest.fixture(name="r")
def r_fixture(redis_server: RedisServer, bus_name: str) -> Iterator[Any]:
    """A raw client; the bus's keys are removed afterwards."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    left = client.keys(f"ringbus:{{{bus_name}}}*")
    if left:
        client.delete(*left)
    client.close()


@pytest.fixture(name="buses")
def buses_fixture() -> Iterator[list[TaskBus]]:
    made: list[TaskBus] = []
    yield made
    for b in made:
        b.destroy()


def _bus(buses: list[TaskBus], name: str, url: str, **kwargs: object) -> TaskBus:
    b = make_ser_bus(name, transport=url, **kwargs)
    buses.append(b)
    return b


def test_forged_task_entries_run_nothing(
    redis_server: RedisServer, bus_name: str, r: Any, buses: list, tmp_path: Path
) -> None:
    bus = _bus(buses, bus_name, redis_server.url, secret=SECRET)
    stream = f"ringbus:{{{bus_name}}}:tasks"
    unsigned = tmp_path / "unsigned"
    wrong_tag = tmp_path / "wrong-tag"
    with TaskServer(bus, workers=1):
        r.xadd(stream, {b"d": env.encode_task(evil_pickle(str(unsigned)), 1, 0, 1, b"")})
        data = env.encode_task(evil_pickle(str(wrong_tag)), 2, env.FLAG_SIGNED, 1, b"")
        r.xadd(stream, {b"d": data + os.urandom(32)})
        letters = wait_for(lambda: len(bus.dead_letters()) == 2 and bus.dead_letters())
        assert bus.dispatch(Point(1, 1)).result(30) == [1, 1, "Point"]  # still serving
    assert not unsigned.exists() and not wrong_tag.exists(), "a forged pickle was loaded"
    reasons = sorted(d.reason for d in letters)
    assert "an unsigned task reached a bus with a secret" in reasons[0]
    assert "signature did not verify" in reasons[1]


def test_a_forged_reply_fails_the_future_and_runs_nothing(
    redis_server: RedisServer, bus_name: str, r: Any, buses: list, tmp_path: Path
) -> None:
    bus = _bus(buses, bus_name, redis_server.url, secret=SECRET)
    fut = bus.dispatch(Point(1, 2))  # no server: it stays pending
    st = bus._st
    assert st is not None
    (tid,) = st.pending
    marker = tmp_path / "forged-reply"
    forged = env.RESULT_HEADER.pack(env.RESULT_MAGIC, env.OK, tid) + evil_pickle(str(marker))
    r.rpush(st.reply, forged)
    with pytest.raises(SignatureError, match=f"result of task #{tid} did not verify"):
        fut.result(30)
    assert not marker.exists()


def test_a_worker_with_another_secret_runs_nothing(
    redis_server: RedisServer, bus_name: str, r: Any, buses: list, tmp_path: Path
) -> None:
    dispatcher = _bus(buses, bus_name, redis_server.url, secret=SECRET)
    other = _bus(buses, bus_name, redis_server.url, secret="another-secret")
    marker = tmp_path / "ran"
    with TaskServer(other, workers=1):
        fut = dispatcher.dispatch(Touch(str(marker)), timeout=60)
        letters = wait_for(dispatcher.dead_letters, what="the rejected task")
    assert "signature did not verify" in letters[0].reason
    assert not marker.exists() and not fut.done()  # no answer to an unverified address


def test_key_rotation(redis_server: RedisServer, bus_name: str, r: Any, buses: list) -> None:
    url = redis_server.url
    worker = _bus(buses, bus_name, url, secret=["new-key", "old-key"])
    rotating = _bus(buses, bus_name, url, secret=["old-key", "new-key"])  # signs old
    new_only = _bus(buses, bus_name, url, secret="new-key")
    old_only = _bus(buses, bus_name, url, secret="old-key")
    with TaskServer(worker, workers=1):
        assert rotating.dispatch(Point(1, 2)).result(30) == [1, 2, "Point"]  # old accepted
        assert new_only.dispatch(Point(3, 4)).result(30) == [3, 4, "Point"]
        # The worker signs with the new key: a dispatcher that only knows the old one
        # got its task run, but cannot trust the answer.
        with pytest.raises(SignatureError):
            old_only.dispatch(Point(5, 6)).result(30)


def test_unsigned_pickle_over_redis_is_refused(
    redis_server: RedisServer, bus_name: str, r: Any, buses: list
) -> None:
    bus = _bus(buses, bus_name, redis_server.url)
    with pytest.raises(UnsignedPickleError, match=r"Set secret= \(or RINGBUS_SECRET\)"):
        bus.dispatch(Point(1, 2))
    with pytest.raises(UnsignedPickleError, match="allow_unsigned_pickle=True"):
        bus.send(Point(1, 2))
    with pytest.raises(UnsignedPickleError, match="serializer='msgpack'"):
        TaskServer(bus, workers=1).start()
    assert bus.pending_tasks() == 0


def test_allow_unsigned_pickle_opts_out(
    redis_server: RedisServer, bus_name: str, r: Any, buses: list
) -> None:
    bus = _bus(buses, bus_name, redis_server.url, allow_unsigned_pickle=True)
    with TaskServer(bus, workers=1):
        assert bus.dispatch(Order(2, 5)).result(30) == {"type": "Order", "total": 10}


def test_msgpack_without_secret_refuses_pickled_tasks(
    redis_server: RedisServer, bus_name: str, r: Any, buses: list, tmp_path: Path
) -> None:
    bus = _bus(buses, bus_name, redis_server.url, serializer="msgpack")
    marker = tmp_path / "loaded"
    with TaskServer(bus, workers=1):
        assert bus.dispatch(Point(1, 2)).result(30) == [1, 2, "Point"]
        data = env.encode_task(evil_pickle(str(marker)), 1, 0, 1, b"")
        r.xadd(f"ringbus:{{{bus_name}}}:tasks", {b"d": data})
        letters = wait_for(bus.dead_letters, what="the refused task")
    assert "unsigned pickled task" in letters[0].reason
    assert not marker.exists()


def test_a_producer_in_another_language(
    redis_server: RedisServer, bus_name: str, r: Any, buses: list
) -> None:
    """The README's envelope, built by hand: struct, msgpack, keyed BLAKE2b;
    XADD to the task stream, the result read from our own reply list."""
    bus = _bus(buses, bus_name, redis_server.url, serializer="msgpack", secret=SECRET)
    key = SECRET.encode()
    reply = f"ringbus:{{{bus_name}}}:reply:elsewhere:1:go"
    r.set(f"{reply}:alive", b"1", ex=60)  # replies go only to a live reply key
    name = b"test.point"
    flags = 0x01 | 0x02 | 1 << 2  # reply, signed, msgpack
    head = struct.pack("<BBHIQddH", 0xB1, flags, 1, 4242, 77, 0.0, 0.0, len(reply))
    body = bytes([len(name)]) + name + msgspec.msgpack.encode({"x": 20, "y": 22})
    data = head + reply.encode() + body
    mac_input = data[:2] + data[4:]  # the attempt field is left out
    data += hashlib.blake2b(mac_input, key=key, digest_size=32).digest()
    with TaskServer(bus, workers=1):
        r.execute_command("XADD", f"ringbus:{{{bus_name}}}:tasks", "*", "d", data)
        got = r.blpop([reply], timeout=60)
    assert got is not None
    result = got[1]
    magic, status, tid = struct.unpack_from("<BBQ", result)
    assert (magic, tid) == (0xB2, 77)
    assert status & 0x0F == 0 and status & 0x10 and (status >> 5) & 3 == 1  # OK, signed, msgpack
    tag = hashlib.blake2b(result[:-32], key=key, digest_size=32).digest()
    assert result[-32:] == tag
    assert msgspec.msgpack.decode(result[10:-32]) == [20, 22, "Point"]
    r.delete(reply, f"{reply}:alive")


def test_signed_dead_letters_are_checked_before_a_retry(
    redis_server: RedisServer, bus_name: str, r: Any, buses: list, tmp_path: Path
) -> None:
    bus = _bus(buses, bus_name, redis_server.url, secret=SECRET)
    marker = tmp_path / "forged-letter"
    forged = env.encode_task(pickle.dumps(Touch(str(marker)), 5), 1, env.FLAG_SIGNED, 1, b"")
    bus.dead_letter_store.add(forged + bytes(32), "planted")
    with pytest.raises(SignatureError, match="does not verify"):
        bus.retry_dead_letters()
    assert bus.pending_tasks() == 0 and len(bus.dead_letters()) == 1
    # A genuine letter (its handler fails: the path is a directory) is signed anew.
    with TaskServer(bus, workers=1):
        with pytest.raises(IsADirectoryError):
            bus.dispatch(Touch(str(tmp_path))).result(30)
        genuine = wait_for(lambda: len(bus.dead_letters()) == 2 and bus.dead_letters()[1])
        assert bus.retry_dead_letters([genuine.id]) == 1
        again = wait_for(lambda: len(bus.dead_letters()) == 2 and bus.dead_letters()[1])
    assert again.id != genuine.id and "IsADirectoryError" in again.reason
    assert not marker.exists()


def test_ringbus_worker_refuses_unsigned_pickle_over_redis(redis_server: RedisServer) -> None:
    tests = Path(__file__).resolve().parent
    env_ = {k: v for k, v in os.environ.items() if k != "RINGBUS_SECRET"}
    env_["PYTHONPATH"] = os.pathsep.join([str(tests), *sys.path])
    url = redis_server.url
    proc = subprocess.run(
        [sys.executable, "-m", "ringbus.cli", "worker", "_redis_tasks:bus", "--transport", url],
        env=env_,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "no secret" in proc.stderr and "Traceback" not in proc.stderr
