"""The pure-Python modules that the build also compiles with Cython.

They are the per-task path: a task's dispatch, its worker's loop and the
reply's way back.  Compiled as they are, without Cython types: the ``.py``
stays the one source (ruff and mypy check it), the compiled module beside
it is what ``import`` finds first, and the interpreter's bytecode dispatch
and frames are gone from every task's steps.  ``RINGBUS_PURE_PYTHON=1`` at
build time compiles none of them (``setup.py`` reads this list).

A compiled module older than its source (edited or checked out since the
last build) would run the old code: ``stale_modules()`` names them, and the
test suite refuses to start until ``pip install -e .`` rebuilds them.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["COMPILED_MODULES", "compiled_modules", "module_files", "stale_modules"]

COMPILED_MODULES = (
    "ringbus.server.worker",
    "ringbus.tasks.bus",
    "ringbus.tasks.codec",
    "ringbus.tasks.context",
    "ringbus.tasks.control",
    "ringbus.tasks.results",
    "ringbus.tasks.tracking",
    "ringbus.transport.shm",
    "ringbus.transport.shm_results",
)


def module_files(name: str) -> tuple[str, str | None]:
    """(the module's source, its compiled file or None) without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"no module {name}")
    origin = spec.origin
    if origin.endswith(".py"):
        return origin, None
    base = os.path.join(os.path.dirname(origin), name.rsplit(".", 1)[1] + ".py")
    return base, origin


def compiled_modules() -> list[str]:
    """The modules of COMPILED_MODULES that import from a compiled file."""
    return [name for name in COMPILED_MODULES if module_files(name)[1] is not None]


def stale_modules() -> list[str]:
    """Compiled modules whose source changed after they were built."""
    out = []
    for name in COMPILED_MODULES:
        source, built = module_files(name)
        if built is not None and os.path.exists(source):
            if os.stat(source).st_mtime > os.stat(built).st_mtime:
                out.append(name)
    return out
