"""Task types and helpers of tests/test_redis_queues.py (importable by its
worker processes)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SlowMail:
    """On the mail queue: appends ``slow <n>`` to ``log``, then sleeps (and
    waits for the file ``until``, if given)."""

    log: str
    seconds: float
    n: int = 0
    until: str = ""


def slow_mail(task: SlowMail) -> int:
    with open(task.log, "a") as f:
        f.write(f"slow {task.n}\n")
    time.sleep(task.seconds)
    while task.until and not os.path.exists(task.until):
        time.sleep(0.01)
    return os.getpid()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
