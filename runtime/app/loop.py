"""dmf-run's frame loop: capture -> commands -> enrol or classify -> output, for every kind of output.

One loop serves the window and the headless JSON lines. Before each frame the Session runs the
commands that are due (its `run_due_commands` is the one place commands enter); a frame that a
pending `enroll` takes is enrolled, every other frame is classified and handed to the Output. When the
source ends the Session says so (`end_of_source`); an Output that holds the last frame (the window)
keeps the loop going so classes can still be managed, the others end it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from dmf_deploy.runtime.app.commands import Event, Session
from dmf_deploy.runtime.app.sources import FrameSource
from dmf_deploy.runtime.recognizer import Prediction, Recognizer

TOP_K = 5  # classes listed per frame, in the JSON `top` field and in the window's panel


@dataclass
class Stats:
    """End-to-end throughput: every frame read, from the first frame to the end of the loop."""

    frames: int = 0
    classified: int = 0
    classify_seconds: float = 0.0
    last_classify_ms: float = 0.0
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
        if self.classified:
            mean = 1000 * self.classify_seconds / self.classified
            classify = f"classify {mean:.1f} ms mean over {self.classified} frames"
        else:
            classify = "no frame classified"
        return (
            f"dmf-run: {self.frames} frames in {self.seconds:.2f} s: {self.fps:.1f} fps end to end "
            f"({classify}; backend {backend})"
        )


@dataclass
class RunResult:
    """What a run leaves: its throughput, and the last frame read with its last prediction."""

    stats: Stats
    source: str = ""
    last_frame: np.ndarray | None = None
    last_prediction: Prediction | None = None


class Output(Protocol):
    """Where the loop's frames and the Session's events go."""

    holds_last_frame: bool  # keep showing the last frame after the source ends (until quit)
    paused: bool  # hold the frame on screen now (the window's `p`); no frame is read meanwhile

    def emit(self, event: Event) -> None:
        """One Session event (enrolled, saved, error, end_of_source, ...)."""

    def show(self, frame: np.ndarray, prediction: Prediction | None, session: Session, stats: Stats) -> bool:
        """One frame and its prediction (None: the frame went to an enrolment); the Session is there
        for outputs that take keys. False ends the loop."""

    def close(self) -> None:
        """The loop is over (the gallery is saved after this; its events still come to `emit`)."""

    def report(self, result: RunResult) -> None:
        """The run's last word (after the gallery is saved)."""


def run_loop(
    rec: Recognizer, source: FrameSource, session: Session, output: Output, max_frames: int | None = None
) -> RunResult:
    """Frames from `source` until quit, the output ends it, or the frames run out (see the module doc)."""
    result = RunResult(Stats(), source.description)
    stats = result.stats
    predicted_at = session.version  # the gallery version of the last prediction
    while not session.stopped:
        session.run_due_commands()
        if session.stopped:
            break
        if not session.frames_over and not (output.paused and result.last_frame is not None):
            if max_frames is not None and stats.frames >= max_frames:
                break
            frame = source.read()
            if frame is None:
                session.end_of_frames(stats.frames, source_ended=True)
                continue  # commands that came with the end still run, then the output decides
            stats.tick()
            result.last_frame = frame
            taken = session.take_frame(frame, stats.frames - 1)
            prediction = None if taken else classify(rec, frame, stats)
            if prediction is not None:
                result.last_prediction, predicted_at = prediction, session.version
            keep_going = output.show(frame, prediction, session, stats)
        elif (output.paused or output.holds_last_frame) and result.last_frame is not None:
            if predicted_at != session.version:  # the held frame, against the changed gallery
                result.last_prediction = classify(rec, result.last_frame, stats)
                predicted_at = session.version
            keep_going = output.show(result.last_frame, result.last_prediction, session, stats)
        else:
            break
        if not keep_going:
            break
    # Stopped (quit, SIGTERM, --max-frames, the window closed): a pending enrol keeps the frames it got.
    session.end_of_frames(stats.frames, source_ended=False)
    session.run_due_commands()  # commands left once the frames are over still run if they need none
    return result


def classify(rec: Recognizer, frame: np.ndarray, stats: Stats) -> Prediction:
    start = time.perf_counter()
    prediction = rec.classify(frame)
    seconds = time.perf_counter() - start
    stats.classified += 1
    stats.classify_seconds += seconds
    stats.last_classify_ms = 1000 * seconds
    assert isinstance(prediction, Prediction)
    return prediction


# ----- JSON lines ------------------------------------------------------------------------------------
def _number(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None  # JSON has no NaN


def prediction_record(index: int, prediction: Prediction, latency_ms: float) -> dict[str, Any]:
    return {
        "frame": index,
        "label": prediction.label,
        "score": _number(prediction.score),
        "top": [[name, _number(score)] for name, score in prediction.top(TOP_K)],
        "latency_ms": round(latency_ms, 3),
        "reason": prediction.reason or None,  # why the label is null, when the open-set rule refused it
    }


def print_json(record: dict[str, Any]) -> None:
    # ASCII-escaped so any stdout encoding can carry any class name; flushed so pipes see lines live.
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


class JsonLinesOutput:
    """Headless: one JSON line per classified frame on stdout, and one per event."""

    holds_last_frame = False
    paused = False

    def emit(self, event: Event) -> None:
        print_json(event)

    def show(self, frame: np.ndarray, prediction: Prediction | None, session: Session, stats: Stats) -> bool:
        if prediction is not None:  # frames are numbered from 0 in the order read, enrolled ones included
            print_json(prediction_record(stats.frames - 1, prediction, stats.last_classify_ms))
        return True

    def close(self) -> None:
        pass

    def report(self, result: RunResult) -> None:
        stats = result.stats
        seconds, fps = round(stats.seconds, 3), round(stats.fps, 2)
        print_json({"event": "stopped", "frames": stats.frames, "seconds": seconds, "fps": fps})
