"""A full /dev/shm: creating a pool state fails with a clear error instead of
a SIGBUS later in the worker that copies a task into its journal.

Runs in a private mount namespace with a 1 MiB tmpfs on /dev/shm (root and
unshare(1) needed), so the machine's /dev/shm is never filled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import sys
    from ringbus.server.pool_state import PoolState

    small = PoolState.create("fits", 1, envelope_area=100_000)  # about 100 KiB: fits
    small.journal(0)[:8] = b"12345678"
    small.close()
    small.unlink()
    try:
        # 2 slots of 1 MiB + a page each, more than the 1 MiB tmpfs holds
        ps = PoolState.create("too-big", 2, envelope_area=1 << 20)
    except OSError as exc:
        print("refused:", exc)
        sys.exit(3)
    print("created", ps.path, flush=True)
    for slot in (0, 1):  # workers copying large tasks into their journals
        view = ps.journal(slot)
        view[:] = b"x" * len(view)
        view.release()
    print("wrote the journals")
    """
)


def test_a_pool_state_that_does_not_fit_in_dev_shm_is_refused_at_creation() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a private tmpfs needs root")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    script = (
        "mount -t tmpfs -o size=1m tmpfs /dev/shm || exit 97; "
        f'exec "{sys.executable}" -c "$RINGBUS_CHILD"'
    )
    proc = subprocess.run(
        [unshare, "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, RINGBUS_CHILD=CHILD),
    )
    if proc.returncode == 97 or (proc.returncode == 1 and "unshare" in proc.stderr):
        pytest.skip(f"no private mount namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    (line,) = proc.stdout.splitlines()
    assert line.startswith("refused: [Errno 28]")
    assert "no room for" in line and "/dev/shm" in line
    assert str(4096 + 2 * ((1 << 20) + 2 * 4096)) in line  # the size it needed (+ histograms)
