"""cffi binding of the C core for tests: drives the C core with no Cython.

The declarations are read from ring.h (between its cffi-begin/cffi-end
markers), so the binding cannot drift from the header.  Builds are cached
under build/cffi/<hash of sources and flags>.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def core_build() -> tuple[list[Path], list[Path], list[str]]:
    """The core's sources, headers and strict flags, from csrc/build.mk (the
    one list setup.py and csrc/Makefile use too)."""
    mk = dict(re.findall(r"^(\w+)\s*=\s*(.*)$", (CSRC / "build.mk").read_text(), re.M))
    return (
        [CSRC / f for f in mk["RING_SOURCES"].split()],
        [CSRC / f for f in mk["RING_HEADERS"].split()],
        mk["RING_STRICT"].split(),
    )


SOURCES, HEADERS, STRICT_FLAGS = core_build()
STRICT = [*STRICT_FLAGS, "-O1", "-g"]


# The core's API: the ring, the limits segment, the task table's records.
PUBLIC_HEADERS = ("ring.h", "ring_limits.h", "task_records.h")


def cdef_source() -> str:
    parts = []
    for name in PUBLIC_HEADERS:
        header = (CSRC / name).read_text()
        m = re.search(r"/\* cffi-begin.*?\*/(.*)/\* cffi-end \*/", header, re.S)
        assert m, f"{name} lost its cffi markers"
        parts.append(m.group(1))
    return "\n".join(parts)


def load() -> tuple[Any, Any]:
    """Compile (once) and import the binding; returns (ffi, lib).  Fault
    points are always compiled in (armed by RINGBUS_FAULT at open)."""
    from cffi import FFI

    key = hashlib.sha256()
    for p in (*HEADERS, *SOURCES):
        key.update(p.read_bytes())
    key.update(repr(STRICT).encode())
    modname = f"_ring_cffi_{key.hexdigest()[:16]}"
    outdir = ROOT / "build" / "cffi"
    outdir.mkdir(parents=True, exist_ok=True)
    if modname in sys.modules:
        cached = sys.modules[modname]
        return cached.ffi, cached.lib
    built = list(outdir.glob(f"{modname}*.so"))
    if not built:
        ffi = FFI()
        ffi.cdef(cdef_source())
        ffi.set_source(
            modname,
            "".join(f'#include "{h}"\n' for h in PUBLIC_HEADERS),
            sources=[str(p) for p in SOURCES],
            include_dirs=[str(CSRC)],
            extra_compile_args=STRICT,
        )
        ffi.compile(tmpdir=str(outdir), verbose=False)
        built = list(outdir.glob(f"{modname}*.so"))
    spec = importlib.util.spec_from_file_location(modname, built[0])
    assert spec and spec.loader
    mod: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[modname] = mod
    return mod.ffi, mod.lib
