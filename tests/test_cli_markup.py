"""Values from tasks, brokers and files print as written in every CLI table:
``[/etc/app]`` in an exception message must not crash ``ringbus dead-letters``
(rich MarkupError) and ``[bold]x[/bold]`` must not be styled away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _tasks_support import bus_name_fixture  # noqa: F401 - fixture
from ringbus import TaskBus, TaskServer

SHM = Path("/dev/shm")
TESTS = Path(__file__).parent
NASTY = "cannot read [/etc/app]: [bold]x[/bold]"


@dataclass
class Nasty:
    message: str


def _raise(task: Nasty) -> None:
    raise ValueError(task.message)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringbus.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path])),
    )


def test_dead_letters_print_reasons_as_written(bus_name: str) -> None:
    bus = TaskBus(bus_name)
    bus.register(Nasty, _raise, retries=0)
    try:
        with TaskServer(bus, workers=1, start_method="fork"):
            with pytest.raises(ValueError, match=r"\[/etc/app\]"):
                bus.dispatch(Nasty(NASTY)).result(timeout=30)
        (dead,) = bus.dead_letters()
        assert NASTY in dead.reason
        listed = cli("dead-letters", bus_name)
        assert listed.returncode == 0, listed.stderr
        assert "MarkupError" not in listed.stderr
        assert NASTY in listed.stdout
        assert "Nasty" in listed.stdout
        doc = json.loads(cli("dead-letters", bus_name, "--json").stdout)
        assert NASTY in doc["dead_letters"][0]["reason"]
    finally:
        bus.destroy()


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"ringbus-test-{os.getpid()}-{uuid.uuid4().hex[:10]}-"
    yield p
    for f in SHM.glob(p + "*"):
        f.unlink(missing_ok=True)


def test_ls_prints_segment_names_and_errors_as_written(prefix: str) -> None:
    # Files with a ring's or a pool's magic are listed whatever their name
    # (a file name has no '/', so no closing tag: markup would style these).
    names = [f"{prefix}[bold]x", f"{prefix}[red]y[dim]"]
    for name, magic in zip(names, (b"RINGBUS1", b"RBPOOL01"), strict=True):
        fd = os.open(SHM / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, magic + bytes(8192))
        finally:
            os.close(fd)
    human = cli("ls", "--prefix", prefix)
    assert human.returncode == 0, human.stderr
    for name in names:
        assert "/" + name in human.stdout
    assert human.stdout.count("broken") == 2
    rows = json.loads(cli("ls", "--prefix", prefix, "--json").stdout)
    assert sorted(r["name"] for r in rows) == sorted("/" + n for n in names)
    assert {r["kind"] for r in rows} == {"broken"}
    plan = json.loads(cli("gc", "--prefix", prefix, "--json").stdout)
    assert {r["action"] for r in plan} == {"keep"}


def _text(renderable: Any) -> str:
    from rich.console import Console

    con = Console(record=True, width=400, file=open(os.devnull, "w"))
    try:
        con.print(renderable)
        return con.export_text()
    finally:
        con.file.close()


def test_stats_tables_print_task_types_names_and_addresses_as_written() -> None:
    from ringbus.cli.render import render_stats

    worker: dict[str, Any] = {
        "slot": 0,
        "worker_pid": 123,
        "state": "running",
        "task_type": "app.[/etc/app].[bold]Job[/bold]",
        "running_for": 0.5,
        "up_for": 3.0,
        "tasks_done": 1,
    }
    doc = {
        "name": "shop",
        "time": 0.0,
        "ring": None,
        "broker": {
            "transport": "redis://[bold]h[/bold]:6379/0",
            "pending_tasks": 1,
            "dead_letters": 2,
        },
        "bus": {
            "name": "shop",
            "servers": [{"path": "/dev/shm/p", "server_pid": 7, "workers": [worker]}],
            "reply_rings": [
                {"name": "/reply-[/etc/app]", "dispatcher_pid": 9, "alive": True, "depth": 0}
            ],
            "unreadable_pools": [{"path": "/dev/shm/[bold]p[/bold]", "error": "bad [/x]"}],
            "totals": {},
            "dead_letters": 2,
        },
    }
    out = _text(render_stats(doc))
    for literal in (
        "app.[/etc/app].[bold]Job[/bold]",
        "redis://[bold]h[/bold]:6379/0",
        "/reply-[/etc/app]",
        "/dev/shm/[bold]p[/bold]",
        "bad [/x]",
    ):
        assert literal in out
