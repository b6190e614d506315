"""The C core's threaded stress test, built and run from pytest (no Python in it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from _cffi_ring import CSRC, SOURCES, STRICT_FLAGS

STRICT = [*STRICT_FLAGS, "-pthread"]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def build(out: Path, *flags: str) -> Path:
    subprocess.run(
        ["gcc", *STRICT, *flags, *map(str, SOURCES), str(CSRC / "tests" / "stress.c"),
         "-o", str(out)],
        check=True,
    )
    return out


def run(exe: Path, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK"), proc.stdout
    assert "lost=0 duplicated=0 failures=0" in proc.stdout
    return proc.stdout


@pytest.mark.parametrize(
    "args",
    [("4", "4", "100000", "64"), ("4", "4", "50000", "16"), ("1", "1", "200000", "64"),
     ("8", "2", "20000", "128")],
    ids=["4x4", "4x4-tiny-ring", "spsc", "8x2"],
)
def test_stress_exactly_once(tmp_path: Path, args: tuple[str, ...]) -> None:
    exe = build(tmp_path / "stress", "-O2")
    print(run(exe, *args))


def test_stress_under_thread_sanitizer(tmp_path: Path) -> None:
    exe = build(tmp_path / "stress-tsan", "-O1", "-g", "-fsanitize=thread")
    out = run(exe, "4", "4", "20000", "32",
              env={"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    print(out)
