"""A corrupted segment makes calls fail fast with RingError, never hang.

Counters, sequence words and attach entries of a live ring are overwritten
through an mmap of /dev/shm/<name> (offsets as drawn in csrc/ring.h).  Every
call under test runs in a child process with a timeout, so a call that would
spin forever (in C, holding the GIL) fails the test instead of hanging the
suite.
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ringbus import Queue

SHM = Path("/dev/shm")
TESTS = Path(__file__).resolve().parent

OFF_TAIL = 128
OFF_HEAD = 256
OFF_CELLS = 64  # the header field holding the cells' offset
ENTRIES = 4096  # attach table: 64 entries of 64 bytes
# pid tid start put_lo put_hi put_n put_done get_lo get_hi handle pidns
ENTRY = struct.Struct("<IIQQQIIQQII")
META_ABANDONED = 1 << 62


@contextmanager
def mapped(name: str) -> Iterator[mmap.mmap]:
    fd = os.open(SHM / name.lstrip("/"), os.O_RDWR)
    try:
        m = mmap.mmap(fd, 0)
    finally:
        os.close(fd)
    try:
        yield m
    finally:
        m.close()


def u64(m: mmap.mmap, off: int) -> int:
    return int(struct.unpack_from("<Q", m, off)[0])


def set_u64(m: mmap.mmap, off: int, value: int) -> None:
    struct.pack_into("<Q", m, off, value & (2**64 - 1))


def cell(m: mmap.mmap, ticket: int, capacity: int) -> int:
    """Byte offset of the cell {u64 seq; u64 meta} of a ticket."""
    return u64(m, OFF_CELLS) + (ticket % capacity) * 16


def run_child(code: str, timeout: float = 20) -> str:
    """Run code in a fresh interpreter (same ringbus); a hang fails the test."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    try:
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the call did not return within {timeout} s (it spins forever)")
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


def dead_pid() -> int:
    pid = 4_000_000
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    return pid


CALL = """
    import time
    from ringbus import Queue, RingError
    q = Queue.attach({name!r})
    t0 = time.monotonic()
    try:
        {call}
        print("returned", end=" ")
    except RingError as exc:
        print("RingError:", exc, end=" ")
    except Exception as exc:
        print(type(exc).__name__, exc, end=" ")
    print(round(time.monotonic() - t0, 3))
"""


@pytest.mark.parametrize("what", ["seq-ahead", "head-behind"])
def test_nonblocking_get_on_corrupted_counters_raises(shm_name: str, what: str) -> None:
    with Queue(8, name=shm_name) as q:
        q.put_bytes(b"a")
        with mapped(shm_name) as m:
            if what == "seq-ahead":
                # the published record's sequence word jumps far ahead
                set_u64(m, cell(m, 0, q.capacity), 1 + 2**40)
            else:
                q.get_bytes()
                q.put_bytes(b"b")
                q.get_bytes()
                set_u64(m, OFF_HEAD, 0)  # head moves back over freed cells
        out = run_child(CALL.format(name=shm_name, call="q.get_bytes(block=False)"))
        assert out.startswith("RingError:") and "corrupt" in out, out


def test_put_with_timeout_on_a_corrupted_tail_raises(shm_name: str) -> None:
    with Queue(8, name=shm_name) as q:
        q.put_bytes(b"a")
        with mapped(shm_name) as m:
            set_u64(m, OFF_TAIL, 0)  # tail moves back over a published record
        out = run_child(CALL.format(name=shm_name, call="q.put_bytes(b'x', timeout=0.5)"))
        assert out.startswith("RingError:") and "corrupt" in out, out
        assert float(out.split()[-1]) < 2, out


def test_recover_clamps_a_corrupted_attach_entry(shm_name: str) -> None:
    """A dead entry claiming 2**40 tickets must not make recover() walk them."""
    with Queue(8, name=shm_name):
        with mapped(shm_name) as m:
            set_u64(m, OFF_HEAD, 2**40)
            set_u64(m, OFF_TAIL, 2**40)
            ENTRY.pack_into(m, ENTRIES + 63 * 64, dead_pid(), 0, 1, 0, 0, 0, 0, 0, 2**40, 0, 0)
        out = run_child(CALL.format(name=shm_name, call="q.recover(requeue=False)"))
        assert out.startswith("returned"), out
        with mapped(shm_name) as m:
            assert ENTRY.unpack_from(m, ENTRIES + 63 * 64)[0] == 0  # given back


NEXT = """
    import mmap, os, struct, sys
    from _cffi_ring import load
    ffi, lib = load()
    err = ffi.new("char[]", lib.RING_ERRBUF)
    rp = ffi.new("ring_t **")
    assert lib.ring_open({name!r}.encode(), lib.RING_CREATE, ffi.NULL, rp, err) == 0
    r = rp[0]
    data = b"m" * 40
    iov = ffi.new("ring_iov_t *", {{"base": ffi.from_buffer(data), "len": len(data)}})
    done = ffi.new("size_t *")
    assert lib.ring_put(r, iov, 1, done, lib.RING_NOWAIT) == 0
    b = ffi.new("ring_batch_t *")
    assert lib.ring_claim(r, 1, b, lib.RING_NOWAIT) == 0
    fd = os.open("/dev/shm/" + {name!r}.lstrip("/"), os.O_RDWR)
    m = mmap.mmap(fd, 0)
    cells = struct.unpack_from("<Q", m, 64)[0]
    struct.pack_into("<Q", m, cells + 8, {meta})  # meta of the claimed record
    p = ffi.new("void **")
    n = ffi.new("size_t *")
    print(lib.ring_next(r, b, ffi.cast("const void **", p), n))
    lib.ring_release(r, b)
    lib.ring_unlink({name!r}.encode(), err)
"""


@pytest.mark.parametrize(
    "meta", [META_ABANDONED, 1 << 20], ids=["skip-of-no-slots", "length-over-max"]
)
def test_next_uses_only_a_validated_record_header(shm_name: str, meta: int) -> None:
    """A record header overwritten between claim and next: ring_next reports
    the corruption (-1) instead of looping (a skip of 0 slots) or handing
    out a length larger than the record (1 with a bogus length)."""
    assert run_child(NEXT.format(name=shm_name, meta=meta)) == "-1"
