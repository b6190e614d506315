"""Processes in another PID namespace (containers sharing /dev/shm but not
their pids) are never judged dead: their pids mean nothing in our /proc."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ringbus import Queue

TESTS = Path(__file__).resolve().parent

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to unshare a PID namespace"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
]

HOLDER = """
    import sys, time
    from ringbus import Queue

    class Slow:
        @staticmethod
        def dumps(obj):
            return obj

        @staticmethod
        def loads(data):
            # called between claim and release: the claim stays held
            print("holding", flush=True)
            time.sleep(120)
            return data

    q = Queue.attach(sys.argv[1], serializer=Slow())
    q.get(timeout=30)
"""


def test_recover_never_frees_a_claim_of_another_pid_namespace(shm_name: str) -> None:
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot unshare a PID namespace here: {probe.stderr.strip()}")
    with Queue(8, name=shm_name) as q:
        q.put_bytes(b"held by the container")
        q.put_bytes(b"second")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        child = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
             sys.executable, "-c", textwrap.dedent(HOLDER), shm_name],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "holding", child.stderr
            # the holder's pid in its namespace is 1 or so: alive here too,
            # but as another process, started at another time
            parts = [p for p in q.participants() if p["getting"]]
            assert len(parts) == 1 and parts[0]["pid"] != child.pid
            got = q.recover(requeue=False)
            assert got["recovered"] == 0 and got["messages"] == [], got
            assert q.stats()["recovered"] == 0
            # its claim is still its own: only the second message is ours
            assert q.get_bytes(timeout=5) == b"second"
            assert [p["getting"] for p in q.participants() if p["getting"]] == [True]
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate(timeout=30)
