"""dmf-run: enrol and recognise classes live, from a camera, a video, an image folder or a stream.

    dmf-run --camera 0                                   # window: n names a class, space adds shots
    dmf-run --source clip.mp4 --headless < commands.txt  # JSON lines on stdout

The loop is capture -> classify -> render, as in jetson-inference's camera tools. The window (OpenCV
highgui) and the headless mode share one Session (runtime/commands.py) that applies enrolments,
removals and saves to the Recognizer. The gallery is loaded at start and saved at exit.

Headless and deterministic: with a file or folder source and stdin that is not a terminal, all of
stdin is read (to EOF) before the first frame, and the commands then run in order, each before the
next frame: `enroll NAME K` takes the next K frames (they are enrolled, not predicted) and `wait N`
lets N frames be predicted before the next command. The same input therefore always gives the same
output. With a camera or stream (or a terminal on stdin), commands apply as they arrive.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import cv2
import numpy as np

from dmf_deploy.manifest import BundleError, read_manifest
from dmf_deploy.names import InvalidClassName, validate_class_name
from dmf_deploy.runtime.backends import BACKENDS
from dmf_deploy.runtime.commands import CommandFeed, Event, Session
from dmf_deploy.runtime.gallery import GalleryError
from dmf_deploy.runtime.overlay import TOP_K, View, Window, class_strip, render, top_scores
from dmf_deploy.runtime.recognizer import Prediction, Recognizer
from dmf_deploy.runtime.sources import FrameSource, SourceError, open_source

log = logging.getLogger("dmf_deploy.runtime")


def demo_bundle_path() -> Path:
    """The packaged demo bundle (dmf_deploy/assets/demo_bundle), wherever the package is installed."""
    import dmf_deploy

    return Path(dmf_deploy.__file__).resolve().parent / "assets" / "demo_bundle"


def default_gallery_path(fingerprint: str) -> Path:
    """One default gallery per model, so switching bundles never meets another model's gallery."""
    try:
        from platformdirs import user_data_dir
    except ImportError:  # installed without the runtime extra: the XDG default is a fine guess
        root = Path.home() / ".local" / "share" / "dmf-deploy"
    else:
        root = Path(user_data_dir("dmf-deploy"))
    return root / "galleries" / f"{fingerprint[:16]}.dmfg"


class AppError(click.ClickException):
    """A clear, expected failure (bad camera, missing file, unreadable gallery): message and exit 1."""

    exit_code = 1


@dataclass
class Stats:
    """End-to-end throughput: every frame read, from the first frame to the end of the loop."""

    frames: int = 0
    classified: int = 0
    classify_seconds: float = 0.0
    start: float | None = None
    end: float | None = None
    recent: float = 0.0  # smoothed fps for the window
    _last: float | None = field(default=None, repr=False)

    def tick(self) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        elif self._last is not None:
            instant = 1.0 / max(now - self._last, 1e-6)
            self.recent = instant if not self.recent else 0.9 * self.recent + 0.1 * instant
        self._last = self.end = now
        self.frames += 1

    @property
    def seconds(self) -> float:
        return (self.end - self.start) if self.start is not None and self.end is not None else 0.0

    @property
    def fps(self) -> float:
        # n frames span n - 1 intervals between their starts.
        return (self.frames - 1) / self.seconds if self.frames > 1 and self.seconds > 0 else 0.0

    def summary(self, backend: str) -> str:
        mean = 1000 * self.classify_seconds / self.classified if self.classified else float("nan")
        return (
            f"dmf-run: {self.frames} frames in {self.seconds:.2f} s: {self.fps:.1f} fps end to end "
            f"(classify {mean:.1f} ms mean over {self.classified} frames; backend {backend})"
        )


def timed_classify(rec: Recognizer, frame: np.ndarray, stats: Stats) -> tuple[Prediction, float]:
    start = time.perf_counter()
    pred = rec.classify(frame)
    seconds = time.perf_counter() - start
    stats.classified += 1
    stats.classify_seconds += seconds
    assert isinstance(pred, Prediction)
    return pred, seconds * 1000


