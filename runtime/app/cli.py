"""dmf-run: enrol and recognise classes live, from a camera, a video, an image folder or a stream.

    dmf-run --camera 0                                   # window: n names a class, space adds shots
    dmf-run --source clip.mp4 --headless < commands.txt  # JSON lines on stdout

The loop (runtime/app/loop.py) is capture -> classify -> output, as in jetson-inference's camera tools;
the output is the window (OpenCV highgui, runtime/app/overlay.py) or JSON lines, and with --web also the
browser console (runtime/app/web/, docs/web.md). A Session
(runtime/app/commands.py) applies enrolments, removals and saves to the Recognizer. The gallery is loaded
at start and saved at exit.

Headless and deterministic: with a file or folder source and stdin that is not a terminal, the
commands run in order, each before the next frame, and the next line of stdin is read only when it is
due: the loop waits for it (or the end of stdin) before reading another frame. `enroll NAME K` takes
the next K frames (they are enrolled, not predicted) and `wait N` lets N frames be predicted before the
next command. The same input therefore always gives the same output. With a camera or stream (or a
terminal on stdin), commands apply as they arrive (a reader holds at most 1,000 waiting lines, then
stops reading stdin). Lines over 4 KB are refused with an error event. When the source ends, an
`end_of_source` event says so; the commands still waiting run (`enroll` and `wait` answer with an
error), then the run stops. The window instead holds the last frame until q. SIGTERM, SIGINT, SIGHUP
and SIGQUIT stop the run within a second; the gallery is saved. A gallery path that cannot be written
is refused at start. A network stream that is lost (more than --retries
reconnects within a minute) ends the run with exit status 1.

`--check-gallery` checks the gallery in full and exits, with no source (runtime/app/gallery_check.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click
import cv2
import numpy as np

from dmf_deploy.atomic import check_writable
from dmf_deploy.cli_support import DmfCommand, version_option
from dmf_deploy.manifest import BundleError, Manifest, read_manifest
from dmf_deploy.names import InvalidClassName, validate_class_name
from dmf_deploy.packaged import DEMO_BUNDLE, demo_bundle_installed, is_demo_name
from dmf_deploy.preprocess import Roi
from dmf_deploy.runtime.app.commands import CommandFeed, Session
from dmf_deploy.runtime.app.gallery_check import full_check
from dmf_deploy.runtime.app.loop import JsonLinesOutput, Output, RunResult, Stats, run_loop
from dmf_deploy.runtime.app.overlay import View, Window, class_strip, render
from dmf_deploy.runtime.app.sources import SourceError, open_source
from dmf_deploy.runtime.app.web.options import start_web, web_options, web_settings
from dmf_deploy.runtime.backends import BACKENDS
from dmf_deploy.runtime.gallery import Gallery, GalleryError
from dmf_deploy.runtime.recognizer import Recognizer

log = logging.getLogger("dmf_deploy.runtime")


def default_gallery_path(fingerprint: str) -> Path:
    """One default gallery per model, so switching bundles never meets another model's gallery."""
    try:
        from platformdirs import user_data_dir
    except ImportError:  # installed without the runtime extra: the XDG default is a fine guess
        root = Path.home() / ".local" / "share" / "dmf-deploy"
    else:
        root = Path(user_data_dir("dmf-deploy"))
    return root / "galleries" / f"{fingerprint[:16]}.dmfg"


def other_model_galleries(gallery: Path, fingerprint: str) -> list[str]:
    """What to tell a user whose default gallery is new while galleries of other models sit beside it
    (the demo model changed, or another bundle was used): they are kept, and how to use them."""
    lines = []
    for other in sorted(gallery.parent.glob("*.dmfg")):
        if other == gallery:
            continue
        try:
            Gallery.load(other, fingerprint)  # reads the header; another model's is refused right there
        except GalleryError as exc:
            if "another model" in str(exc):
                lines.append(
                    f"this model starts with an empty gallery ({gallery}); the one beside it is kept: "
                    f"{str(exc).split('. Enrol')[0]}. To use it, enrol its classes again here, or run "
                    f"the bundle it was made with: dmf-run --bundle DIR --gallery {other}"
                )
        except OSError:
            continue
    return lines


def no_display() -> bool:
    """True where a window cannot open: Linux without X11 or Wayland (Qt would abort the process)."""
    display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    return sys.platform.startswith("linux") and not display


