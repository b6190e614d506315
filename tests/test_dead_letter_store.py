"""Scope: the shared-memory dead-letter store as a trust boundary (symlinks,
files of other users, loose modes) and its size cap; real files in /dev/shm,
the real ``ringbus dead-letters`` command."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _tasks_support import bus_name_fixture  # noqa: F401 - fixture
from ringbus import RingError, ShmTransport, TaskBus
from ringbus.tasks.dead_letters import DeadLetterStore
from ringbus.tasks.envelope import encode_task

SHM = Path("/dev/shm")


def _store(bus_name: str, **kw: object) -> DeadLetterStore:
    t = ShmTransport(**kw)  # type: ignore[arg-type]
    t.bind(bus_name)
    return DeadLetterStore(t)


def _letter_file(bus_name: str) -> Path:
    return SHM / f"ringbus-{bus_name}-dead"


def test_the_store_is_created_private(bus_name: str) -> None:
    store = _store(bus_name)
    store.add(encode_task(b"x", 1, 0, 1, b""), "boom")
    st = _letter_file(bus_name).stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    assert [d.reason for d in store.letters()] == ["boom"]


def test_a_symlink_in_place_of_the_store_is_refused(bus_name: str, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    _letter_file(bus_name).symlink_to(target)
    store = _store(bus_name)
    with pytest.raises(RingError, match="symbolic link"):
        store.add(encode_task(b"secret payload", 1, 0, 1, b""), "boom")
    with pytest.raises(RingError, match="symbolic link"):
        store.letters()
    assert target.read_bytes() == b""  # nothing was appended through the link


def test_a_store_others_can_read_is_refused(bus_name: str) -> None:
    store = _store(bus_name)
    store.add(encode_task(b"x", 1, 0, 1, b""), "boom")
    _letter_file(bus_name).chmod(0o644)
    with pytest.raises(RingError, match="mode 0644"):
        store.letters()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user needs root")
def test_a_store_planted_by_another_user_is_never_run(bus_name: str) -> None:
    """Another local user pre-creates the store with a record of their making:
    ``--retry`` must not queue it (it would run as the victim)."""
    store = _store(bus_name)
    store.add(encode_task(b"planted", 1, 0, 1, b""), "planted by someone else")
    os.chown(_letter_file(bus_name), 65534, 65534)
    with pytest.raises(RingError, match="belongs to uid 65534"):
        store.letters()
    bus = TaskBus(bus_name)
    try:
        bus.transport.open()
        proc = subprocess.run(
            [sys.executable, "-m", "ringbus.cli", "dead-letters", bus_name, "--retry"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "belongs to uid 65534" in proc.stderr
        assert bus.pending_tasks() == 0  # nothing was queued
    finally:
        bus.destroy()


def test_the_store_has_a_size_cap(bus_name: str) -> None:
    store = _store(bus_name, record_max_bytes=8192)
    envelope = encode_task(b"p" * 1000, 1, 0, 1, b"")
    kept = 0
    with pytest.raises(OSError) as info:
        for _ in range(100):
            store.add(envelope, "boom")
            kept += 1
    assert info.value.errno == errno.ENOSPC and "is full" in str(info.value)
    assert 1 <= kept < 100
    assert len(store.letters()) == kept  # what was kept stays whole
    store.purge()
    store.add(envelope, "room again")
    assert [d.reason for d in store.letters()] == ["room again"]


def test_the_store_can_live_on_disk(bus_name: str, tmp_path: Path) -> None:
    store = _store(bus_name, record_dir=str(tmp_path))
    store.add(encode_task(b"x", 1, 0, 1, b""), "kept across reboots")
    assert (tmp_path / f"ringbus-{bus_name}-dead").exists()
    assert not _letter_file(bus_name).exists()
    assert [d.reason for d in store.letters()] == ["kept across reboots"]