def _number(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None  # JSON has no NaN


def prediction_record(index: int, pred: Prediction, latency_ms: float) -> dict[str, Any]:
    return {
        "frame": index,
        "label": pred.label,
        "score": _number(pred.score),
        "top": [[name, _number(score)] for name, score in top_scores(pred, TOP_K)],
        "latency_ms": round(latency_ms, 3),
    }


def print_json(record: dict[str, Any]) -> None:
    # ASCII-escaped so any stdout encoding can carry any class name; flushed so pipes see lines live.
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


# ----- headless ------------------------------------------------------------------------------------
def run_headless(
    rec: Recognizer,
    source: FrameSource,
    session: Session,
    feed: CommandFeed,
    stats: Stats,
    max_frames: int | None,
) -> tuple[np.ndarray | None, Prediction | None]:
    """Commands before each frame, then enrol or predict it. Returns the last frame and prediction."""
    index, last_frame, last_pred = 0, None, None
    while not session.stopped:
        while not session.busy and not session.stopped and (line := feed.poll()) is not None:
            session.run_line(line)
        if session.stopped or (max_frames is not None and index >= max_frames):
            break
        frame = source.read()
        if frame is None:
            break
        stats.tick()
        last_frame = frame
        if not session.take_frame(frame):
            last_pred, ms = timed_classify(rec, frame, stats)
            print_json(prediction_record(index, last_pred, ms))
        index += 1
    session.finish_enrollment()  # the source ended in the middle of an `enroll`
    # Commands left after the source ended still run if they need no frames (list, save, rename...).
    while not session.stopped and (line := feed.poll()) is not None:
        session.run_line(line)
        if session.busy:
            session.pending, session.waiting = None, 0
            print_json({"event": "error", "command": line.strip(), "message": "the source has ended"})
    return last_frame, last_pred


def run_window(
    rec: Recognizer,
    source: FrameSource,
    session: Session,
    window: Window,
    stats: Stats,
    max_frames: int | None,
) -> None:
    """capture -> classify -> render -> keys, until q/Esc, the window closes, or --max-frames."""
    frame: np.ndarray | None = None
    pred: Prediction | None = None
    ended = False
    version = session.version
    while not session.stopped and not (max_frames is not None and stats.frames >= max_frames):
        fresh = None if ended else source.read()
        if fresh is not None:
            stats.tick()
            frame = fresh
            pred, _ = timed_classify(rec, frame, stats)
        elif frame is None:
            break  # not a single frame: nothing to show
        elif not ended:
            ended = True  # hold the last frame so classes can still be managed; q quits
            window.say("end of the source - q quits")
        elif version != session.version:
            pred, _ = timed_classify(rec, frame, stats)  # the held frame, against the changed gallery
        version = session.version
        window.show(frame, pred, stats.recent)
        window.on_key(cv2.waitKeyEx(30 if ended else 1), frame)
        if window.closed():
            break
    cv2.destroyAllWindows()


# ----- command line --------------------------------------------------------------------------------
def parse_names(text: str | None) -> list[str]:
    if not text:
        return []
    names = []
    for part in text.split(","):
        try:
            names.append(validate_class_name(part))
        except InvalidClassName as exc:
            raise click.BadParameter(str(exc), param_hint="--names") from None
    return names


def resolve_bundle(bundle: Path | None) -> Path:
    if bundle is not None:
        return bundle
    bundle = demo_bundle_path()
    if not (bundle / "manifest.json").is_file():
        raise AppError(
            "no bundle given and the demo bundle is not installed; "
            "pass --bundle DIR (make one with dmf-export)"
        )
    return bundle


def open_recognizer(
    bundle: Path,
    backend: str,
    gallery: Path,
    shortlist: int | None,
    threshold: float | None,
    smoothing: float,
    gallery_is_default: bool,
) -> Recognizer:
    try:
        return Recognizer.open(
            bundle,
            backend=backend,
            gallery=gallery,
            shortlist=shortlist,
            threshold=threshold,
            smoothing=smoothing,
        )
    except GalleryError as exc:
        hint = (
            " Pass --gallery FILE to keep a separate gallery for this bundle." if gallery_is_default else ""
        )
        raise AppError(f"cannot use the gallery {gallery}: {str(exc).rstrip('.')}.{hint}") from None
    except (BundleError, RuntimeError) as exc:
        raise AppError(f"cannot open the bundle {bundle}: {exc}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--camera", type=click.IntRange(min=0), help="Camera index (0 = the first camera).")
@click.option("--source", help="A video file, an image, a folder of images, or an rtsp/http stream URI.")
@click.option("--input-width", type=click.IntRange(min=1), help="Capture width to ask a camera for.")
@click.option("--input-height", type=click.IntRange(min=1), help="Capture height to ask a camera for.")
@click.option("--loop", is_flag=True, help="Restart a video file or image folder when it ends.")
@click.option(
    "--bundle",
    type=click.Path(path_type=Path),
    help="Bundle folder from dmf-export (default: the packaged demo bundle).",
)
@click.option(
    "--gallery",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Gallery file, loaded at start and saved at exit (default: one per model in the user data folder).",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option(
    "--shots",
    type=click.IntRange(1, 1000),
    default=5,
    show_default=True,
    help="Shots per class: the default K of `enroll NAME [K]`, and the target shown in the window.",
)
@click.option(
    "--threshold",
    type=float,
    help="Absolute score below which a frame is 'unknown' (default: relative to each class).",
)
@click.option(
    "--smoothing",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
    show_default=True,
    help="Exponential smoothing of scores over frames (0 = none).",
)
@click.option(
    "--shortlist",
    type=click.IntRange(min=1),
    help="Run the full DMF head only on the K classes ranked best by a cheap score.",
)
@click.option("--names", "names_text", help="Comma-separated class names that `n` takes in turn.")
@click.option("--headless", is_flag=True, help="No window: commands on stdin, JSON lines on stdout.")
@click.option("--max-frames", type=click.IntRange(min=1), help="Stop after this many frames.")
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Reconnect attempts when a network stream ends or stalls.",
)
@click.option(
    "--screenshot",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the last window image (PNG/JPEG) at exit; works headless too.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log progress on stderr.")
def main(
    camera: int | None,
    source: str | None,
    input_width: int | None,
    input_height: int | None,
    loop: bool,
    bundle: Path | None,
    gallery: Path | None,
    backend: str,
    shots: int,
    threshold: float | None,
    smoothing: float,
    shortlist: int | None,
    names_text: str | None,
    headless: bool,
    max_frames: int | None,
    retries: int,
    screenshot: Path | None,
    verbose: bool,
) -> None:
    """Enrol and recognise classes live from a camera, a video, an image folder or a stream.

    \b
    Window keys: n new class (typed, Enter confirms; or the next of --names), space adds the current
    frame as a shot, tab selects the next class, d deletes it, s saves, q or Esc quits (and saves).
    \b
    Headless (--headless): one JSON line per frame on stdout (frame, label, score, top, latency_ms)
    and JSON events; commands on stdin: enroll NAME [K], remove NAME, rename OLD NEW, list, save,
    wait N, quit. With a file or folder source and piped stdin, all of stdin is read first and the
    commands run in order between frames, so runs are reproducible.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="dmf-run: %(message)s")
    if not verbose:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # our messages say it better
    if (camera is None) == (source is None):
        raise click.UsageError("give exactly one of --camera N or --source PATH|URI")
    names = parse_names(names_text)
    if (
        not headless
        and sys.platform.startswith("linux")
        and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    ):
        # Without this check Qt aborts the process (SIGABRT) when the window is created.
        raise AppError(
            "no display to open the window on (DISPLAY is not set): use --headless, "
            "or run from a desktop session (over ssh: ssh -X, or DISPLAY=:0)"
        )
    bundle = resolve_bundle(bundle)
    gallery_is_default = gallery is None
    if gallery is None:
        try:
            gallery = default_gallery_path(read_manifest(bundle).fingerprint)
        except BundleError as exc:
            raise AppError(str(exc)) from exc
    gallery_path = gallery
    rec = open_recognizer(bundle, backend, gallery_path, shortlist, threshold, smoothing, gallery_is_default)
    try:
        frames = open_source(
            camera, source, width=input_width, height=input_height, loop=loop, retries=retries
        )
    except SourceError as exc:
        raise AppError(str(exc)) from None

    stats = Stats()
    session = Session(rec, gallery_path, print_json, shots)
    window = None if headless else Window(session, names, shots, frames.description)
    if window is not None:
        session.emit = window.on_event  # in the window, outcomes go to the status line
    # SIGTERM (systemd, docker stop) ends the loop like `quit`, so the gallery is still saved.
    signal.signal(signal.SIGTERM, lambda *_: setattr(session, "stopped", True))
    last_frame, last_pred = None, None
    code = 0
    try:
        if window is None:
            deterministic = (
                frames.kind in ("file", "folder") and sys.stdin is not None and not sys.stdin.isatty()
            )
            feed = CommandFeed(sys.stdin, read_all=deterministic)
            print_json(
                {
                    "event": "started",
                    "source": frames.description,
                    "bundle": str(rec.bundle),
                    "backend": rec.backend.name,
                    "gallery": str(gallery_path),
                    "classes": rec.classes,
                }
            )
            last_frame, last_pred = run_headless(rec, frames, session, feed, stats, max_frames)
        else:
            run_window(rec, frames, session, window, stats, max_frames)
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`): stop quietly, still save the gallery.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        frames.close()
        saved_ok = finish(
            session, stats, rec, window, screenshot, last_frame, last_pred, headless, frames.description
        )
    if not saved_ok:
        sys.exit(1)
    if code:
        sys.exit(code)


def finish(
    session: Session,
    stats: Stats,
    rec: Recognizer,
    window: Window | None,
    screenshot: Path | None,
    last_frame: np.ndarray | None,
    last_pred: Prediction | None,
    headless: bool,
    source: str,
) -> bool:
    """Save the gallery if it changed, write the screenshot, report FPS. False if the save failed."""
    ok = True
    if session.dirty:
        session.emit = print_json if headless else _log_event
        ok = session.save()["event"] == "saved"
    if headless:
        print_json(
            {
                "event": "stopped",
                "frames": stats.frames,
                "seconds": round(stats.seconds, 3),
                "fps": round(stats.fps, 2),
            }
        )
    if screenshot is not None:
        canvas = window.last_canvas if window is not None else None
        if canvas is None and last_frame is not None:
            view = View(prediction=last_pred, fps=stats.fps, source=f"{source} (headless)")
            view.classes, view.thumbnails = class_strip(session)
            canvas = render(last_frame, view)
        if canvas is None or not _write_image(screenshot, canvas):
            log.warning("no screenshot written to %s", screenshot)
    click.echo(stats.summary(rec.backend.name), err=True)
    return ok


def _log_event(event: Event) -> None:
    if event["event"] == "error":
        click.echo(f"dmf-run: error: {event['message']}", err=True)
    else:
        click.echo(f"dmf-run: {json.dumps(event)}", err=True)


def _write_image(path: Path, image: np.ndarray) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    return bool(cv2.imwrite(str(path), image))


if __name__ == "__main__":
    main()
