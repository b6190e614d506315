"""``ringbus bench``: the quick mode of the benchmark suite (``bench/compare.py``).

The suite lives in the source tree's ``bench/`` (it needs the peers of the
``bench`` extra and builds the C reference from ``csrc/``): the command finds
it next to an editable install or in the current directory.

Exit codes: 0 done, 2 the suite was not found (run from a source checkout).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

USAGE = """usage: ringbus bench [--reps N] [--out DIR]

Quick run of the benchmark suite (under a minute): ringbus against
multiprocessing.Queue/SimpleQueue, faster-fifo, pyzmq, Redis lists and the
stdlib pools, plus the C reference; peers that are not installed show n/a.
Writes results.md, results.json and PNG plots (default bench/results/quick).

examples:
  ringbus bench                         # quick mode, from a source checkout
  ringbus bench --reps 3 --out /tmp/rb  # 3 repetitions per cell, files in /tmp/rb
  python -m bench.compare               # the full run (about 7-10 minutes)

exit codes: 0 done, 2 the suite was not found (bench/ is not in a wheel: run
from a ringbus source checkout) or bad arguments
"""


def _find_suite() -> Any:
    here = Path(__file__).resolve()
    for root in (Path.cwd(), here.parents[2]):  # cwd, or the checkout of src/ringbus
        if (root / "bench" / "compare.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return importlib.import_module("bench.compare")
    return None


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    suite = _find_suite()
    if suite is None:
        print(
            "ringbus bench: the benchmark suite (bench/compare.py) is not here; run it from a "
            f"ringbus source checkout (looked in {os.getcwd()})",
            file=sys.stderr,
        )
        return 2
    return int(suite.main(["--quick", *argv]))
