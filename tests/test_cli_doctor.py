"""``ringbus doctor`` on this machine, with a dead process's segment left
behind, and in a mount namespace whose /dev/shm is tiny."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _ops_support import SHM, cli_env, ringbus_cli
from ringbus.cli.doctor import remove_ipc_setting

CHECKS = {"shm-size", "namespace", "user", "RemoveIPC", "leftovers"}


def doctor(*args: str) -> tuple[int, list[dict[str, Any]]]:
    out = ringbus_cli("doctor", "--json", *args, env=cli_env("x"))
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_doctor_on_this_machine() -> None:
    # Leftovers only under a prefix of our own: other test runs on this
    # machine leave and remove segments meanwhile.
    mine = f"ringbus-test-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
    code, findings = doctor("--prefix", mine)
    assert {f["check"] for f in findings} >= CHECKS
    problems = [f for f in findings if f["level"] in ("warn", "FAIL")]
    assert code == (1 if problems else 0)
    assert all(f["fix"] for f in problems)  # every problem says what to change
    (user,) = [f for f in findings if f["check"] == "user"]
    assert f"uid {os.geteuid()}" in user["text"]
    human = ringbus_cli("doctor", "--prefix", mine, env=cli_env("x"))
    assert human.returncode == code
    assert ("no problems found" if code == 0 else "problem(s) found") in human.stdout


@pytest.fixture
def dead_ring() -> Iterator[str]:
    """A ring whose creator exited without removing it."""
    name = f"/ringbus-test-{os.getpid()}-{uuid.uuid4().hex[:8]}-doctor"
    code = "import os, sys; from ringbus import Queue; q = Queue(8, name=sys.argv[1]); os._exit(0)"
    subprocess.run([sys.executable, "-c", code, name], check=True, timeout=60, env=cli_env("x"))
    yield name
    (SHM / name.lstrip("/")).unlink(missing_ok=True)


def test_doctor_points_at_segments_of_dead_processes(dead_ring: str) -> None:
    # --prefix: segments that other test runs leave meanwhile are not counted
    code, findings = doctor("--prefix", dead_ring.lstrip("/"))
    assert code == 1
    left = [f for f in findings if f["check"] == "leftovers" and f["level"] == "warn"]
    assert left and dead_ring in left[0]["text"], findings
    assert "ringbus gc" in left[0]["fix"]


def test_remove_ipc_from_logind_conf_and_drop_ins(tmp_path: Path) -> None:
    assert remove_ipc_setting(str(tmp_path)) == (True, "by default")
    conf = tmp_path / "etc/systemd/logind.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[Login]\n#RemoveIPC=yes\nRemoveIPC=no\n")
    on, where = remove_ipc_setting(str(tmp_path))
    assert not on and str(conf) in where
    vendor = tmp_path / "usr/lib/systemd/logind.conf.d/10-vendor.conf"
    vendor.parent.mkdir(parents=True)
    vendor.write_text("[Login]\nRemoveIPC=yes\n")
    assert remove_ipc_setting(str(tmp_path))[0] is True  # drop-ins win over logind.conf
    local = tmp_path / "etc/systemd/logind.conf.d/90-ringbus.conf"
    local.parent.mkdir(parents=True)
    local.write_text("[Login]\nRemoveIPC=no\n")
    assert remove_ipc_setting(str(tmp_path)) == (False, f"{local} (RemoveIPC=no)")


def test_remove_ipc_warns_for_a_regular_user() -> None:
    logind = any(os.path.exists(f"{d}/systemd/systemd-logind") for d in ("/lib", "/usr/lib"))
    if not logind or not remove_ipc_setting()[0]:
        pytest.skip("systemd-logind with RemoveIPC=yes is not on this machine")
    _, findings = doctor("--user", "54321")
    (rm,) = [f for f in findings if f["check"] == "RemoveIPC"]
    assert rm["level"] == "warn" and "RemoveIPC=no" in rm["fix"]
    _, findings = doctor("--user", "0")
    (rm,) = [f for f in findings if f["check"] == "RemoveIPC"]
    assert rm["level"] == "ok"


def test_doctor_in_a_namespace_with_a_tiny_dev_shm() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs in a new mount namespace needs root")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) on this machine")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m is not permitted here: {probe.stderr.decode().strip()}")
    script = (
        "mount -t tmpfs -o size=1m tmpfs /dev/shm && "
        f"{sys.executable} -m ringbus.cli doctor"
    )
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=cli_env("x"),
        timeout=120,
    )
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "shm-size: /dev/shm is 1.0 MiB" in out.stdout and "under 256.0 MiB" in out.stdout
    assert "fix: " in out.stdout and "--shm-size" in out.stdout