class AppError(click.ClickException):
    """A clear, expected failure (bad camera, missing file, unreadable gallery): message and exit 1."""

    exit_code = 1


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


def parse_shortlist(text: str) -> int | str | None:
    """--shortlist: a class count, 'auto' or 'exact' (None)."""
    if text in ("auto", "exact"):
        return None if text == "exact" else text
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise click.BadParameter(f"{text!r} is not a class count (1 or more), 'auto' or 'exact'")
    return size


def resolve_bundle(bundle: str | None) -> Path:
    if bundle is not None and not is_demo_name(bundle):
        return Path(bundle)
    if not demo_bundle_installed():
        raise AppError(
            "no bundle given and the demo bundle is not installed; "
            "pass --bundle DIR (make one with dmf-export)"
        )
    return DEMO_BUNDLE


def open_recognizer(
    bundle: Path,
    backend: str,
    gallery: Path,
    shortlist: int | str | None,
    threshold: float | None,
    smoothing: float,
    gallery_is_default: bool,
    sensitivity: float | None = None,
    roi: Roi | None = None,
) -> Recognizer:
    try:
        return Recognizer.open(
            bundle,
            backend=backend,
            gallery=gallery,
            shortlist=shortlist,
            threshold=threshold,
            smoothing=smoothing,
            sensitivity=sensitivity,
            roi=roi,
        )
    except GalleryError as exc:
        hint = (
            " Pass --gallery FILE to keep a separate gallery for this bundle." if gallery_is_default else ""
        )
        raise AppError(f"cannot use the gallery {gallery}: {str(exc).rstrip('.')}.{hint}") from None
    except (BundleError, RuntimeError) as exc:
        raise AppError(f"cannot open the bundle {bundle}: {exc}") from None


@click.command("dmf-run", cls=DmfCommand, context_settings={"help_option_names": ["-h", "--help"]})
@version_option("dmf-run")
@click.option("--camera", type=click.IntRange(min=0), help="Camera index (0 = the first camera).")
@click.option("--source", help="A video file, an image, a folder of images, or an rtsp/http stream URI.")
@click.option("--input-width", type=click.IntRange(min=1), help="Capture width to ask a camera for.")
@click.option("--input-height", type=click.IntRange(min=1), help="Capture height to ask a camera for.")
@click.option("--loop", is_flag=True, help="Restart a video file or image folder when it ends.")
@click.option(
    "--bundle",
    help='Bundle folder from dmf-export, or "demo" (the default): the packaged demo bundle.',
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
    "--sensitivity",
    type=click.FloatRange(0.0, 0.5),
    help="Fraction of known frames the open-set rule may call 'unknown' (default: the bundle's, "
    "0.05); higher also refuses more unknown frames.",
)
@click.option(
    "--threshold",
    type=float,
    help="Absolute score below which a frame is 'unknown', instead of --sensitivity's relative rule.",
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
    default="auto",
    show_default=True,
    callback=lambda _ctx, _param, value: parse_shortlist(value),
    help="K: run the full DMF head only on the K classes ranked best by a cheap score; 'auto' (the "
    "library's default): exact up to 128 classes, a shortlist of 32 beyond; 'exact': every class.",
)
@click.option(
    "--roi",
    "roi_text",
    metavar="X,Y,W,H",
    help="Guide box, fractions of the frame (e.g. 0.25,0.1,0.5,0.8): drawn in the window, and the only "
    "region the model sees. Default: the whole frame, through the bundle's own rule.",
)
@click.option("--names", "names_text", help="Comma-separated class names that `n` takes in turn.")
@click.option("--headless", is_flag=True, help="No window: commands on stdin, JSON lines on stdout.")
@click.option("--max-frames", type=click.IntRange(min=1), help="Stop after this many frames.")
@click.option(
    "--max-speed", is_flag=True, help="Window: play a video file as fast as possible, not at its frame rate."
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Reconnects allowed within a minute when a network stream ends or stalls; beyond, the "
    "stream is lost and dmf-run exits with status 1.",
)
@click.option(
    "--screenshot",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the last window image (PNG/JPEG) at exit; works headless too.",
)
@click.option(
    "--check-gallery",
    is_flag=True,
    help="Check the gallery (--gallery, or this bundle's default) in full: SQLite's quick_check and "
    "every feature sum and thumbnail read; print each problem, exit 1 if there is any. Needs no "
    "--camera or --source.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log progress on stderr.")
