"""The results: the machine, the markdown tables (results.md), results.json and
the PNG plots."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import Plan
from bench.peers import Peer


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("ringbus", "faster-fifo", "pyzmq", "redis"):
        try:  # the installed distribution: faster-fifo has no __version__
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "n/a"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "versions": versions,
    }


def _pct(lat: list[float], q: float) -> float:
    return lat[min(len(lat) - 1, int(len(lat) * q))]


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1024 else f"{n} B"


def _median(vals: list[Any]) -> float | None:
    nums = [v for v in vals if isinstance(v, (int, float))]
    return statistics.median(nums) if nums else None


def render(
    results: dict[tuple[str, str, int, int], list[Any]],
    peers: list[Peer],
    missing: list[str],
    plan: Plan,
    extra: dict[str, Any],
    m: dict[str, Any],
) -> str:
    out = [
        f"ringbus vs peers, {m['date']}: {m['cpu']}, {m['cores']} cores, Python "
        f"{m['python']}, Linux {m['kernel']}. Median of {plan.reps} (min-max); ratios to "
        "multiprocessing.Queue and to the best peer that is not ringbus, same payload and mode.",
        "",
        "| scenario | peer | msg/s (min-max) | MB/s | vs mp.Queue | vs best peer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for size in plan.sizes:
        for nproc in plan.procs:
            med = {
                p.name: _median(results.get(("throughput", p.name, size, nproc), [])) for p in peers
            }
            base = med.get("multiprocessing.Queue")
            for p in peers:
                if p.payload != "bytes" and size != 64:
                    continue  # small-object rows run at 64 B only
                vals = results.get(("throughput", p.name, size, nproc), [])
                v = med[p.name]
                if v is None:
                    err = next((x["error"] for x in vals if isinstance(x, dict)), "n/a")
                    out.append(f"| {nproc}→{nproc} {_size(size)} | {p.name} | {err} | | | |")
                    continue
                rivals = [
                    med[q.name]
                    for q in peers
                    if not q.ours and q.per_call == p.per_call and med[q.name] is not None
                ]
                best = max(rivals, default=None)  # type: ignore[type-var]
                nums = [x for x in vals if isinstance(x, (int, float))]
                mode = "per call" if p.per_call else "batched"
                out.append(
                    f"| {nproc}→{nproc} {_size(size)} {mode} | {p.name} | {v:,.0f} "
                    f"({min(nums):,.0f}-{max(nums):,.0f}) | {v * size / 1e6:,.1f} | "
                    + (f"{v / base:.2f}x | " if base else "– | ")
                    + (f"{v / best:.2f}x |" if best else "– |")
                )
    out += ["", "| 64 B ping-pong RTT | p50 µs | p99 µs | p99.9 µs |", "|---|---:|---:|---:|"]
    for p in peers:
        runs = [r for r in results.get(("pingpong", p.name, 64, 1), []) if isinstance(r, list)]
        if runs:
            cols = [statistics.median(_pct(r, q) for r in runs) for q in (0.5, 0.99, 0.999)]
            out.append(f"| {p.name} | {cols[0]:.2f} | {cols[1]:.2f} | {cols[2]:.2f} |")
    cref = extra.get("c_reference", {})
    if "1to1_per_call" in cref:
        ours_call = _median(results.get(("throughput", "ringbus put_bytes/get_bytes", 64, 1), []))
        ours_batch = _median(
            results.get(("throughput", "ringbus put_bytes_many/get_bytes_many", 64, 1), [])
        )
        c1, cb = cref["1to1_per_call"]["msg_per_s"], cref["1to1_batch256"]["msg_per_s"]
        out += [
            "",
            "| C reference (no Python, processes) | msg/s or µs | Python API reaches |",
            "|---|---:|---:|",
            f"| 1→1 64 B per call | {c1:,.0f} | "
            + (f"{ours_call / c1:.0%} (put_bytes/get_bytes) |" if ours_call else "– |"),
            f"| 1→1 64 B batch 256 | {cb:,.0f} | "
            + (f"{ours_batch / cb:.0%} (put_bytes_many) |" if ours_batch else "– |"),
            f"| 4→4 64 B per call | {cref['4to4_per_call']['msg_per_s']:,.0f} | |",
            f"| ping-pong p50 / p99 | {cref['pingpong']['p50_ns'] / 1e3:.2f} / "
            f"{cref['pingpong']['p99_ns'] / 1e3:.2f} µs | |",
        ]
    if extra.get("tasks"):
        rows = extra["tasks"]
        pool = next((r for r in rows if "Pool" in r["name"] and "apply" in r["name"]), None)
        out += [
            "",
            "| task round trip, 2 workers | p50 µs (min-max) | p99 µs | p99.9 µs "
            "| tasks/s (min-max) | p50 vs Pool | tasks/s vs Pool |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lat = r["p50"] == r["p50"]
            out.append(
                f"| {r['name']} | "
                + (
                    f"{r['p50']:.1f} ({r.get('p50_min', r['p50']):.1f}-"
                    f"{r.get('p50_max', r['p50']):.1f}) | {r['p99']:.1f} | {r['p999']:.1f} | "
                    if lat
                    else "– | – | – | "
                )
                + f"{r['rate']:,.0f} ({r.get('rate_min', r['rate']):,.0f}-"
                f"{r.get('rate_max', r['rate']):,.0f}) | "
                + (f"{pool['p50'] / r['p50']:.1f}x | " if pool and lat else "– | ")
                + (f"{r['rate'] / pool['rate']:.1f}x |" if pool else "– |")
            )
    if extra.get("task_hangs"):
        out += [
            "",
            f"Task round trips: {len(extra['task_hangs'])} repetition(s) hung and were "
            "killed (not counted in the medians).",
        ]
    if "idle" in extra:
        w, own = extra["idle"]
        out += [
            "",
            f"Idle pool of 4 workers over {extra['idle_seconds']:.0f} s: workers "
            f"{w:.2f} % of a core in total, server + reader process {own:.2f} %.",
        ]
    if "memory" in extra:
        out += [
            "",
            "| ring memory | capacity | segment bytes | bytes per slot | RSS after create "
            "| RSS after a full pass of 64 B | RSS per slot |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for k, v in extra["memory"].items():
            out.append(
                f"| {k} | {v['capacity']} | {v['segment_bytes']:,} | {v['bytes_per_slot']} | "
                f"{v.get('rss_after_create', 0):,} | {v.get('rss_after_full_pass', 0):,} | "
                f"{v.get('rss_per_slot', '–')} |"
            )
    for name in missing:
        out.append(f"\n{name}: n/a (not installed)")
    return "\n".join(out)


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> Path:
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plots(
    results: dict[tuple[str, str, int, int], list[Any]], peers: list[Peer], plan: Plan, outdir: Path
) -> list[Path]:
    """Throughput by payload size, latency CDF and scaling by process count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in peers:
        ys = [_median(results.get(("throughput", p.name, s, 1), [])) for s in plan.sizes]
        pts = [(s, y * s / 1e6) for s, y in zip(plan.sizes, ys, strict=True) if y]
        if pts:
            ax.plot(*zip(*pts, strict=False), marker="o", label=p.name, lw=2.5 if p.ours else 1.2)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="payload bytes",
        ylabel="MB/s (1→1)",
        title="Throughput by payload size",
    )
    made.append(_save(plt, fig, ax, outdir / "throughput_by_size.png"))
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in peers:
        runs = [r for r in results.get(("pingpong", p.name, 64, 1), []) if isinstance(r, list)]
        if runs:
            lat = runs[-1]
            ax.plot(
                lat,
                [i / len(lat) for i in range(len(lat))],
                label=p.name,
                lw=2.5 if p.ours else 1.2,
            )
    ax.set(
        xscale="log",
        xlabel="round trip µs (64 B)",
        ylabel="fraction",
        title="Ping-pong latency CDF",
    )
    made.append(_save(plt, fig, ax, outdir / "latency_cdf.png"))
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in peers:
        ys = [_median(results.get(("throughput", p.name, 64, n), [])) for n in plan.procs]
        pts = [(n, y) for n, y in zip(plan.procs, ys, strict=True) if y]
        if pts:
            ax.plot(*zip(*pts, strict=False), marker="o", label=p.name, lw=2.5 if p.ours else 1.2)
    ax.set(
        yscale="log",
        xlabel="producers = consumers",
        ylabel="msg/s (64 B)",
        title="Scaling by process count",
        xticks=plan.procs,
    )
    made.append(_save(plt, fig, ax, outdir / "scaling.png"))
    return made


def write_results(
    outdir: Path,
    table: str,
    results: dict[tuple[str, str, int, int], list[Any]],
    plan: Plan,
    extra: dict[str, Any],
    m: dict[str, Any],
    quick: bool,
) -> None:
    """results.md (the tables and the command) and results.json (every repetition,
    latencies thinned to about 200 points, the machine and the extra sections)."""
    command = "python -m bench.compare" + (" --quick" if quick else "")
    (outdir / "results.md").write_text(f"{table}\n\nReproduce: `{command}`\n")
    doc = {
        "machine": m,
        "command": command,
        "reps": plan.reps,
        "cells": [
            {
                "kind": k[0],
                "peer": k[1],
                "size": k[2],
                "procs": k[3],
                "reps": [v[:: max(1, len(v) // 200)] if isinstance(v, list) else v for v in vals],
            }
            for k, vals in results.items()
        ],
        **extra,
    }
    (outdir / "results.json").write_text(json.dumps(doc, indent=1, default=str))
