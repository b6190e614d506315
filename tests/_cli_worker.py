"""A ``ringbus worker MODULE:bus`` subprocess of a test, its stderr lines
collected; the ``start_worker`` fixture stops every one it started."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from _ops_support import Worker, cli_env


class CliWorker(Worker):
    def __init__(self, target: str, bus_name: str, args: list[str], env: dict[str, str]) -> None:
        super().__init__(bus_name, *args, env=cli_env(bus_name, **env), target=target)


@pytest.fixture(name="start_worker")
def start_worker_fixture() -> Iterator[Any]:
    """``start_worker(target, bus_name, *args, **env) -> CliWorker`` (serving)."""
    started: list[CliWorker] = []

    def start(target: str, bus_name: str, *args: str, **env: str) -> CliWorker:
        w = CliWorker(target, bus_name, list(args), env)
        started.append(w)
        w.wait_serving()
        return w

    yield start
    for w in started:
        w.stop()
