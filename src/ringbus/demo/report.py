"""The demo's results on screen and on paper: the rich table and the PNG plot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["plot", "table"]


def table(res: dict[str, Any], n: int) -> Any:
    from rich.table import Table

    t = Table(title="ringbus demo: the welcome mail of POST /signup, inline vs. on the bus")
    for col, just in (
        ("mode", "left"),
        ("requests", "right"),
        ("errors", "right"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
        ("req/s", "right"),
        ("mails arrived", "right"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]

    def row(label: str, r: dict[str, Any], mails: str) -> None:
        t.add_row(
            label,
            str(r["requests"]),
            str(r["errors"]),
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['throughput_rps']:,.0f}",
            mails,
        )

    row("inline: SMTP in the handler", res["inline"], f"{res['inline']['mails']}/{n}")
    rb = res["ringbus"]
    after = ""
    if rb["all_mails_after_s"]:
        after = f" in {rb['all_mails_after_s']:.2f} s ({rb['mails_per_s']:,.0f}/s)"
    row("ringbus: bus.send", rb, f"{rb['mails']}/{n}{after}")
    if "report" in res:
        row("report: await dispatch_async", res["report"], "-")
    return t


def plot(res: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat: dict[str, list[float]] = res["_lat"]
    labels = {
        "inline": "inline (SMTP in the request)",
        "ringbus": "ringbus (bus.send)",
        "report": "report (await dispatch_async)",
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for key, values in lat.items():
        if not values:
            continue
        ms = sorted(v * 1000 for v in values)
        frac = [(i + 1) / len(ms) for i in range(len(ms))]
        left.step(ms, frac, where="post", label=labels[key])
    left.set_xscale("log")
    left.set_xlabel("request latency (ms, log scale)")
    left.set_ylabel("fraction of requests")
    left.set_title("latency distribution")
    left.grid(True, which="both", alpha=0.3)
    left.legend(loc="lower right")

    modes = [k for k in ("inline", "ringbus", "report") if k in res]
    x = range(len(modes))
    p50 = [res[m]["p50_ms"] for m in modes]
    p99 = [res[m]["p99_ms"] for m in modes]
    right.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
    right.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    for i, m in enumerate(modes):
        right.annotate(
            f"{res[m]['throughput_rps']:,.0f} req/s",
            (i, max(p50[i], p99[i])),
            ha="center",
            va="bottom",
        )
    right.set_xticks(list(x), [labels[m].split(" (")[0] for m in modes])
    right.set_ylabel("ms")
    right.set_title("p50 / p99 latency and throughput")
    right.legend()
    fig.suptitle(
        f"ringbus demo: {args.requests} requests, concurrency {args.concurrency}, "
        f"{args.workers} web workers, {args.task_workers} task workers x "
        f"{args.task_concurrency}, "
        f"SMTP delay {args.smtp_delay * 1000:.0f} ms"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
