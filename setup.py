"""Builds the ringbus._ring extension.

The C core (the files listed in csrc/build.mk) is compiled on its own with
the strict flags listed there (C11, -Wall -Wextra -Werror); the
Cython-generated wrapper is compiled with the interpreter's usual flags.
Build switches read from the environment:

  RINGBUS_DEBUG=1              -O0 -g3, assertions kept
  RINGBUS_SANITIZE=address     AddressSanitizer (+UBSan) build of core and wrapper
  RINGBUS_SANITIZE=thread      ThreadSanitizer build
  RINGBUS_PURE_PYTHON=1        do not compile the per-task Python modules
                               (src/ringbus/_compiled.py lists them)

Run-time switches (read by the C core when a handle is opened, in every
build):

  RINGBUS_SPIN_NS=<ns>         how long a waiter spins before it yields and
                               sleeps on the futex (default 20000 = 20 us;
                               0 = never spin); Ring.set_spin() overrides it
  RINGBUS_FAULT=<point>        test fault points: put-after-claim,
                               put-mid-write or get-before-release makes the
                               process _exit(77) there
  RINGBUS_FAULT_AFTER=<n>      ...after passing that point n times
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# One list of core sources and one set of strict flags, shared with
# csrc/Makefile and tests/_cffi_ring.py.
_BUILD_MK_TEXT = (Path(__file__).resolve().parent / "csrc" / "build.mk").read_text()
_BUILD_MK = dict(re.findall(r"^(\w+)\s*=\s*(.*)$", _BUILD_MK_TEXT, re.M))
CORE = ["csrc/" + f for f in _BUILD_MK["RING_SOURCES"].split()]
HEADERS = ["csrc/" + f for f in _BUILD_MK["RING_HEADERS"].split()]
STRICT = _BUILD_MK["RING_STRICT"].split()
# Files _ring.pyx includes: a change to one must rebuild the extension.
_HERE = Path(__file__).resolve().parent
PXI = sorted(str(p.relative_to(_HERE)) for p in (_HERE / "src/ringbus").glob("*.pxi"))

debug = os.environ.get("RINGBUS_DEBUG", "") not in ("", "0")
sanitize = os.environ.get("RINGBUS_SANITIZE", "").strip()

opt = ["-O0", "-g3"] if debug else ["-O2", "-g"]
san: list[str] = []
if sanitize:
    kinds = {"address": "address,undefined", "thread": "thread", "undefined": "undefined"}
    if sanitize not in kinds:
        raise SystemExit(f"RINGBUS_SANITIZE must be one of {sorted(kinds)}, not {sanitize!r}")
    san = [f"-fsanitize={kinds[sanitize]}", "-fno-omit-frame-pointer"]


class StrictCoreBuildExt(build_ext):
    """Compile the C core with strict warnings, separately from the wrapper."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "ringbus._ring":  # a compiled Python module: no C core
            super().build_extension(ext)
            return
        objects = self.compiler.compile(
            CORE,
            output_dir=self.build_temp,
            include_dirs=["csrc"],
            extra_postargs=STRICT + opt + san + ["-fvisibility=hidden"],
            depends=[*HEADERS, "csrc/build.mk"],
        )
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


extension = Extension(
    "ringbus._ring",
    sources=["src/ringbus/_ring.pyx"],
    include_dirs=["csrc"],
    depends=[*HEADERS, *CORE, "csrc/build.mk", "src/ringbus/_cring.pxd", *PXI],
    extra_compile_args=opt + san,
    extra_link_args=san,
)

# The per-task pure-Python modules, compiled as they are (see _compiled.py:
# the one list, read here without importing the package).
_COMPILED_TEXT = (_HERE / "src/ringbus/_compiled.py").read_text()
_COMPILED_BLOCK = re.search(r"COMPILED_MODULES = \((.*?)\)", _COMPILED_TEXT, re.S)
assert _COMPILED_BLOCK is not None, "src/ringbus/_compiled.py lost COMPILED_MODULES"
COMPILED = re.findall(r'"([\w.]+)"', _COMPILED_BLOCK.group(1))
pure = os.environ.get("RINGBUS_PURE_PYTHON", "") not in ("", "0")
compiled = [
    Extension(
        name,
        sources=["src/" + name.replace(".", "/") + ".py"],
        extra_compile_args=opt + san,
        extra_link_args=san,
    )
    for name in ([] if pure else COMPILED)
]

setup(
    ext_modules=cythonize([extension], compiler_directives={"language_level": "3"}, gdb_debug=debug)
    + cythonize(
        compiled,
        # Annotations stay hints: a `float` parameter must still take an int
        # or None as the Python code does, so Cython does not type from them.
        compiler_directives={"language_level": "3", "annotation_typing": False},
        gdb_debug=debug,
    ),
    cmdclass={"build_ext": StrictCoreBuildExt},
)
