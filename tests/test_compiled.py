"""Scope: ``ringbus/_compiled.py``, the per-task modules the build compiles:
the suite runs the compiled modules (not their sources) unless the build
was told not to compile them, and a source edited after the build is
named as stale."""

from __future__ import annotations

import importlib
import os
import time

import pytest

from ringbus._compiled import COMPILED_MODULES, compiled_modules, module_files, stale_modules


def test_the_suite_runs_the_compiled_modules() -> None:
    if os.environ.get("RINGBUS_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("built with RINGBUS_PURE_PYTHON=1")
    assert compiled_modules() == list(COMPILED_MODULES)
    for name in COMPILED_MODULES:
        assert not importlib.import_module(name).__file__.endswith(".py"), name  # type: ignore[union-attr]


def test_a_source_newer_than_its_compiled_module_is_stale() -> None:
    built = compiled_modules()
    if not built:
        pytest.skip("no compiled modules in this build")
    name = built[0]
    py = module_files(name)[0]
    st = os.stat(py)
    assert name not in stale_modules()
    try:
        later = time.time() + 60
        os.utime(py, (later, later))
        assert name in stale_modules()
    finally:
        os.utime(py, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert name not in stale_modules()
