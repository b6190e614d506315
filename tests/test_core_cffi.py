"""The C core driven directly through cffi: edges the Queue API hides."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _cffi_ring import load

ffi, lib = load()
SHM = Path("/dev/shm")


class Core:
    """Minimal Pythonic wrapper: each call maps 1:1 to a C function."""

    def __init__(self, name: str, mode: int, maxsize: int = 0, slot: int = 0, maxmsg: int = 0):
        params = ffi.new("ring_params_t *", {"maxsize": maxsize, "slot_size": slot,
                                             "max_message_size": maxmsg})
        out = ffi.new("ring_t **")
        err = ffi.new("char[]", lib.RING_ERRBUF)
        rc = lib.ring_open(name.encode(), mode, params, out, err)
        if rc != lib.RING_OK:
            raise OSError(rc, ffi.string(err).decode())
        self.r = out[0]
        self.name = name

    def put(self, *msgs: bytes, deadline: int = 0) -> tuple[int, int]:
        bufs = [ffi.from_buffer(m) for m in msgs]
        iov = ffi.new("ring_iov_t[]", len(msgs))
        for i, (b, m) in enumerate(zip(bufs, msgs, strict=True)):
            iov[i].base = b
            iov[i].len = len(m)
        done = ffi.new("size_t *")
        rc = lib.ring_put(self.r, iov, len(msgs), done, deadline)
        return rc, done[0]

    def claim(self, max_items: int, deadline: int = 0) -> tuple[int, Any]:
        b = ffi.new("ring_batch_t *")
        return lib.ring_claim(self.r, max_items, b, deadline), b

    def records(self, b: Any) -> list[tuple[int, bytes]]:
        """(address, bytes) of each record in a claimed batch."""
        data = ffi.new("const void **")
        n = ffi.new("size_t *")
        out = []
        while lib.ring_next(self.r, b, data, n) == 1:
            out.append((int(ffi.cast("uintptr_t", data[0])), bytes(ffi.buffer(data[0], n[0]))))
        return out

    def get(self, max_items: int = 1) -> list[bytes]:
        rc, b = self.claim(max_items)
        if rc != lib.RING_OK:
            return []
        recs = self.records(b)
        lib.ring_release(self.r, b)
        return [m for _, m in recs]

    def stats(self) -> Any:
        s = ffi.new("ring_stats_t *")
        lib.ring_get_stats(self.r, s)
        return s

    def close(self) -> None:
        if self.r is not None:
            lib.ring_detach(self.r)
            self.r = None


@pytest.fixture
def ring(shm_name: str) -> Iterator[Any]:
    """Factory: create a ring under the test's name; detached afterwards."""
    made: list[Core] = []

    def make(maxsize: int = 0, slot: int = 0, maxmsg: int = 0) -> Core:
        c = Core(shm_name, lib.RING_CREATE, maxsize, slot, maxmsg)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def msg(n: int, seed: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(n))


def test_geometry_defaults(ring: Any) -> None:
    r = ring()
    assert lib.ring_capacity(r.r) == lib.RING_DEFAULT_CAPACITY
    assert lib.ring_slot_size(r.r) == lib.RING_DEFAULT_SLOT_SIZE
    assert lib.ring_max_message(r.r) == lib.RING_DEFAULT_MAX_MESSAGE
    assert lib.ring_limit(r.r) == lib.RING_DEFAULT_CAPACITY
    st = os.stat(SHM / r.name.lstrip("/"))
    assert st.st_mode & 0o777 == 0o600
    assert st.st_size == r.stats().segment_size


def test_capacity_always_holds_two_largest_messages(ring: Any) -> None:
    r = ring(maxsize=4, slot=16, maxmsg=160)  # 10 slots per largest message
    assert lib.ring_capacity(r.r) == 32
    assert lib.ring_limit(r.r) == 4


@pytest.mark.parametrize(
    ("slot", "maxmsg", "maxsize", "needle"),
    [
        (12, 100, 8, b"slot_size 12 is invalid"),
        (8, 100, 8, b"slot_size 8 is invalid"),
        (64, 0x7FFFFFFF, 8, b"max_message_size"),
        (64, 100, 1 << 31, b"maxsize"),
    ],
)
def test_bad_geometry_is_refused_with_a_reason(
    shm_name: str, slot: int, maxmsg: int, maxsize: int, needle: bytes
) -> None:
    with pytest.raises(OSError) as ei:
        Core(shm_name, lib.RING_CREATE, maxsize, slot, maxmsg)
    assert needle.decode() in str(ei.value)
    assert not (SHM / shm_name.lstrip("/")).exists()


