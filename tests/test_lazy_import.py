"""Scope: the package's public face: ``from ringbus import Queue`` loads the ring
and the queue only (no task layer, no server, no hooks), and every public
exception has one root; the transports load no task code."""

from __future__ import annotations

import subprocess
import sys

import ringbus


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {m for m in out.stdout.split() if m.startswith("ringbus")}


def test_the_queue_loads_no_task_code() -> None:
    loaded = _modules_after("import ringbus; ringbus.Queue; from ringbus import Queue")
    assert loaded <= {
        "ringbus",
        "ringbus._ring",
        "ringbus.errors",
        "ringbus.queue",
        "ringbus._serializers",
    }
    assert not {m for m in loaded if m.split(".")[1:2] in (["tasks"], ["server"], ["transport"])}


def test_the_bus_is_loaded_when_used() -> None:
    loaded = _modules_after("from ringbus import TaskBus")
    assert "ringbus.tasks.bus" in loaded and "ringbus.server.supervisor" not in loaded


def test_every_public_exception_has_one_root() -> None:
    for name in ringbus.__all__:
        obj = getattr(ringbus, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, ringbus.RingbusError), name


def test_the_transports_load_no_task_code() -> None:
    """The transport layer carries bytes: loading every shared-memory and
    Redis transport module imports nothing of the task layer or the server
    (``transport/inline.py`` runs tasks in the caller and is left out)."""
    import pathlib

    folder = pathlib.Path(ringbus.__file__).parent / "transport"
    names = sorted(
        f"ringbus.transport.{p.stem}"
        for p in folder.glob("*.py")
        if p.stem not in ("__init__", "inline")
    )
    assert "ringbus.transport.shm_results" in names
    loaded = _modules_after("import " + ", ".join(names))
    reach = {m for m in loaded if m.split(".")[1:2] in (["tasks"], ["server"])}
    assert not reach, f"the transport layer imports {sorted(reach)}"
