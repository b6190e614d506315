"""Child processes for tests that watch one die or finish."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any

ctx = mp.get_context("fork")


def run_to_exit(
    procs: list[mp.process.BaseProcess], target: Callable[..., Any], *args: Any, timeout: float = 60
) -> int:
    """Run ``target(*args)`` in a forked child (registered with the ``procs``
    fixture, which kills it if the test fails) and return its exit status."""
    p = ctx.Process(target=target, args=args)
    procs.append(p)
    p.start()
    p.join(timeout)
    assert p.exitcode is not None, f"child {target.__name__} hung"
    return p.exitcode