@pytest.mark.parametrize("bad", ["", "/", "a/b", "/x y", "/" + "n" * 201, "..", "/é"])
def test_bad_names(bad: str) -> None:
    err = ffi.new("char[]", lib.RING_ERRBUF)
    assert lib.ring_validate_name(bad.encode(), err) == lib.RING_EINVAL
    assert b"invalid ring name" in ffi.string(err)


def test_create_is_exclusive(ring: Any, shm_name: str) -> None:
    ring()
    with pytest.raises(OSError, match="File exists"):
        Core(shm_name, lib.RING_CREATE)


def test_open_creates_or_attaches_and_never_owns(shm_name: str) -> None:
    a = Core(shm_name, lib.RING_OPEN, 16, 64, 256)
    b = Core(shm_name, lib.RING_OPEN, 999, 32, 64)  # attaches: geometry from header
    try:
        assert lib.ring_is_owner(a.r) == 0 and lib.ring_is_owner(b.r) == 0
        assert lib.ring_capacity(b.r) == lib.ring_capacity(a.r) == 16
        assert a.put(b"hello") == (lib.RING_OK, 1)
        assert b.get() == [b"hello"]
    finally:
        a.close()
        b.close()


def test_multi_slot_message_is_contiguous(ring: Any) -> None:
    r = ring(maxsize=16, slot=16, maxmsg=64)
    m = msg(50, 3)  # 4 slots
    assert r.put(b"first", m) == (lib.RING_OK, 2)
    rc, b = r.claim(2)
    assert rc == lib.RING_OK and b.end - b.start == 5 and b.count == 2
    [(a0, first), (a1, data)] = r.records(b)
    assert (first, data) == (b"first", m)
    # read in place: the second record starts one slot after the first
    assert a1 == a0 + 16
    lib.ring_release(r.r, b)
    assert r.stats().head == r.stats().tail == 5


def test_wrap_padding_then_contiguous_record(ring: Any) -> None:
    r = ring(maxsize=8, slot=16, maxmsg=64)  # capacity 8, up to 4 slots a message
    assert lib.ring_capacity(r.r) == 8
    assert r.put(msg(16 * 6, 1)[:64], msg(16, 2)) == (lib.RING_OK, 2)  # tickets 0-3, 4
    assert r.get(2) == [msg(16 * 6, 1)[:64], msg(16, 2)]  # head = tail = 5
    big = msg(40, 9)  # 3 slots; at index 5 it would end at 8: fits exactly
    assert r.put(big) == (lib.RING_OK, 1)
    assert r.stats().tail == 8
    assert r.get() == [big]
    r.put(msg(16, 4))  # ticket 8 (index 0)
    r.get()
    # index 1 now; a 4-slot message at index 6 would cross the end -> padding
    r.put(msg(16, 5), msg(16, 6), msg(16, 7), msg(16, 8), msg(16, 9))  # tickets 9..13
    r.get(5)  # head = tail = 14 -> index 6
    big2 = msg(64, 11)
    assert r.put(big2) == (lib.RING_OK, 1)
    s = r.stats()
    assert s.tail == 14 + 2 + 4  # two padding slots, then four at the start
    rc, b = r.claim(8)
    assert rc == lib.RING_OK and b.start == 14 and b.end == 20 and b.count == 1
    [(addr, data)] = r.records(b)
    assert data == big2
    lib.ring_release(r.r, b)
    r.put(b"tail")  # ticket 20 = index 4: four slots after big2's start (index 0)
    [(addr2, _)] = r.records(r.claim(1)[1])
    assert addr2 == addr + 4 * 16


def test_too_large_is_refused_before_anything_is_put(ring: Any) -> None:
    r = ring(maxsize=8, slot=16, maxmsg=64)
    assert r.put(b"ok", b"x" * 65) == (lib.RING_ETOOBIG, 0)
    assert r.stats().tail == 0


def test_batch_put_is_partial_when_full(ring: Any) -> None:
    r = ring(maxsize=8, slot=16, maxmsg=32)
    rc, done = r.put(*[msg(10, i) for i in range(11)])
    assert (rc, done) == (lib.RING_FULL, 8)
    assert r.get(100) == [msg(10, i) for i in range(8)]


def test_soft_limit_counts_one_slot_messages(ring: Any) -> None:
    r = ring(maxsize=3, slot=16, maxmsg=64)
    assert lib.ring_capacity(r.r) == 8
    assert r.put(b"a", b"b", b"c", b"d") == (lib.RING_FULL, 3)
    assert lib.ring_full(r.r) == 1
    r.get(3)
    assert r.put(msg(64, 1)) == (lib.RING_OK, 1)  # larger than the limit, but empty
    assert r.put(b"x") == (lib.RING_FULL, 0)  # 4 slots used > limit 3


