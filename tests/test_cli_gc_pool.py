"""``ringbus gc`` judges a pool-state segment by who maps it, not by the pid
in its name: a server that ran as pid 1 in a PID namespace leaves a file
named ``ringbus-<bus>-pool-1``, and pid 1 is always alive here."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringbus.server.pool_state import (
    POOL_HEADER,
    POOL_HEADER_SIZE,
    POOL_MAGIC,
    POOL_VERSION,
    read_pool_states,
)

SHM = Path("/dev/shm")
STRIDE = 8192


@pytest.fixture
def bus() -> Iterator[str]:
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    for f in SHM.glob(f"ringbus-{name}-*"):
        f.unlink(missing_ok=True)


def pool_of_pid_1(bus: str, n: str = "") -> Path:
    """A well-formed pool-state file as a server running as pid 1 leaves it."""
    path = SHM / f"ringbus-{bus}-pool-1{n}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, POOL_HEADER_SIZE + 2 * STRIDE)
        name = bus.encode()
        os.pwrite(
            fd, POOL_HEADER.pack(POOL_MAGIC, POOL_VERSION, 2, STRIDE, 1, time.time(), len(name)), 0
        )
        os.pwrite(fd, name, 64)
    finally:
        os.close(fd)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringbus.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_gc_removes_a_pool_named_for_pid_1_that_nobody_maps(bus: str) -> None:
    dead = pool_of_pid_1(bus)
    held = pool_of_pid_1(bus, "-2")
    fd = os.open(held, os.O_RDWR)
    mm = mmap.mmap(fd, 0)  # a live server in another PID namespace: this process maps it
    os.close(fd)
    try:
        rows = {
            r["name"]: r
            for r in json.loads(cli("ls", "--prefix", f"ringbus-{bus}-", "--json").stdout)
        }
        assert rows[f"/{dead.name}"]["live"] is False
        assert rows[f"/{held.name}"]["live"] is True
        assert rows[f"/{held.name}"]["live_pids"] == [os.getpid()]
        # stats: only the pool someone holds is a live server
        assert list(read_pool_states(bus)) == [str(held)]
        gc = cli("gc", "--prefix", f"ringbus-{bus}-", "--json")
        assert gc.returncode == 0, gc.stderr
        done = {r["name"]: r for r in json.loads(gc.stdout)}
        assert done[f"/{dead.name}"]["action"] == "removed", done
        assert done[f"/{held.name}"]["action"] == "keep"
        assert f"pid {os.getpid()}" in done[f"/{held.name}"]["reason"]
        assert not dead.exists() and held.exists()
    finally:
        mm.close()
        dead.unlink(missing_ok=True)
        held.unlink(missing_ok=True)
