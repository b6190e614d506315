"""The demo end to end, in a reduced size: real uvicorn workers, real task
workers (several mails at once each, over aiosmtplib), a real SMTP server.
Every mail must arrive and the rate of their arrival be printed, the offloaded
p50 must be lower than the inline p50 (one run, a comparison, not a time),
and nothing it started may survive it, also when it is interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

for _mod in ("starlette", "uvicorn", "aiosmtpd", "aiosmtplib", "matplotlib"):
    pytest.importorskip(_mod)

SHM = Path("/dev/shm")
MARK = "RINGBUS_DEMO_TEST_MARK"


def marked_pids(mark: str) -> list[int]:
    """Live processes whose environment carries ``mark`` (every process the demo
    starts inherits it, whatever session or parent it ends up with)."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        zombie = stat[stat.rfind(b")") + 2 :][:1] in (b"Z", b"X")
        if needle in env.split(b"\0") and not zombie:
            found.append(int(entry))
    return found


@pytest.fixture
def demo_env() -> Iterator[tuple[dict[str, str], str]]:
    """Environment for a demo run; whatever carries its mark is killed afterwards."""
    mark = uuid.uuid4().hex
    yield {**os.environ, MARK: mark}, mark
    for pid in marked_pids(mark):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def demo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ringbus.demo", *args]


def assert_nothing_left(mark: str, bus: str | None) -> None:
    left: list[int] = []
    for _ in range(50):  # a killed process can take a moment to be reaped by init
        left = marked_pids(mark)
        if not left:
            break
        time.sleep(0.1)
    assert left == [], f"processes left behind by the demo: {left}"
    if bus is not None:
        assert not list(SHM.glob(f"ringbus-{bus}-*")), "segments left behind by the demo"


def test_demo_end_to_end(tmp_path: Path, demo_env: tuple[dict[str, str], str]) -> None:
    env, mark = demo_env
    n = 40
    plot, out = tmp_path / "demo.png", tmp_path / "demo.json"
    proc = subprocess.run(
        demo_cmd(
            "--requests",
            str(n),
            "--concurrency",
            "4",
            "--workers",
            "2",
            "--task-workers",
            "2",
            "--task-concurrency",
            "8",
            "--smtp-delay",
            "0.05",
            "--reports",
            "6",
            "--plot",
            str(plot),
            "--json-out",
            str(out),
        ),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    res: dict[str, Any] = json.loads(out.read_text())
    inline, offload, report = res["inline"], res["ringbus"], res["report"]
    # every request answered, every mail arrived
    assert inline["ok"] == n and inline["errors"] == 0 and inline["mails"] == n
    assert offload["ok"] == n and offload["errors"] == 0 and offload["mails"] == n
    assert offload["all_mails_after_s"] is not None and offload["mails_per_s"] > 0
    assert report["ok"] == 6 and report["errors"] == 0
    # the point of the demo, compared within one run
    assert offload["p50_ms"] < inline["p50_ms"]
    # the printed table and summary say the same
    assert "ringbus: bus.send" in proc.stdout and "inline: SMTP in the handler" in proc.stdout
    assert f"{n}/{n}" in proc.stdout and f"mails arrived: {2 * n}/{2 * n}" in proc.stdout
    rate = f"{offload['mails_per_s']:,.0f} mails/s"
    assert f"the last of the {n} ringbus mails arrived" in proc.stdout and rate in proc.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(res["processes"]) == ["smtp-sink", "task-workers", "uvicorn"]
    assert res["config"]["task_concurrency"] == 8
    assert res["teardown"] == []  # every server stopped by itself when asked
    assert_nothing_left(mark, res["config"]["bus"])


def test_demo_ctrl_c_tears_everything_down(
    tmp_path: Path, demo_env: tuple[dict[str, str], str]
) -> None:
    env, mark = demo_env
    proc = subprocess.Popen(
        demo_cmd("--requests", "100000", "--concurrency", "4", "--plot", ""),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        bus = None
        for line in proc.stderr:  # until the load runs: every server is up
            if "serving bus" in line:
                bus = line.split("'")[1]
            if line.startswith("sending"):
                break
        else:
            pytest.fail(f"the demo did not start: {proc.communicate(timeout=60)}")
        assert bus is not None and list(SHM.glob(f"ringbus-{bus}-*"))
        assert len(marked_pids(mark)) >= 6  # demo, sink, worker pool, uvicorn and its workers
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the demo
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "interrupted" in err
        assert_nothing_left(mark, bus)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
