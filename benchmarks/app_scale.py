"""`dmf-run --headless` against `Recognizer.classify` at many classes: the app's time per frame.

The issue ([S], item 6): with the packaged demo model and 10,000 classes, the app's time per frame
should be within 1.5x of `Recognizer.classify` at the same N, and the app's own per-frame work flat in
N. For each class count N (--classes, default 100 10000):

1. a gallery of N classes of the demo bundle, enrolled through the library (pen_gallery.py:
   `Recognizer.enroll` of a pen drawing per class, saved every 500 classes);
2. one video for every N, written with cv2.VideoWriter (MJPG .avi): --frames frames, each a
   re-drawn (jittered) drawing of one of the first 100 classes; it is read back with cv2.VideoCapture,
   so that the library classifies exactly the frames the app decodes;
3. library: `Recognizer.open(demo, gallery=...)` with its defaults (shortlist "auto"), one
   `classify` per frame after 5 warm-up frames, timed per call; closed after (the bank cache is one
   process's at a time);
4. app: `dmf-run --source VIDEO --headless --gallery ...` with its defaults and nothing on stdin, in a
   subprocess; its time per frame from its own output: the `stopped` event's fps (frames over
   seconds from the first frame to the last: decode, classify, JSON line, all of the loop), and the
   mean `latency_ms` of its prediction lines (its classify call alone). Their difference is the app's
   own per-frame work. Then once more with --smoothing 0.5 (scores smoothed over frames);
5. the library again, so that a change in this shared machine's load between them shows;
6. the window's own work, in process: `render` (the window image) per frame, the JSON line
   (`prediction_record` + json.dumps) per frame, and `class_strip` (the class strip's list and
   thumbnails) per gallery change.

    nice -n 10 python benchmarks/app_scale.py [--classes 100 10000] [--frames 300] [--workdir DIR]

About 2 minutes on 2 cores (the 10,000-class gallery takes ~30 s to enrol; --workdir keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from pen_gallery import build_gallery, pen_frame  # benchmarks/, this script's folder

from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.app.commands import Session
from dmf_deploy.runtime.app.loop import prediction_record
from dmf_deploy.runtime.app.overlay import View, class_strip, render

WARM_UP = 5
QUERY_CLASSES = 100  # the video shows drawings of these classes, enrolled in every gallery


def write_video(path: Path, count: int) -> list[np.ndarray]:
    """An MJPG video of `count` jittered drawings; returns the frames as VideoCapture decodes them."""
    frames = [pen_frame(i % QUERY_CLASSES, shot=1 + i // QUERY_CLASSES) for i in range(count)]
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 15.0, (w, h))
    assert writer.isOpened(), "this OpenCV build cannot write MJPG"
    for frame in frames:
        writer.write(frame)
    writer.release()
    capture = cv2.VideoCapture(str(path))
    decoded = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        decoded.append(frame)
    capture.release()
    assert len(decoded) == count, f"{path}: {len(decoded)} frames decoded, {count} written"
    return decoded


def library(gallery: Path, frames: list[np.ndarray]) -> dict[str, float]:
    """ms per `Recognizer.classify` call, one frame at a time."""
    with Recognizer.open(DEMO_BUNDLE, gallery=gallery) as rec:
        for frame in frames[:WARM_UP]:
            rec.classify(frame)
        ms = []
        for frame in frames:
            start = time.perf_counter()
            rec.classify(frame)
            ms.append(1000 * (time.perf_counter() - start))
    return {"mean": statistics.fmean(ms), "median": statistics.median(ms)}


def app(gallery: Path, video: Path, frames: int, *options: str) -> dict[str, float]:
    """dmf-run --headless on the video: its end-to-end and classify ms per frame, from its output."""
    command = [sys.executable, "-m", "dmf_deploy.runtime.app", "--source", str(video), "--headless"]
    command += ["--gallery", str(gallery), *options]
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    latency = [line["latency_ms"] for line in lines if "latency_ms" in line]
    stopped = next(line for line in lines if line.get("event") == "stopped")
    assert stopped["frames"] == frames == len(latency), (stopped, len(latency))
    return {"end_to_end": 1000 / stopped["fps"], "classify": statistics.fmean(latency)}


def window_work(gallery: Path, frames: list[np.ndarray]) -> dict[str, float]:
    """The app's own work around classify, in process: window image and JSON line per frame (median
    ms), class strip per gallery change (ms)."""
    with Recognizer.open(DEMO_BUNDLE, gallery=gallery) as rec:
        session = Session(rec, gallery, lambda _event: None)
        start = time.perf_counter()
        classes, thumbnails = class_strip(session)
        strip_ms = 1000 * (time.perf_counter() - start)
        render_ms, json_ms = [], []
        for i, frame in enumerate(frames):
            prediction = rec.classify(frame)
            view = View(prediction=prediction, classes=classes, thumbnails=thumbnails, current=classes[-1][0])
            start = time.perf_counter()
            render(frame, view)
            middle = time.perf_counter()
            json.dumps(prediction_record(i, prediction, 1.0))
            render_ms.append(1000 * (middle - start))
            json_ms.append(1000 * (time.perf_counter() - middle))
    return {"render": statistics.median(render_ms), "json": statistics.median(json_ms), "strip": strip_ms}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 10000])
    parser.add_argument("--frames", type=int, default=300, help="frames in the video")
    parser.add_argument("--workdir", type=Path, help="where galleries and video go (default: a temp folder)")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dmf-app-scale-") as temp:
        work = args.workdir or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        frames = write_video(work / "drawings.avi", args.frames)
        rows = []
        for n in args.classes:
            gallery = work / f"demo-{n}.dmfg"
            seconds = build_gallery(DEMO_BUNDLE, gallery, n)
            print(f"gallery of {n} classes ready in {seconds:.1f} s", flush=True)
            before = library(gallery, frames)
            served = app(gallery, work / "drawings.avi", args.frames)
            smoothed = app(gallery, work / "drawings.avi", args.frames, "--smoothing", "0.5")
            after = library(gallery, frames)
            rows.append((n, before, served, after, smoothed, window_work(gallery, frames)))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        "ms per frame; library = Recognizer.classify (mean, before / after the app); app = dmf-run --headless"
    )
    print(
        f"{'classes':>8} {'library':>15} {'app e2e':>8} {'app classify':>12} {'app own':>8} {'app/lib':>8} "
        f"{'smoothed':>8} {'render':>7} {'JSON':>6} {'strip/change':>12}"
    )
    for n, before, served, after, smoothed, own in rows:
        lib = (before["mean"] + after["mean"]) / 2
        print(
            f"{n:>8} {before['mean']:>7.2f} /{after['mean']:>6.2f} {served['end_to_end']:>8.2f} "
            f"{served['classify']:>12.2f} {served['end_to_end'] - served['classify']:>8.2f} "
            f"{served['end_to_end'] / lib:>7.2f}x {smoothed['end_to_end']:>8.2f} {own['render']:>7.2f} "
            f"{own['json']:>6.3f} "
            f"{own['strip']:>12.1f}"
        )


if __name__ == "__main__":
    main()
