"""The default serializer's tagged format (src/ringbus/_codec.pxi) and the
serializers a Queue takes by name, through real rings in shared memory and
real processes."""

from __future__ import annotations

import enum
import math
import multiprocessing as mp
import pickle
import struct
import sys
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from ringbus import Queue, RingError
from ringbus._ring import _decode, _encode

PICKLE_TAG = 0x80
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


class Str(str):
    pass


class Int(int):
    pass


class Tup(tuple):
    pass


class Color(enum.IntEnum):
    RED = 1


def same(a: Any, b: Any) -> bool:
    """Equal with exact types all the way down; floats compared bit for bit
    (so -0.0 differs from 0.0 and a NaN equals the same NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# ---------------------------------------------------------------- strategies

surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udc80" * 3])
scalars = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100),
    st.binary(max_size=50).map(bytearray),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
)
flat = st.one_of(
    scalars,
    st.lists(scalars, max_size=20),
    st.lists(scalars, max_size=20).map(tuple),
)
# Values with no short form: they must come back exactly through pickle.
fallbacks = st.one_of(
    st.integers().filter(lambda n: not -(2**63) <= n < 2**63),
    surrogates,
    st.text(max_size=20).map(Str),
    st.integers(-100, 100).map(Int),
    st.lists(scalars, max_size=5).map(Tup),
    st.just(Color.RED),
    st.lists(st.lists(scalars, max_size=3), min_size=1, max_size=3),
    st.tuples(scalars, st.tuples(scalars)),
    st.dictionaries(st.text(max_size=5), scalars, max_size=5),
    st.frozensets(st.integers(), max_size=5),
)


# ---------------------------------------------------------------- the format


def test_golden_bytes() -> None:
    """The documented layout, byte for byte (what other processes rely on)."""
    assert _encode(b"ab") == b"\x01ab"
    assert _encode("é") == b"\x02\xc3\xa9"
    assert _encode(bytearray(b"z")) == b"\x03z"
    assert _encode(-2) == b"\x04" + (-2).to_bytes(8, "little", signed=True)
    assert _encode(-0.0) == b"\x05" + struct.pack("<d", -0.0)
    assert (_encode(True), _encode(False), _encode(None)) == (b"\x06", b"\x07", b"\x08")
    assert _encode((1, "a")) == (
        b"\x09\x02\x00\x00\x00" + b"\x04" + (1).to_bytes(8, "little") + b"\x02\x01\x00\x00\x00a"
    )
    assert _encode([None, b""]) == b"\x0a\x02\x00\x00\x00\x08\x01\x00\x00\x00\x00"
    assert _encode({}) == pickle.dumps({}, 5)  # the pickle's PROTO byte is the tag


@given(flat)
@SETTINGS
def test_short_forms_round_trip(value: Any) -> None:
    data = _encode(value)
    assert data[0] != PICKLE_TAG
    assert same(_decode(data), value)


@given(fallbacks)
@SETTINGS
def test_values_without_short_form_are_pickled(value: Any) -> None:
    data = _encode(value)
    assert data[0] == PICKLE_TAG
    assert same(_decode(data), value)


@pytest.mark.parametrize(
    "value",
    [True, False, 1, 0, -0.0, 0.0, math.nan, -math.inf, 2**63, -(2**63) - 1, 2**63 - 1],
    ids=repr,
)
def test_bool_int_and_float_specials_keep_type_and_bits(value: Any) -> None:
    assert same(_decode(_encode(value)), value)
    assert same(_decode(_encode((value, value))), (value, value))


def test_nan_payload_and_sign_survive() -> None:
    (odd_nan,) = struct.unpack("<d", struct.pack("<Q", 0xFFF8_0000_DEAD_BEEF))
    got = _decode(_encode([odd_nan]))[0]
    assert struct.pack("<d", got) == struct.pack("<d", odd_nan)


def test_recursive_containers_fall_back_to_pickle() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    data = _encode(loop)
    assert data[0] == PICKLE_TAG
    got = _decode(data)
    assert got[0] == 1 and got[1] is got


def test_shared_mutable_items_keep_their_identity() -> None:
    inner = [1]
    got = _decode(_encode([inner, inner]))  # nested: pickled, memo kept
    assert got[0] is got[1]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x42abc", "unknown message tag 0x42"),
        (b"\xff", "unknown message tag 0xff"),
        (b"", "empty message"),
        (b"\x04\x01", "tag 0x04"),
        (b"\x06\x00", "tag 0x06"),
        (b"\x09\x05\x00\x00\x00\x08", "tag 0x09"),
        (b"\x0a\x01\x00\x00\x00\x01\x09\x00\x00\x00ab", "tag 0x01"),
        (b"\x09\x01\x00\x00\x00\x0a\x00\x00\x00\x00", "container inside a container"),
        (b"\x0a\x01\x00\x00\x00\x42", "unknown message tag 0x42"),
        (b"\x09\x00\x00\x00\x00\x08", "bytes after the last item"),
    ],
)
def test_bad_messages_are_clear_errors(shm_name: str, data: bytes, match: str) -> None:
    with pytest.raises(RingError, match=match):
        _decode(data)
    with Queue(name=shm_name) as q:
        q.put_bytes(data)
        q.put("next")
        with pytest.raises(RingError, match=match):
            q.get()
        assert q.get() == "next"  # the bad message was consumed, the ring is fine


@given(st.binary(max_size=64).filter(lambda b: not b or b[0] != PICKLE_TAG))
@SETTINGS
def test_decoder_never_crashes_on_garbage(data: bytes) -> None:
    """Anything but a pickle (which could run code): a value or a clear error."""
    try:
        _decode(data)
    except (RingError, UnicodeDecodeError):
        pass


# ---------------------------------------------------------------- through rings


@given(st.lists(st.one_of(flat, fallbacks), min_size=1, max_size=30))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_queue_round_trips_with_put_get_and_many(values: list[Any]) -> None:
    with Queue(max_message_size=1 << 16) as q:
        for v in values:
            q.put(v)
            assert same(q.get(), v)
        q.put_many(values)
        got: list[Any] = []
        while len(got) < len(values):
            got += q.get_many(len(values))
        assert all(same(a, b) for a, b in zip(got, values, strict=True))


def test_large_short_forms_use_the_heap_buffer(shm_name: str) -> None:
    big = b"\x07" * 200_000
    with Queue(name=shm_name, max_message_size=1 << 20) as q:
        q.put(big)
        q.put_many([big, "s" * 100_000, (big, 1)])
        assert q.get() == big
        assert q.get_many(3) == [big, "s" * 100_000, (big, 1)]


def test_messages_of_earlier_versions_still_decode(shm_name: str) -> None:
    """Plain protocol-5 pickles (what put wrote before the tags) are read as is."""
    with Queue(name=shm_name) as q:
        for v in ({"a": 1}, b"x" * 64, (1, 2), "s"):
            q.put_bytes(pickle.dumps(v, 5))
            assert same(q.get(), v)


MIXED: list[Any] = [
    b"x" * 64,
    "text",
    7,
    -0.0,
    True,
    None,
    bytearray(b"ba"),
    (1, "a", b"b"),
    [2.5, False],
    2**70,
    Str("sub"),
    Int(3),
    Tup((1,)),
    {"k": [1, 2]},
    "\ud800",
]


def produce_mixed(name: str, pid: int, n: int, old_style: bool) -> None:
    """(pid, seq, value): a short-form tuple when value is a scalar with one,
    a pickle otherwise; old_style: plain pickles, as earlier versions put."""
    q = Queue.attach(name)
    items = [(pid, i, MIXED[i % len(MIXED)]) for i in range(n)]
    for i in range(0, n, 10):
        chunk = items[i : i + 10]
        if old_style:
            q.put_bytes_many([pickle.dumps(item, 5) for item in chunk])
        elif i % 20:
            q.put_many(chunk)
        else:
            for item in chunk:
                q.put(item)
    q.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_mixed_producers_in_other_processes(shm_name: str, method: str) -> None:
    n = 300
    ctx: Any = mp.get_context(method)
    with Queue(name=shm_name, maxsize=64) as q:
        procs = [
            ctx.Process(target=produce_mixed, args=(shm_name, pid, n, pid == 2)) for pid in range(3)
        ]
        for p in procs:
            p.start()
        nxt = [0, 0, 0]
        kinds = set()
        got = 0
        while got < 3 * n:
            for pid, i, v in q.get_many(16, timeout=60) if got % 2 else [q.get(timeout=60)]:
                assert i == nxt[pid], "one producer's messages arrive in order"
                assert same(v, MIXED[i % len(MIXED)])
                nxt[pid] += 1
                got += 1
                kinds.add(_encode((pid, i, v))[0])
        assert kinds == {0x09, PICKLE_TAG}
        for p in procs:
            p.join(30)
            assert p.exitcode == 0


# ---------------------------------------------------------------- named serializers

MSG_VALUES: list[Any] = [
    {"a": [1, 2.5, None, True], "b": {"c": "d"}},
    [1, "x", False],
    "plain",
    -(2**63),
    0.5,
    None,
]


@pytest.mark.parametrize("name", ["msgpack", "json"])
def test_named_serializers_round_trip_their_types(shm_name: str, name: str) -> None:
    with Queue(name=shm_name, serializer=name) as q:
        assert q.serializer == name
        for v in MSG_VALUES:
            q.put(v)
            assert q.get() == v
        q.put_many(MSG_VALUES)
        assert q.get_many(len(MSG_VALUES)) == MSG_VALUES
        q.put({"k": 1})
        raw = q.get_bytes()  # plain msgpack / JSON: no tag byte
        assert raw == (b"\x81\xa1k\x01" if name == "msgpack" else b'{"k":1}')
        if name == "msgpack":
            q.put(b"\x00bin")
            assert q.get() == b"\x00bin"


def consume_named(q: Queue, out: Any) -> None:
    out.put(q.get(timeout=60))


@pytest.mark.parametrize("name", ["msgpack", "json", "pickle"])
def test_named_serializer_travels_with_the_queue(shm_name: str, name: str) -> None:
    """A Queue pickles by name with its serializer's name: the child decodes."""
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    with Queue(name=shm_name, serializer=name) as q:
        p = ctx.Process(target=consume_named, args=(q, out))
        p.start()
        q.put({"x": [1, "y"]})
        assert out.get() == {"x": [1, "y"]}
        p.join(30)
        assert p.exitcode == 0