def test_empty_and_timeout(ring: Any) -> None:
    r = ring(maxsize=8, slot=16, maxmsg=64)
    rc, _ = r.claim(1)
    assert rc == lib.RING_EMPTY
    rc, _ = r.claim(1, lib.ring_deadline_after(0.01))
    assert rc == lib.RING_TIMEOUT
    r.put(*[b"z"] * 8)
    assert r.put(b"y", deadline=lib.ring_deadline_after(0.01)) == (lib.RING_TIMEOUT, 0)


def test_closed_handle_refuses_and_zero_length_messages(ring: Any) -> None:
    r = ring(maxsize=8, slot=16, maxmsg=64)
    assert r.put(b"") == (lib.RING_OK, 1)
    assert r.get() == [b""]
    lib.ring_close(r.r)
    assert r.put(b"a") == (lib.RING_CLOSED, 0)
    assert r.claim(1)[0] == lib.RING_CLOSED


def test_stats_count_messages_and_bytes(ring: Any) -> None:
    r = ring(maxsize=16, slot=16, maxmsg=64)
    r.put(b"abc", msg(40, 1))
    assert lib.ring_qsize(r.r) == 2
    r.get()
    s = r.stats()
    assert (s.puts, s.gets, s.bytes_in, s.bytes_out) == (2, 1, 43, 3)
    assert s.creator_pid == os.getpid() and s.creator_uid == os.geteuid()
    assert s.layout_version == lib.RING_LAYOUT_VERSION


def test_task_accounting(ring: Any) -> None:
    r = ring(maxsize=8, slot=16, maxmsg=64)
    lib.ring_task_add(r.r, 2)
    assert lib.ring_task_join(r.r, 0) == lib.RING_TIMEOUT
    assert lib.ring_task_done(r.r) == lib.RING_OK
    assert lib.ring_task_done(r.r) == lib.RING_OK
    assert lib.ring_task_done(r.r) == lib.RING_EUNDERFLOW
    assert lib.ring_task_join(r.r, 0) == lib.RING_OK


# ---------------------------------------------------------------- attach


def _attach_error(name: str) -> str:
    with pytest.raises(OSError) as ei:
        Core(name, lib.RING_ATTACH)
    return str(ei.value)


def _patch(name: str, offset: int, fmt: str, value: int) -> None:
    with open(SHM / name.lstrip("/"), "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def test_attach_validates_the_header(ring: Any, shm_name: str) -> None:
    ring(maxsize=8, slot=16, maxmsg=64).close()
    path = SHM / shm_name.lstrip("/")
    pristine = path.read_bytes()

    def fresh() -> None:
        path.write_bytes(pristine)
        os.chmod(path, 0o600)
        os.chown(path, os.geteuid(), os.getegid())

    cases = [
        (lib.RING_OFF_MAGIC, "<Q", 0x4F4F4F4F4F4F4F4F, "foreign"),
        (lib.RING_OFF_VERSION, "<I", lib.RING_LAYOUT_VERSION + 1, "newer layout version 2"),
        (lib.RING_OFF_CAPACITY, "<Q", 12, "invalid geometry"),
        (lib.RING_OFF_CAPACITY, "<Q", 1 << 40, "invalid geometry"),
        (lib.RING_OFF_SLOT_SIZE, "<I", 0, "invalid geometry"),
        (lib.RING_OFF_MAX_MESSAGE, "<I", 10_000, "inconsistent header"),
        (lib.RING_OFF_LIMIT, "<Q", 0, "invalid geometry"),
        (lib.RING_OFF_DATA, "<Q", 4096, "inconsistent header"),
        (lib.RING_OFF_SEGMENT_SIZE, "<Q", 1 << 30, "inconsistent header"),
        (lib.RING_OFF_CREATOR_UID, "<I", 4242, "another user"),
    ]
    for offset, fmt, value, needle in cases:
        fresh()
        _patch(shm_name, offset, fmt, value)
        assert needle in _attach_error(shm_name), (offset, value)
    fresh()
    os.truncate(path, len(pristine) - 4096)
    assert "truncated" in _attach_error(shm_name)
    fresh()
    os.chmod(path, 0o644)
    assert "unsafe permissions 644" in _attach_error(shm_name)
    fresh()
    os.chown(path, 65534, 65534)
    assert "another user" in _attach_error(shm_name)
    fresh()
    a = Core(shm_name, lib.RING_ATTACH)  # the pristine copy still attaches
    a.close()


def test_attach_missing_and_short_segments(shm_name: str) -> None:
    assert "no ring named" in _attach_error(shm_name)
    path = SHM / shm_name.lstrip("/")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"RINGBUS1" + b"\0" * 100)
    finally:
        os.close(fd)
    assert "truncated" in _attach_error(shm_name)
    os.truncate(path, 8192)
    with open(path, "r+b") as f:
        f.write(b"\x7fELF")
    assert "foreign" in _attach_error(shm_name)
