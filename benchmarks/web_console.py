"""The web console's cost: what `--web` adds to the frame loop, and how late the live view's frames are.

On the demo bundle and a 640x480 video of dmf-demo's symbols (four classes enrolled), the real frame
loop (runtime/app/loop.py) runs with two outputs:

- **overlay**: the window's image drawn every frame (overlay.render, as the window draws it, without
  showing it: what the window costs besides highgui);
- **overlay + web**: the same, plus the web console (a real uvicorn server in a thread, as in dmf-run)
  with two viewers reading /stream.mjpg from two other processes.

The target: the web adds at most 10% to the time per frame. It is measured two ways, the runs
alternating, `--repeats` times each, medians compared:

- **at the camera's rate**: the video played at its own rate (`--fps`), as a camera delivers frames;
  the time per frame is the loop's busy time (the wait for the next frame's time left out). Every frame
  is shown and encoded. This is how the console runs.
- **as fast as frames come**: the video read as fast as the loop goes. The live view still shows at most
  MAX_VIEW_FPS frames a second, so most frames are not encoded.

The paced runs with the web also give the time from a frame's capture to its JPEG being handed to each
viewer's connection: the target is at most two frame intervals at the 90th percentile. And JPEG
encodes are counted against frames: at most one per frame, whatever the number of viewers.

This machine is shared: run it when it is quiet, and read the spread of the runs it prints.

    python benchmarks/web_console.py [--frames 300] [--fps 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np

from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.app.commands import Session
from dmf_deploy.runtime.app.loop import RunResult, Stats, run_loop
from dmf_deploy.runtime.app.overlay import View, class_strip, render
from dmf_deploy.runtime.app.sources import open_source
from dmf_deploy.runtime.app.web.console import WebConsole
from dmf_deploy.runtime.app.web.output import Tee
from dmf_deploy.runtime.app.web.settings import resolve_settings
from dmf_deploy.symbols import STROKE_FONT, render_symbol

SYMBOLS = ("R", "7", "4", "9")
WIDTH, HEIGHT = 640, 480
VIEWERS = 2
# A viewer: read /stream.mjpg part by part until killed (a browser's <img> does the same).
VIEWER = textwrap.dedent(
    """
    import http.client, sys
    conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
    conn.request("GET", "/stream.mjpg")
    response = conn.getresponse()
    while True:
        line = response.readline()
        if not line:
            break
        if line.lower().startswith(b"content-length:"):
            response.readline()
            response.read(int(line.split(b":")[1]))
    """
)


def camera_frame(symbol: str, seed: int) -> np.ndarray:
    """A symbol card (480 px) in the middle of a 640x480 grey-white frame."""
    frame = np.full((HEIGHT, WIDTH, 3), 200, np.uint8)
    card = render_symbol(STROKE_FONT[symbol], np.random.default_rng([seed, ord(symbol)]), HEIGHT)
    left = (WIDTH - HEIGHT) // 2
    frame[:, left : left + HEIGHT] = card
    return frame


def write_clip(path: Path, frames: int, fps: float) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise SystemExit("OpenCV cannot write mp4v video here")
    for i in range(frames):
        writer.write(camera_frame(SYMBOLS[(i // 30) % len(SYMBOLS)], i))
    writer.release()
    return path


class OverlayOutput:
    """The window's drawing without the window: render() every frame; at `frame_rate`, paced like the
    window plays a file (waits until the next frame is due; the wait is counted in `idle_seconds`)."""

    holds_last_frame = False
    paused = False

    def __init__(self, session: Session, source: str, frame_rate: float | None = None) -> None:
        self.view = View(source=source)
        self.view.classes, self.view.thumbnails = class_strip(session)
        self.frame_rate = frame_rate
        self.idle_seconds = 0.0
        self._next = time.perf_counter()

    def emit(self, event) -> None:
        pass

    def show(self, frame, prediction, session, stats) -> bool:
        if prediction is not None:
            self.view.prediction = prediction
        self.view.fps = stats.recent
        render(frame, self.view)
        if self.frame_rate:
            now = time.perf_counter()
            self._next = max(self._next + 1.0 / self.frame_rate, now)
            time.sleep(self._next - now)
            self.idle_seconds += time.perf_counter() - now
        return True

    def close(self) -> None:
        pass

    def report(self, result: RunResult) -> None:
        pass


def run(rec: Recognizer, clip: Path, frames: int, web: bool, fps: float | None = None) -> dict:
    source = open_source(source=str(clip))
    session = Session(rec, Path(tempfile.mkdtemp()) / "g.dmfg", lambda event: None)
    overlay = OverlayOutput(session, source.description, None if web else fps)
    output = overlay
    console = viewers = None
    if web:
        console = WebConsole(resolve_settings("127.0.0.1:0"), rec, None, source.description)
        port = console.start()
        console.output.frame_rate = fps
        viewers = [subprocess.Popen([sys.executable, "-c", VIEWER, str(port)]) for _ in range(VIEWERS)]
        deadline = time.monotonic() + 10
        while console.frames.viewers < VIEWERS and time.monotonic() < deadline:
            time.sleep(0.01)
        output = Tee(output, console.output)
    try:
        result = run_loop(rec, source, session, output, max_frames=frames)
    finally:
        source.close()
        if console is not None:
            console.stop()
        for viewer in viewers or []:
            viewer.kill()
            viewer.wait()
    stats: Stats = result.stats
    idle = console.output.idle_seconds if console is not None else overlay.idle_seconds
    busy = stats.seconds - idle
    report = {"ms_per_frame": 1000 * busy / max(1, stats.frames - 1), "frames": stats.frames}
    if console is not None:
        report.update(
            encoded=console.encoder.encoded,
            sent=console.frames.sent,
            latency_ms=[1000 * s for s in console.frames.sent_latency],
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument(
        "--fps", type=float, default=30.0, help="the video's rate (the latency run plays at it)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="dmf-web-bench-"))
    clip = write_clip(folder / "camera.mp4", args.frames, args.fps)
    rec = Recognizer.open("demo")
    for symbol in SYMBOLS:
        rec.enroll(symbol, [camera_frame(symbol, 10_000 + k) for k in range(3)])
    run(rec, clip, min(args.frames, 30), web=False)  # warm-up: sessions, caches, the page cache

    classes = len(SYMBOLS)
    print(
        f"demo bundle, {WIDTH}x{HEIGHT} video of {args.frames} frames, {classes} classes, {VIEWERS} viewers"
    )
    for fps in (args.fps, None):
        plain, with_web = [], []
        for _ in range(args.repeats):
            plain.append(run(rec, clip, args.frames, web=False, fps=fps))
            with_web.append(run(rec, clip, args.frames, web=True, fps=fps))
        base = statistics.median(r["ms_per_frame"] for r in plain)
        web = statistics.median(r["ms_per_frame"] for r in with_web)
        encoded = statistics.median(r["encoded"] for r in with_web)
        how = f"played at {fps:g} fps (busy time per frame)" if fps else "as fast as frames come"
        print(f"{how}:")
        print(f"  overlay drawn (the window's image):  {base:6.2f} ms/frame  (runs: {_list(plain)})")
        print(f"  overlay + web console:               {web:6.2f} ms/frame  (runs: {_list(with_web)})")
        print(f"  added by the web console: {100 * (web / base - 1):+.1f}%  (target <= 10%)")
        print(f"  JPEG encodes: {encoded:g} for {args.frames} frames (median run; at most one per frame)")
        if fps:
            latency = np.concatenate([r["latency_ms"] for r in with_web])
            interval = 1000 / fps
            p50, p90, p99 = np.percentile(latency, [50, 90, 99])
            sent = statistics.median(r["sent"] for r in with_web)
            print(
                f"  capture to sent: p50 {p50:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms over "
                f"{latency.size} sends (target p90 <= {2 * interval:.1f} ms, two frame intervals); "
                f"{sent:g} frames sent to {VIEWERS} viewers (median run)"
            )


def _list(runs: list[dict]) -> str:
    return ", ".join(f"{r['ms_per_frame']:.2f}" for r in runs)


if __name__ == "__main__":
    main()
