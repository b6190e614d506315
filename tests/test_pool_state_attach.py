"""PoolState.attach trusts no header: a crafted pool-state file in /dev/shm
(bad geometry, another owner, loose permissions, a symlink) is refused with a
ValueError naming the problem, and ``ringbus stats``/``ls``/``gc`` skip and
report it instead of looping over billions of slots."""

from __future__ import annotations

import json
import mmap
import os
import resource
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringbus.server.pool_state import (
    POOL_HEADER,
    POOL_HEADER_SIZE,
    POOL_MAGIC,
    POOL_VERSION,
    PoolState,
)

SHM = Path("/dev/shm")
MIN_STRIDE = 8192  # a slot's 512-byte head and a page of envelope, in whole pages
MAX_SLOTS = 4096


@pytest.fixture
def bus() -> Iterator[str]:
    """A bus name under the session's test prefix; its files are removed afterwards."""
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    for f in SHM.glob(f"ringbus-{name}-*"):
        f.unlink(missing_ok=True)


def craft(
    path: Path,
    slots: int = 2,
    stride: int = MIN_STRIDE,
    size: int | None = None,
    mode: int = 0o600,
    magic: bytes = POOL_MAGIC,
    name: bytes = b"x",
) -> Path:
    """A pool-state file with this header (sparse: costs no memory)."""
    if size is None:
        size = POOL_HEADER_SIZE + slots * stride
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        head = POOL_HEADER.pack(magic, POOL_VERSION, slots, stride, os.getpid(), 0.0, len(name))
        os.pwrite(fd, head[: min(len(head), size)], 0)
        if size >= 64 + len(name):
            os.pwrite(fd, name, 64)
    finally:
        os.close(fd)
    os.chmod(path, mode)
    return path


def pool_path(bus: str) -> Path:
    """Named like the pool of a server with this process's pid."""
    return SHM / f"ringbus-{bus}-pool-{os.getpid()}"


def test_a_well_formed_file_attaches(bus: str) -> None:
    ps = PoolState.attach(str(craft(pool_path(bus))), writable=False)
    try:
        assert (ps.slots, ps.stride, ps.bus_name) == (2, MIN_STRIDE, "x")
        assert len(ps.snapshot()) == 2
    finally:
        ps.close()
    real = PoolState.create(bus, 3, envelope_area=100)  # rounded up to a page
    try:
        again = PoolState.attach(real.path)
        # a page of envelope and the histogram area (histograms.py): 3 pages
        assert (again.slots, again.stride, again.bus_name) == (3, MIN_STRIDE + 4096, bus)
        again.close()
    finally:
        real.close()
        real.unlink()


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ({"stride": 0, "slots": 2**32 - 1, "size": POOL_HEADER_SIZE + 4096}, "worker slots"),
        ({"stride": 0, "slots": 16, "size": POOL_HEADER_SIZE + 4096}, "slot stride 0"),
        ({"stride": MIN_STRIDE + 100}, "slot stride"),
        ({"stride": 4096}, "slot stride 4096"),
        ({"slots": MAX_SLOTS + 1, "size": POOL_HEADER_SIZE}, "worker slots"),
        ({"slots": 2, "size": POOL_HEADER_SIZE + MIN_STRIDE}, "bad geometry"),  # truncated
        ({"slots": 1, "size": POOL_HEADER_SIZE + 3 * MIN_STRIDE}, "bad geometry"),  # longer
        ({"size": 100}, "too small"),
        ({"magic": b"NOTAPOOL"}, "magic"),
        ({"name": b""}, "bus name length"),
    ],
)
def test_a_crafted_header_is_refused(bus: str, header: dict, problem: str) -> None:
    path = craft(pool_path(bus), **header)
    with pytest.raises(ValueError, match=problem) as info:
        PoolState.attach(str(path), writable=False)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o666])
def test_group_or_other_access_is_refused(bus: str, mode: int) -> None:
    path = craft(pool_path(bus), mode=mode)
    with pytest.raises(ValueError, match="group/other"):
        PoolState.attach(str(path), writable=False)


def test_a_symlink_is_refused(bus: str) -> None:
    target = craft(SHM / f"ringbus-{bus}-target")
    link = pool_path(bus)
    link.symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        PoolState.attach(str(link), writable=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_file_of_another_user_is_refused(bus: str) -> None:
    path = craft(pool_path(bus))
    os.chown(path, 65534, 65534)
    with pytest.raises(ValueError, match="owned by uid 65534"):
        PoolState.attach(str(path), writable=False)


def _limit_memory() -> None:  # the old code grew ~50 MB/s: fail fast, not the machine
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringbus.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_memory,
    )


@pytest.mark.parametrize("owner", ["us", "nobody"])
def test_stats_ls_and_gc_skip_and_report_a_crafted_pool_file(bus: str, owner: str) -> None:
    if owner == "nobody":
        if os.geteuid() != 0:
            pytest.skip("chown to another uid needs root")
        path = craft(pool_path(bus))
        os.chown(path, 65534, 65534)
        problem = "owned by uid 65534"
    else:
        # Every one of 4 billion slots "fits" in the page after the header.
        path = craft(pool_path(bus), stride=0, slots=2**32 - 1, size=POOL_HEADER_SIZE + 4096)
        problem = "worker slots"
    fd = os.open(path, os.O_RDONLY)
    held = mmap.mmap(fd, 0, prot=mmap.PROT_READ)  # its crafter holds it, as a server would
    os.close(fd)
    try:
        stats = cli("stats", bus, "--interval", "0", "--json")
        assert stats.returncode == 0, stats.stderr
        doc = json.loads(stats.stdout)["bus"]
        assert doc["servers"] == []
        (skipped,) = doc["unreadable_pools"]
        assert skipped["path"] == str(path) and problem in skipped["error"]
        human = cli("stats", bus, "--interval", "0")
        assert human.returncode == 0, human.stderr
        assert "skipped" in human.stdout and problem in human.stdout
        (row,) = json.loads(cli("ls", "--prefix", f"ringbus-{bus}-", "--json").stdout)
        assert row["kind"] == "broken" and problem in row["error"]
        (plan,) = json.loads(cli("gc", "--prefix", f"ringbus-{bus}-", "--json").stdout)
        assert plan["action"] == "keep" and problem in plan["reason"]
        assert path.exists()
    finally:
        held.close()
        path.unlink(missing_ok=True)
