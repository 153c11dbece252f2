"""Draw soak traces (`benchmarks/soak.py --trace FILE`): resident memory against time and against frames.

    python benchmarks/soak_plot.py before.csv:"0.2's soak" after.csv:"fixed" --out benchmarks/soak_rss.png

Each trace is drawn as RSS (solid) and glibc malloc's bytes in use (dotted) against minutes, and RSS
against frames classified. A leak per frame is a straight line against frames whatever the machine's
load (on a shared machine the frame rate varies); memory that settles levels off.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_trace(path: Path) -> dict[str, list[float]]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(row[key]) for row in rows] for key in rows[0]} if rows else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", help='CSV[:label], e.g. after.csv:"fixed"')
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_frames) = plt.subplots(1, 2, figsize=(12, 4.5))
    for spec in args.traces:
        path, _, label = spec.partition(":")
        trace = read_trace(Path(path))
        minutes = [s / 60 for s in trace["seconds"]]
        line = by_time.plot(minutes, trace["rss_mb"], label=f"{label or path}: RSS")[0]
        by_frames.plot([f / 1000 for f in trace["frames"]], trace["rss_mb"], color=line.get_color())
        by_time.plot(minutes, trace["malloc_in_use_mb"], ":", color=line.get_color(), label="  malloc in use")
    by_time.set(xlabel="minutes", ylabel="MB", title="resident memory against time")
    by_frames.set(xlabel="thousand frames classified", ylabel="RSS MB", title="... and against frames")
    for axes in (by_time, by_frames):
        axes.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
