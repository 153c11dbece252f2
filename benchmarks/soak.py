"""Soak: a long classify loop with the gallery churning under it; reports RSS growth and latency drift.

Not a CI test: it runs for minutes. The loop classifies one frame at a time with the demo bundle
(ONNX Runtime); every `--churn-every` frames it does the next gallery operation of a fixed cycle:
enrol a new class (alternately with `rec.enroll` and frame by frame through `rec.enrollment`), add shots
to an existing class, rename one, remove the oldest once more than `--classes` are enrolled, and save
the gallery atomically to a temporary file. The frames are drawn with OpenCV (random strokes on white
paper, a fixed seed), so no data set is needed.

Reported: resident memory (VmRSS) after the warm-up and at the end, and its largest value; classify
latency p50/p99 in the first and the last window of `--window` seconds; how many of each operation ran;
and that the saved gallery reopens with the classes the loop holds. A leak shows as RSS growing with
time; a slowdown (a gallery that fragments, caches that grow) as p99 drifting between the windows.

With `--trace FILE` it also writes one CSV row every `--trace-every` seconds: time, frames, RSS, the
bytes glibc's malloc holds in use and in its main arena (mallinfo2), how many objects Python's garbage
collector tracks, and how many blocks Python's own small-object allocator (pymalloc, outside malloc's
figures) has handed out. A leak grows one of these with the frames; an allocator that settles grows
only RSS or the held bytes, and levels off. `benchmarks/soak_plot.py` draws the curve from that file.

    python benchmarks/soak.py [--minutes 10] [--threads 1] [--classes 40] [--churn-every 10] [--trace FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import cv2
import numpy as np

from dmf_deploy.runtime import Recognizer

WARMUP_S = 10.0  # allocator and ONNX Runtime arenas settle first; RSS growth is counted after this


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks")
        + ("fordblks", "keepcost")
    ]


def malloc_mb() -> tuple[float, float]:
    """(bytes in use, bytes held by malloc's arenas and mmaps) in MB; NaN where glibc lacks mallinfo2."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return float("nan"), float("nan")
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20, (info.arena + info.hblkhd) / 2**20


def strokes(rng: np.random.Generator, seed: int, size: int = 160) -> np.ndarray:
    """A 'symbol' of a few strokes (fixed per seed) drawn with jitter from `rng`: one class per seed."""
    shape = np.random.default_rng(seed)
    paper = np.full((size, size, 3), 255, np.uint8)
    points = shape.integers(20, size - 20, (5, 2))
    jitter = rng.integers(-4, 5, points.shape)
    pts = (points + jitter).astype(np.int32)
    # Pen-width strokes (3-5 px in 160): much bolder ones are redrawn hollow by the demo frame rule.
    cv2.polylines(paper, [pts], False, (30, 30, 30), int(shape.integers(3, 6)))
    return paper


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--classes", type=int, default=40, help="classes kept enrolled (older ones removed)")
    parser.add_argument("--churn-every", type=int, default=10, help="frames between gallery operations")
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of the first and last window")
    parser.add_argument("--trace", type=Path, help="CSV of RSS, malloc and Python objects against time")
    parser.add_argument("--trace-every", type=float, default=10.0, help="seconds between trace rows")
    args = parser.parse_args()
    trace = args.trace.open("w", buffering=1) if args.trace else None
    if trace:
        trace.write(
            "seconds,frames,classes,rss_mb,malloc_in_use_mb,malloc_held_mb,python_objects,python_blocks\n"
        )
    next_trace = 0.0

    rng = np.random.default_rng(0)
    rec = Recognizer.open("demo", backend="onnxruntime", threads=args.threads)
    ops = {"enroll": 0, "enrollment": 0, "more shots": 0, "rename": 0, "remove": 0, "save": 0}
    # Classify latencies of the first and the last --window seconds only: a record of every frame grew
    # by ~136 bytes a frame (a tuple of two floats), which was the +21 MB in 10 minutes (issue 33).
    first: list[float] = []  # classify ms
    last: deque[tuple[float, float]] = deque()  # (seconds since start, classify ms)
    classified = 0
    live: list[str] = []  # enrolled classes, oldest first
    next_seed = 0
    with tempfile.TemporaryDirectory(prefix="dmf-soak-") as tmp:
        gallery = Path(tmp) / "soak.dmfg"
        start = time.perf_counter()
        end = start + 60 * args.minutes
        base_rss = peak_rss = None
        frame_index = 0
        cycle = ["enroll", "more shots", "enrollment", "rename", "save"]
        while (now := time.perf_counter()) < end:
            if trace and now - start >= next_trace:
                in_use, held = malloc_mb()
                trace.write(
                    f"{now - start:.1f},{frame_index},{len(live)},{rss_mb():.2f},{in_use:.2f},{held:.2f},"
                    f"{len(gc.get_objects())},{sys.getallocatedblocks()}\n"
                )
                next_trace += args.trace_every
            if base_rss is None and now - start >= WARMUP_S:
                base_rss = peak_rss = rss_mb()
            elif base_rss is not None and frame_index % 50 == 0:
                peak_rss = max(peak_rss, rss_mb())
            seed = live[int(rng.integers(len(live)))] if live else "0"
            frame = strokes(rng, int(seed.split("-")[0]))
            t0 = time.perf_counter()
            rec.classify(frame)
            ms, seconds_in = 1000 * (time.perf_counter() - t0), t0 - start
            classified += 1
            if seconds_in < args.window:
                first.append(ms)
            last.append((seconds_in, ms))
            while last[0][0] < seconds_in - args.window:
                last.popleft()
            frame_index += 1
            if frame_index % args.churn_every:
                continue
            op = cycle[(frame_index // args.churn_every) % len(cycle)]
            if op in ("enroll", "enrollment") or not live:
                name = f"{next_seed}-s"
                frames = [strokes(rng, next_seed) for _ in range(args.shots)]
                if op == "enrollment":
                    enrollment = rec.enrollment(name)
                    for f in frames:
                        enrollment.add(f)
                    enrollment.commit()
                else:
                    rec.enroll(name, frames)
                    op = "enroll"
                live.append(name)
                next_seed += 1
            elif op == "more shots":
                rec.enroll(live[-1], [strokes(rng, int(live[-1].split("-")[0]))])
            elif op == "rename":
                old = live[int(rng.integers(len(live)))]
                new = old.split("-")[0] + ("-r" if old.endswith("-s") else "-s")
                rec.rename(old, new)
                live[live.index(old)] = new
            elif op == "save":
                rec.save(gallery)
            ops[op] += 1
            while len(live) > args.classes:
                rec.remove(live.pop(0))
                ops["remove"] += 1
        final_rss = rss_mb()
        seconds = time.perf_counter() - start
        rec.save(gallery)
        reopened = Recognizer.open("demo", backend="onnxruntime", gallery=gallery, threads=args.threads)
        assert reopened.classes == rec.classes == live, "the saved gallery is not what the loop holds"

    last_ms = [ms for _, ms in last]
    base_rss = final_rss if base_rss is None else base_rss
    peak_rss = final_rss if peak_rss is None else max(peak_rss, final_rss)
    print(f"soak: {seconds / 60:.1f} min, {classified} frames classified, {args.threads} thread(s)")
    counts = ", ".join(f"{k} {v}" for k, v in ops.items())
    print(f"operations: {counts}; {len(live)} classes at the end")
    print(
        f"RSS: {base_rss:.1f} MB after {WARMUP_S:.0f} s warm-up, {final_rss:.1f} MB at the end "
        f"(growth {final_rss - base_rss:+.1f} MB), peak {peak_rss:.1f} MB"
    )
    p50 = (percentile(first, 50), percentile(last_ms, 50))
    p99 = (percentile(first, 99), percentile(last_ms, 99))
    print(
        f"classify ms, first {args.window:.0f} s: p50 {p50[0]:.2f}, p99 {p99[0]:.2f}; "
        f"last {args.window:.0f} s: p50 {p50[1]:.2f}, p99 {p99[1]:.2f} (p99 drift {p99[1] - p99[0]:+.2f} ms)"
    )
    print("the saved gallery reopens with the classes the loop holds")


if __name__ == "__main__":
    main()
