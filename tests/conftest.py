"""Shared fixtures: unique ring names, cleanup of segments and processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from _redis_support import redis_aof_server, redis_cluster, redis_server  # noqa: F401 - fixtures
from ringbus._proc import pid_alive

SHM = Path("/dev/shm")
TEST_PREFIX = "ringbus-test-"


def pytest_configure(config: pytest.Config) -> None:
    # A compiled module older than its source runs the old code: the suite
    # would test something else than the tree (see ringbus/_compiled.py).
    from ringbus._compiled import stale_modules

    stale = stale_modules()
    if stale:
        raise pytest.UsageError(
            f"compiled modules older than their source: {', '.join(stale)}; "
            "rebuild them with `pip install -e .` (or build with RINGBUS_PURE_PYTHON=1 "
            "and remove the compiled files to run the .py)"
        )


def _ours() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith("ringbus")}


def _another_session(name: str) -> bool:
    """Whether the segment names a live process other than this session (the
    first number in the name is its creator's pid: ``ringbus-test-<pid>-...``,
    ``ringbus-bench-<pid>-...``): other test runs on this machine make and
    remove their own segments meanwhile."""
    for token in name.split("-"):
        if token.isdigit():
            pid = int(token)
            return pid != os.getpid() and pid_alive(pid)
    return False


def _live(name: str) -> bool:
    """Whether some process still maps the segment (another session's ring)."""
    needle = f"/dev/shm/{name}"
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            if needle in maps.read_text():
                return True
        except OSError:
            continue
    return False


def _remove_killed_sessions() -> None:
    """Unlink test segments of an earlier session that was SIGKILLed.

    A killed pytest cannot clean up; its segments carry its pid
    (``ringbus-test-<pid>-...``), so they are stale once that pid is gone and
    nothing maps them.
    """
    for name in _ours():
        if not name.startswith(TEST_PREFIX):
            continue
        pid = name[len(TEST_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)) and not _live(name):
            (SHM / name).unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def _no_segment_left_behind() -> Iterator[None]:
    """Fail the session if the suite left ringbus segments in /dev/shm.

    Segments that a live process still maps belong to someone running at the
    same time on this machine: they are neither counted nor touched.
    """
    _remove_killed_sessions()
    before = _ours()
    yield
    leaked = {n for n in _ours() - before if not _live(n) and not _another_session(n)}
    for name in leaked:  # clean up so one failure does not poison the next run
        (SHM / name).unlink(missing_ok=True)
    assert not leaked, f"segments left in /dev/shm by the suite: {sorted(leaked)}"


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A fresh ring name; whatever is left under it is unlinked afterwards."""
    name = f"/{TEST_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    yield name
    (SHM / name.lstrip("/")).unlink(missing_ok=True)


@pytest.fixture
def procs() -> Iterator[list[mp.process.BaseProcess]]:
    """Collects processes a test starts; kills and joins any still alive after it."""
    started: list[mp.process.BaseProcess] = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(timeout=10)
