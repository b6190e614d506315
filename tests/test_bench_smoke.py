"""The benchmark suite runs (its tiniest mode, seconds) through ``ringbus
bench`` and writes a well-formed table and JSON.  No speed is asserted here:
speed is what ``python -m bench.compare`` reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ringbus_bench_writes_the_table_and_the_json(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ringbus.cli", "bench", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 1→1 64 B per call | ringbus put_bytes/get_bytes |" in out.stdout
    assert "| 64 B ping-pong RTT | p50 µs |" in out.stdout
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["machine"]["cores"] and doc["machine"]["versions"]["ringbus"]
    cells = {(c["kind"], c["peer"]) for c in doc["cells"]}
    assert ("throughput", "ringbus put_bytes/get_bytes") in cells
    assert ("throughput", "multiprocessing.Queue") in cells
    for c in doc["cells"]:
        for rep in c["reps"]:
            # a number (msg/s), a list of latencies, never an error
            assert isinstance(rep, (int, float, list)), rep
            if c["kind"] == "throughput":
                assert isinstance(rep, (int, float)) and rep > 0
    assert (tmp_path / "results.md").read_text().startswith("ringbus vs peers")


def test_concurrency_bench_writes_the_tables_and_the_json(tmp_path: Path) -> None:
    out_json = tmp_path / "concurrency.json"
    out = subprocess.run(
        [sys.executable, "-m", "bench.concurrency", "--quick", "--out", str(out_json)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for row in (
        "| ringbus, `async def` handler (`asyncio.sleep`) | 2,000 |",
        "| `multiprocessing.Pool(4).apply_async` | 200 |",
        "| concurrency 64, `async def` handler |",
        "| concurrency 64, 64 async tasks in flight |",
    ):
        assert row in out.stdout
    doc = json.loads(out_json.read_text())
    assert doc["quick"] and doc["reps"] == 1 and doc["machine"]["cores"]
    cells = doc["cells"]
    assert all(rep["rate"] > 0 for key in cells if key != "memory" for rep in cells[key])
    assert all(rep["busy_c64"] > 0 for rep in cells["memory"])
