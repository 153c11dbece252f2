"""dmf-demo: the packaged demo model recognising symbols in a generated "camera" video.

    dmf-demo                       # 5 classes, 2 shots: write a video, enrol, recognise, report
    dmf-demo --shots 1 --classes 8 --out demo.mp4
    dmf-demo --camera 0            # the live window (dmf-run) on the demo model

The demo model was trained on handwritten Omniglot characters (the Latin alphabet held out), so the
video shows hand-drawn-looking capital letters and digits, each frame redrawn with its own stroke
wobble, slant, size and stroke width (the small stroke font of `dmf_deploy.symbols`), on a card held in
front of a webcam: 640x480 frames in which the card is grey or off-white paper, smaller than the frame,
anywhere in it, tilted and turned, under uneven tinted light, out of focus, noisy and JPEG-compressed,
on a cluttered background (dmf_deploy.camera_sim, every factor on). So the accuracy it prints is the
one a user gets from a camera, not from a studio shot.

Why letters: through the demo bundle they separate as well as the best random-stroke glyphs, and
they mean something to a viewer (benchmarks/README.md, "The demo's symbols", has the accuracies).

The video is written with cv2.VideoWriter (mp4v, or MJPG for .avi) and read back through the same
frame source `dmf-run --source` uses, so compression and decoding are part of the run. Its first
part shows each class for --frames-per-class frames; the first --shots frames of each of those
segments are enrolled (pass 1). The second part shows the classes again in a shuffled order. Then
the video is replayed like a camera (pass 2): every frame that is not a shot is recognised, with all
classes enrolled, and counts towards the accuracy; a frame judged 'unknown' counts as wrong.

Nothing is exported by default: the packaged demo bundle runs on the torch-free Recognizer, so the
demo works on a `[runtime]`-only install. `--export` re-exports the packaged checkpoint into a
temporary bundle first (needs the `export` extra: torch, onnx).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
import cv2
import numpy as np

from dmf_deploy.camera_sim import FRAME_SIZE, render_card_frame
from dmf_deploy.cli_support import DmfCommand, version_option
from dmf_deploy.packaged import DEMO_BUNDLE, demo_bundle_installed
from dmf_deploy.symbols import STROKE_FONT, symbol_ink

if TYPE_CHECKING:
    from dmf_deploy.runtime import Recognizer

FPS = 15
Tick = Callable[[], None] | None  # advances a progress bar by one


# ----- the video ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Script:
    """What the video shows: frame i shows symbol `labels[i]`; frames in `enroll` are the shots."""

    symbols: tuple[str, ...]  # the enrolled classes, in enrolment order
    labels: tuple[str, ...]  # per frame
    enroll: dict[int, str]  # frame index -> class it is a shot of

    @property
    def recognised(self) -> int:
        return len(self.labels) - len(self.enroll)


def make_script(classes: int, shots: int, frames_per_class: int, seed: int) -> Script:
    """Part 1: each class for `frames_per_class` frames, the first `shots` of them enrolled.
    Part 2: the classes again, in a shuffled order, `frames_per_class` frames each."""
    pool = sorted(STROKE_FONT)
    if not 2 <= classes <= len(pool):
        raise click.BadParameter(
            f"must be 2..{len(pool)} (the demo draws {len(pool)} symbols)", param_hint="--classes"
        )
    if not 1 <= shots <= frames_per_class:
        raise click.BadParameter(
            f"must be 1..{frames_per_class} (--frames-per-class): shots are the first frames of a segment",
            param_hint="--shots",
        )
    rng = np.random.default_rng([seed, 0])
    symbols = tuple(str(s) for s in rng.choice(pool, size=classes, replace=False))
    labels: list[str] = []
    enroll: dict[int, str] = {}
    for symbol in symbols:
        for k in range(frames_per_class):
            if k < shots:
                enroll[len(labels)] = symbol
            labels.append(symbol)
    for c in rng.permutation(classes):
        labels.extend([symbols[c]] * frames_per_class)
    return Script(symbols, tuple(labels), enroll)


def render_frames(script: Script, seed: int, size: tuple[int, int] = FRAME_SIZE) -> Iterator[np.ndarray]:
    """Frame i: symbol `labels[i]` drawn by hand on a card, filmed by a simulated webcam."""
    for index, symbol in enumerate(script.labels):
        rng = np.random.default_rng([seed, 1, index])
        drawing = 255 - symbol_ink(STROKE_FONT[symbol], rng)
        yield render_card_frame(drawing, rng, size=size)


def video_codec(path: Path) -> str:
    return "MJPG" if path.suffix.lower() == ".avi" else "mp4v"


def write_video(
    path: Path, frames: Iterator[np.ndarray], size: tuple[int, int], on_frame: Tick = None
) -> int:
    """Write the frames (size = (width, height)) with cv2.VideoWriter; returns how many were written."""
    codec = video_codec(path)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), FPS, size)
    if not writer.isOpened():
        raise click.ClickException(
            f"OpenCV cannot write {codec} video to {path}; try --out with a .avi (MJPG) or .mp4 (mp4v) name"
        )
    count = 0
    try:
        for frame in frames:
            writer.write(frame)
            count += 1
            if on_frame is not None:
                on_frame()
    finally:
        writer.release()
    return count


# ----- running the demo -----------------------------------------------------------------------------
@dataclass
class Result:
    correct: int = 0
    unknown: int = 0
    total: int = 0
    seconds: float = 0.0  # the recognition pass, end to end: decode + classify every frame
    latencies_ms: list[float] = field(default_factory=list)
    per_class: dict[str, list[int]] = field(default_factory=dict)  # symbol -> [correct, total]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def fps(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else float("nan")


def enrol_from_video(rec: Recognizer, video: Path, script: Script, on_shot: Tick = None) -> list[str]:
    """Pass 1 over the video: enrol each class's shots, frame by frame, as soon as they are complete.
    `on_shot` is called once per shot (a class's shots all at once, when it is complete). A shot the
    model sees as blank (its drawing not found) is refused, as in dmf-run, and left out; a class left
    with no shot is not enrolled (its frames then count as wrong). Returns one line per shot left out."""
    from dmf_deploy.preprocess import InvalidFrame
    from dmf_deploy.runtime.app.sources import open_source

    source = open_source(source=str(video))
    enrollments = {s: rec.enrollment(s) for s in script.symbols}
    taken = dict.fromkeys(script.symbols, 0)
    need = {s: sum(1 for v in script.enroll.values() if v == s) for s in script.symbols}
    left_out: list[str] = []
    try:
        for index in range(max(script.enroll) + 1):
            frame = source.read()
            if frame is None:
                raise click.ClickException(f"{video} ended after {index} frames, during enrolment")
            if index not in script.enroll:
                continue
            symbol = script.enroll[index]
            try:
                enrollments[symbol].add(frame)
            except InvalidFrame as exc:
                left_out.append(f"the shot of {symbol!r} at video frame {index} is left out: {exc}")
            taken[symbol] += 1
            if taken[symbol] == need[symbol]:
                if enrollments[symbol].shots:
                    enrollments[symbol].commit()
                else:
                    left_out.append(f"{symbol!r} is not enrolled: the model saw every shot of it as blank")
                for _ in range(need[symbol]):
                    if on_shot is not None:
                        on_shot()
    finally:
        source.close()
    return left_out


def recognise_video(rec: Recognizer, video: Path, script: Script, on_frame: Tick = None) -> Result:
    """Pass 2: replay the video as a camera; classify every frame that was not a shot."""
    from dmf_deploy.runtime.app.sources import open_source

    source = open_source(source=str(video))
    result = Result(per_class={s: [0, 0] for s in script.symbols})
    start = time.perf_counter()
    try:
        for index, truth in enumerate(script.labels):
            frame = source.read()
            if frame is None:
                raise click.ClickException(
                    f"{video} has {index} frames, {len(script.labels)} were written: the video is truncated"
                )
            if index in script.enroll:
                continue
            t0 = time.perf_counter()
            pred = rec.classify(frame)
            result.latencies_ms.append(1000 * (time.perf_counter() - t0))
            hit = pred.label == truth
            result.correct += hit
            result.unknown += pred.label is None
            result.total += 1
            result.per_class[truth][0] += hit
            result.per_class[truth][1] += 1
            if on_frame is not None:
                on_frame()
    finally:
        result.seconds = time.perf_counter() - start
        source.close()
    return result


def report(result: Result, script: Script, shots: int) -> list[str]:
    lat = np.asarray(result.latencies_ms or [float("nan")])
    classes = len(script.symbols)
    per_class = "  ".join(f"{s} {100 * c / t:.0f}%" for s, (c, t) in result.per_class.items() if t)
    return [
        f"accuracy: {100 * result.accuracy:.1f}% ({result.correct}/{result.total} frames; "
        f"chance {100 / classes:.1f}%; {result.unknown} 'unknown')",
        f"per class: {per_class}",
        f"latency: median {np.median(lat):.1f} ms, p90 {np.percentile(lat, 90):.1f} ms per frame "
        f"(Recognizer.classify: preprocess + backbone + head over {classes} classes)",
        f"throughput: {result.fps:.1f} FPS ({result.total} frames in {result.seconds:.2f} s, "
        f"decoding included; {shots} shot{'s' if shots > 1 else ''} per class enrolled)",
    ]


def progress(label: str, total: int):
    """A progress bar on stderr (click's: the runtime install has no rich): counts up to `total`."""
    return click.progressbar(
        length=total, label=f"{label:<20}", file=sys.stderr, show_pos=True, show_percent=False
    )


def export_demo_bundle(folder: Path, say: Callable[[str], None]) -> Path:
    """Re-export the packaged demo checkpoint (fixed-step dopri5 x 8, as the packaged bundle). Needs torch."""
    try:
        from dmf_deploy.export.bundle import export_bundle
    except ImportError as exc:
        raise click.ClickException(f"--export needs the export extra (torch, onnx): {exc}") from None
    return export_bundle("demo", folder / "bundle", solver="dopri5", steps=8, progress=say)


def live(camera: int, bundle: Path | None, shots: int | None) -> None:
    """`dmf-run --camera N` on the demo model (its own default gallery, one per model)."""
    from dmf_deploy.runtime.app import cli

    args = ["--camera", str(camera)]
    if bundle is not None:
        args += ["--bundle", str(bundle)]
    if shots is not None:
        args += ["--shots", str(shots)]
    cli.main.main(args=args, prog_name="dmf-run")


@click.command("dmf-demo", cls=DmfCommand, context_settings={"help_option_names": ["-h", "--help"]})
@version_option("dmf-demo")
@click.option("--classes", type=click.IntRange(min=2), default=5, show_default=True, help="Classes to enrol.")
@click.option(
    "--shots",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Shots per class: the first frames of each class's segment (with --camera: the window's target).",
)
@click.option(
    "--frames-per-class",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Frames per class segment; each class has two segments.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Symbols and frames.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Keep the video: a .mp4 (mp4v) or .avi (MJPG) file, or a folder (for dmf-demo.mp4).",
)
@click.option("--camera", type=click.IntRange(min=0), help="Open the live window (dmf-run) on this camera.")
@click.option("--export", "reexport", is_flag=True, help="Re-export the demo checkpoint first (needs torch).")
@click.option(
    "--backend", type=click.Choice(("auto", "onnxruntime", "tensorrt")), default="auto", show_default=True
)
def main(
    classes: int,
    shots: int,
    frames_per_class: int,
    seed: int,
    out: Path | None,
    camera: int | None,
    reexport: bool,
    backend: str,
) -> None:
    """Recognise hand-drawn symbols in a generated video with the packaged demo model.

    \b
    Writes a video of hand-drawn letters and digits, enrols --classes of them from the first
    --shots frames of each class's segment, recognises every other frame (the classes come back in
    a shuffled order) and prints the accuracy, the per-frame latency and the FPS.
    """
    from dmf_deploy.runtime import Recognizer
    from dmf_deploy.runtime.recognizer import describe_model

    ctx = click.get_current_context()
    with tempfile.TemporaryDirectory(prefix="dmf-demo-") as tmp:
        folder = Path(tmp)
        bundle = DEMO_BUNDLE
        if reexport:
            click.echo("dmf-demo: re-exporting the demo checkpoint (dopri5 x 8)", err=True)
            bundle = export_demo_bundle(folder, lambda msg: click.echo(f"dmf-demo: {msg}", err=True))
        elif not demo_bundle_installed():
            raise click.ClickException(f"the demo bundle is not installed ({bundle}); try --export")
        if camera is not None:
            from dmf_deploy.runtime.app.cli import no_display

            if no_display():
                raise click.ClickException(
                    "dmf-demo --camera opens a window, and there is no display to open it on (DISPLAY "
                    "is not set). Without --camera, dmf-demo needs no window (it recognises a generated "
                    f"video); for a camera without a window, run `dmf-run --camera {camera} --headless` "
                    "(commands on stdin, JSON lines out); over ssh: ssh -X, or DISPLAY=:0"
                )
            explicit = ctx.get_parameter_source("shots") != click.core.ParameterSource.DEFAULT
            live(camera, bundle if reexport else None, shots if explicit else None)
            return

        script = make_script(classes, shots, frames_per_class, seed)
        if out is None:
            video = folder / "dmf-demo.mp4"
        else:
            video = out / "dmf-demo.mp4" if out.is_dir() else out
            video.parent.mkdir(parents=True, exist_ok=True)
        rec = Recognizer.open(bundle, backend=backend)
        click.echo(
            f"dmf-demo: model {describe_model(rec.manifest)}; bundle {bundle}; backend {rec.backend.name}"
        )
        with progress("writing the video", len(script.labels)) as bar:
            written = write_video(video, render_frames(script, seed), FRAME_SIZE, lambda: bar.update(1))
        with progress("enrolling (shots)", len(script.enroll)) as bar:
            left_out = enrol_from_video(rec, video, script, lambda: bar.update(1))
        for line in left_out:
            click.echo(f"dmf-demo: {line}", err=True)
        with progress("recognising", script.recognised) as bar:
            result = recognise_video(rec, video, script, lambda: bar.update(1))
        kept = "kept" if out is not None else "temporary; --out keeps it"
        size = f"{FRAME_SIZE[0]}x{FRAME_SIZE[1]}"
        click.echo(f"video: {video} ({written} frames, {size}, {FPS} fps, {video_codec(video)}; {kept})")
        plural = "s" if shots > 1 else ""
        click.echo(
            f"classes: {', '.join(script.symbols)} ({classes} classes, {shots} shot{plural} each, from the "
            f"first frames of each class's segment; {frames_per_class} frames per segment)"
        )
        for line in report(result, script, shots):
            click.echo(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
