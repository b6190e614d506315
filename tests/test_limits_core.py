"""The limits segment's C core: its C tests in forked processes (under
ASan+UBSan), and attach refusing foreign, corrupt and other users' files."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from _cffi_ring import CSRC, SOURCES, STRICT_FLAGS, load

ffi, lib = load()
SHM = Path("/dev/shm")


def _open(name: str) -> tuple[int, str, object]:
    out = ffi.new("limits_t **")
    err = ffi.new("char[]", lib.RING_ERRBUF)
    rc = lib.limits_open(name.encode(), out, err)
    return rc, ffi.string(err).decode(), out[0]


@pytest.fixture
def seg() -> Iterator[str]:
    name = f"ringbus-test-{os.getpid()}-{uuid.uuid4().hex[:8]}-limits"
    yield name
    (SHM / name).unlink(missing_ok=True)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("flags", [("-O2",), ("-O1", "-g", "-fsanitize=address,undefined")],
                         ids=["plain", "asan"])
def test_c_tests(tmp_path: Path, flags: tuple[str, ...]) -> None:
    exe = tmp_path / "limits_test"
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1 halt_on_error=1",
           "UBSAN_OPTIONS": "halt_on_error=1"}
    env.pop("LD_PRELOAD", None)  # the CI's ASan run preloads it for Python: not for these
    subprocess.run(["gcc", *STRICT_FLAGS, "-pthread", *flags, *map(str, SOURCES),
                    str(CSRC / "tests" / "limits_test.c"), "-o", str(exe)], check=True, env=env)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK")


def test_create_then_attach(seg: str) -> None:
    rc, err, a = _open(seg)
    assert rc == lib.RING_OK, err
    st = (SHM / seg).stat()
    assert st.st_size == lib.LIMITS_SEGMENT_SIZE and st.st_mode & 0o777 == 0o600
    rc, err, b = _open(seg)
    assert rc == lib.RING_OK, err
    sa = lib.limits_slot(a, b"pkg.Task", 8, ffi.NULL)
    assert sa >= 0 and lib.limits_slot(b, b"pkg.Task", 8, ffi.NULL) == sa
    assert lib.limits_slot(b, b"pkg.Other", 9, ffi.NULL) not in (sa, -1)
    assert lib.limits_rate_acquire(a, sa, 10**9, 2) == 0
    assert lib.limits_rate_acquire(b, sa, 10**9, 2) == 0  # the same bucket
    assert lib.limits_rate_acquire(a, sa, 10**9, 2) > 0
    lib.limits_close(a)
    lib.limits_close(b)


def _refused(seg: str, *words: str) -> None:
    rc, err, _ = _open(seg)
    assert rc != lib.RING_OK
    for w in words:
        assert w in err, err


def test_refuses_a_foreign_file(seg: str) -> None:
    fd = os.open(SHM / seg, os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"not a ringbus segment".ljust(lib.LIMITS_SEGMENT_SIZE, b"x"))
    os.close(fd)
    _refused(seg, "foreign", "bad magic")


def test_refuses_unsafe_permissions(seg: str) -> None:
    rc, err, h = _open(seg)
    assert rc == lib.RING_OK, err
    lib.limits_close(h)
    os.chmod(SHM / seg, 0o644)
    _refused(seg, "unsafe permissions")


def test_refuses_a_corrupt_header(seg: str) -> None:
    rc, err, h = _open(seg)
    assert rc == lib.RING_OK, err
    lib.limits_close(h)
    with open(SHM / seg, "r+b") as f:
        f.seek(16)
        f.write(struct.pack("<I", 65))  # slots
    _refused(seg, "invalid geometry")
    with open(SHM / seg, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 2))  # layout version
    _refused(seg, "newer layout version 2")


def test_refuses_a_truncated_file(seg: str) -> None:
    rc, err, h = _open(seg)
    assert rc == lib.RING_OK, err
    lib.limits_close(h)
    os.truncate(SHM / seg, 8192)
    _refused(seg, "truncated")


def test_refuses_another_users_file(seg: str) -> None:
    rc, err, h = _open(seg)
    assert rc == lib.RING_OK, err
    lib.limits_close(h)
    with open(SHM / seg, "r+b") as f:  # as if another uid had created it
        f.seek(28)
        f.write(struct.pack("<I", os.geteuid() + 1))
    _refused(seg, "created by another user")
    if os.geteuid() == 0:
        os.chown(SHM / seg, 12345, -1)
        _refused(seg, "belongs to another user")


def test_slot_names_are_checked(seg: str) -> None:
    rc, err, h = _open(seg)
    assert rc == lib.RING_OK, err
    errbuf = ffi.new("char[]", lib.RING_ERRBUF)
    long = b"x" * (lib.LIMITS_NAME_MAX + 1)
    assert lib.limits_slot(h, long, len(long), errbuf) == -1
    assert "1 to" in ffi.string(errbuf).decode()
    for i in range(lib.LIMITS_SLOTS):
        key = f"t{i}".encode()
        assert lib.limits_slot(h, key, len(key), errbuf) >= 0
    assert lib.limits_slot(h, b"one-more", 8, errbuf) == -1
    assert "full" in ffi.string(errbuf).decode()
    lib.limits_close(h)