@web_options  # --web, --web-token, --web-cert, --web-key, --webhook (runtime/app/web/)
def main(
    camera: int | None,
    source: str | None,
    input_width: int | None,
    input_height: int | None,
    loop: bool,
    bundle: str | None,
    gallery: Path | None,
    backend: str,
    shots: int,
    sensitivity: float | None,
    threshold: float | None,
    smoothing: float,
    shortlist: int | str | None,
    roi_text: str | None,
    names_text: str | None,
    headless: bool,
    max_frames: int | None,
    max_speed: bool,
    retries: int,
    screenshot: Path | None,
    check_gallery: bool,
    verbose: bool,
    web: str | None,
    web_token: str | None,
    web_cert: Path | None,
    web_key: Path | None,
    webhook: str | None,
) -> None:
    """Enrol and recognise classes live from a camera, a video, an image folder or a stream.

    \b
    Window keys: n new class (typed, Enter confirms; or the next of --names), space adds the current
    frame as a shot, p pauses and resumes, tab selects the next class, d deletes it (d again
    confirms), u undoes the last deletion until saved, s saves, e toggles the explanation of the
    predicted class (heat map; the mouse picks a position), q or Esc quits (and saves).
    \b
    Headless (--headless): one JSON line per frame on stdout (frame, label, score, top, latency_ms)
    and JSON events; commands on stdin: enroll NAME [K], remove NAME, rename OLD NEW, list, save,
    wait N, quit. With a file or folder source and piped stdin, the commands run in order between
    frames, each line read when it is due (the loop waits for it), so runs are reproducible. Lines over
    4 KB are refused. A frame that enroll takes and the model sees as blank is skipped (the event
    skipped). The end of the source is the event end_of_source. SIGTERM, SIGINT, SIGHUP or
    SIGQUIT: stop, save the gallery, exit.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="dmf-run: %(message)s")
    if not verbose:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # our messages say it better
    if check_gallery:
        if camera is not None or source is not None:
            raise click.UsageError("--check-gallery checks a gallery and exits: give no --camera or --source")
        sys.exit(run_gallery_check(resolve_bundle(bundle), gallery))
    if (camera is None) == (source is None):
        raise click.UsageError("give exactly one of --camera N or --source PATH|URI")
    names = parse_names(names_text)
    try:
        roi = Roi.of(roi_text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--roi") from None
    console_settings, webhook_url = web_settings(web, web_token, web_cert, web_key, webhook)
    window = not headless and not (console_settings is not None and no_display())  # --web: no screen needed
    if window and no_display():
        raise AppError(
            "no display to open the window on (DISPLAY is not set): use --headless, "
            "or run from a desktop session (over ssh: ssh -X, or DISPLAY=:0)"
        )
    bundle_path = resolve_bundle(bundle)
    gallery_is_default = gallery is None
    gallery_path = (
        gallery if gallery is not None else default_gallery_path(bundle_manifest(bundle_path).fingerprint)
    )
    gallery_existed = gallery_path.is_file()
    try:  # found now, not at the end of the session whose enrolments it should hold
        check_writable(gallery_path)
    except OSError as exc:
        raise AppError(f"the gallery {exc}; pass a --gallery that can be written") from None
    rec = open_recognizer(
        bundle_path,
        backend,
        gallery_path,
        shortlist,
        threshold,
        smoothing,
        gallery_is_default,
        sensitivity,
        roi,
    )
    click.echo(f"dmf-run: {describe_gallery(gallery_path, rec.classes, gallery_existed)}", err=True)
    if gallery_is_default and not rec.classes:
        for line in other_model_galleries(gallery_path, rec.manifest.fingerprint):
            click.echo(f"dmf-run: {line}", err=True)
    stopping = threading.Event()  # set by a signal: a stream's reconnect wait ends at once
    try:
        frames = open_source(
            camera,
            source,
            width=input_width,
            height=input_height,
            loop=loop,
            retries=retries,
            sleep=stopping.wait,
        )
    except SourceError as exc:
        raise AppError(str(exc)) from None

    # In the window a video file plays at its own frame rate (a person presses keys on its frames).
    rate = None if max_speed or headless else getattr(frames, "frame_rate", None)
    output: Output | None = JsonLinesOutput() if headless else None
    if window:
        output = Window(names, shots, frames.description, rate, roi)

    # ----- the web console and the webhook (issue [W], runtime/app/web/): started here, stopped at exit -
    web_parts = start_web(console_settings, webhook_url, rec, gallery_path, frames.description, shots)
    output = web_parts.wrap(output, frame_rate=None if window else rate, roi=roi)
    # ---------------------------------------------------------------------------------------------------
    commands = None
    if headless and sys.stdin is not None:
        # File sources with piped stdin: each line read when it is due (reproducible runs).
        on_demand = frames.kind in ("file", "folder") and not sys.stdin.isatty()
        commands = CommandFeed(sys.stdin, on_demand=on_demand)
    session = Session(rec, gallery_path, output.emit, shots, commands)
    signals: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        # SIGTERM (systemd, docker stop), SIGINT, SIGHUP (the terminal closed, the SSH session dropped)
        # and SIGQUIT end the loop like `quit`: the gallery is saved.
        signals.append(signum)
        session.stop()
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, stop)
    if headless:
        output.emit(
            {
                "event": "started",
                "source": frames.description,
                "bundle": str(rec.bundle),
                "backend": rec.backend.name,
                "gallery": str(gallery_path),
                "classes": rec.classes,
            }
        )
    result = RunResult(Stats(), frames.description)
    try:
        result = run_loop(rec, frames, session, output, max_frames)
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`): stop quietly, still save the gallery.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        frames.close()
        saved_ok = finish(session, output, result, screenshot, roi)
        web_parts.stop()
        click.echo(result.stats.summary(rec.backend.name), err=True)
    if frames.lost and not signals:
        click.echo(f"dmf-run: {frames.lost}", err=True)
    if not saved_ok or (frames.lost and not signals):
        sys.exit(1)
    if signal.SIGINT in signals:
        sys.exit(130)  # the shell's convention for a run ended by Ctrl-C


def bundle_manifest(bundle: Path) -> Manifest:
    try:
        return read_manifest(bundle)
    except BundleError as exc:
        raise AppError(str(exc)) from exc


def run_gallery_check(bundle: Path, gallery: Path | None) -> int:
    """--check-gallery: print what the full check of the gallery found; the exit status (0: sound)."""
    manifest = bundle_manifest(bundle)
    path = gallery if gallery is not None else default_gallery_path(manifest.fingerprint)
    try:
        report = full_check(path, manifest)
    except GalleryError as exc:
        raise AppError(f"cannot check the gallery {path}: {str(exc).rstrip('.')}") from None
    for line in report.lines:
        click.echo(line)
    return 0 if report.sound else 1


def describe_gallery(path: Path, classes: list[str], existed: bool) -> str:
    """The start line: which gallery this run reads and saves, and what it already holds (a gallery
    persists between runs, so a second run starts with the first run's classes)."""
    if not existed:
        return f"gallery {path}: new, no classes yet (saved at exit)"
    count = f"{len(classes)} class{'es' if len(classes) != 1 else ''}"
    if classes:
        count += ": " + ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    return f"gallery {path}: {count} (saved at exit; --gallery FILE for another)"


def finish(
    session: Session, output: Output, result: RunResult, screenshot: Path | None, roi: Roi | None = None
) -> bool:
    """Close the output, save the gallery if it changed, report, write the screenshot. False if the
    save failed."""
    output.close()
    saved = not session.dirty or session.save()["event"] == "saved"
    output.report(result)
    if screenshot is not None:
        canvas = getattr(output, "last_canvas", None)  # the window's, alone or beside the web console
        if canvas is None and result.last_frame is not None:
            source = f"{result.source} (headless)"
            view = View(prediction=result.last_prediction, fps=result.stats.fps, source=source, roi=roi)
            view.classes, view.thumbnails = class_strip(session)
            canvas = render(result.last_frame, view)
        if canvas is None or not _write_image(screenshot, canvas):
            log.warning("no screenshot written to %s", screenshot)
    return saved


def _write_image(path: Path, image: np.ndarray) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    return bool(cv2.imwrite(str(path), image))


if __name__ == "__main__":
    main()