def test_pickle_name_is_the_default_format(shm_name: str) -> None:
    with Queue(name=shm_name, serializer="pickle") as q:
        q.put(5)
        assert q.get_bytes() == _encode(5)


def test_bad_serializers_are_refused_before_a_ring_exists(shm_name: str) -> None:
    with pytest.raises(ValueError, match="unknown serializer 'yaml'"):
        Queue(name=shm_name, serializer="yaml")
    with pytest.raises(TypeError, match="dumps"):
        Queue(name=shm_name, serializer=object())  # type: ignore[arg-type]
    Queue(name=shm_name).close()  # the name was never taken


def test_missing_msgspec_names_the_extra(shm_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in [m for m in sys.modules if m == "msgspec" or m.startswith("msgspec.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "msgspec", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'ringbus\[msgpack\]'"):
        Queue(name=shm_name, serializer="msgpack")


class Shrinker:
    """Pickling it empties the list that holds it (a __reduce__ runs code)."""

    def __init__(self, holder: list[Any]) -> None:
        self.holder = holder

    def __reduce__(self) -> Any:
        self.holder.clear()
        return (int, (5,))


def test_put_many_encodes_a_snapshot_of_the_list(shm_name: str) -> None:
    items: list[Any] = [b"a", (1, "b")]
    items.append(Shrinker(items))
    items.append("after")
    with Queue(name=shm_name) as q:
        q.put_many(items)
        assert q.get_many(10) == [b"a", (1, "b"), 5, "after"]
