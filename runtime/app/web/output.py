"""The console as an Output of the frame loop, and `Tee`, which gives the loop several outputs at once.

`WebOutput.show` runs on the frame loop's thread for every frame. It only hands things over: the frame
to the stream encoder (a reference), the prediction to the event stream (the JSON line --headless
prints), an unknown frame to the inbox. Then it runs the operations the web requests queued (enrol,
rename, delete, save, ...): the Session and the gallery are changed on the loop's thread alone, between
frames, as the window's keys and stdin's commands change them. A request waits for its operation's
result (at most OP_TIMEOUT_S) in the web server's thread, never the other way round.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from dmf_deploy.preprocess import Roi
from dmf_deploy.runtime.app.commands import Event, Session
from dmf_deploy.runtime.app.loop import Output, RunResult, Stats, prediction_record
from dmf_deploy.runtime.app.web.gallery_view import ClassSnapshot, take_snapshot
from dmf_deploy.runtime.app.web.hubs import EventHub
from dmf_deploy.runtime.app.web.inbox import UnknownInbox
from dmf_deploy.runtime.app.web.stream import StreamEncoder, StreamItem
from dmf_deploy.runtime.recognizer import Prediction, Recognizer

OP_TIMEOUT_S = 10.0  # a request whose operation the loop has not run by then gets 503 (a stalled source)
IDLE_WAIT_S = 0.03  # while the frame is held (paused, or the source ended): how often operations run


class ApiError(Exception):
    """A request that cannot be done: HTTP status, short error name, what was wrong."""

    def __init__(self, status: int, name: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.name, self.detail = status, name, detail


Operation = Callable[[Session, np.ndarray | None], Any]


@dataclass
class LiveState:
    """What the status strip shows; written by the loop's thread, read by requests."""

    fps: float = 0.0
    classify_ms: float = 0.0
    frames: int = 0
    dirty: bool = False
    can_undo: bool = False
    source_ended: bool = False


class WebOutput:
    holds_last_frame = True  # the console keeps serving the last frame after the source ends

    def __init__(
        self, rec: Recognizer, events: EventHub, encoder: StreamEncoder, inbox: UnknownInbox
    ) -> None:
        self.rec, self.events, self.encoder, self.inbox = rec, events, encoder, inbox
        self.paused = False
        self.explain = False
        self.frame_rate: float | None = None  # play a video file at its own rate (no window does it)
        self.idle_seconds = 0.0  # spent waiting for the next frame's time or a request (the benchmark)
        self._next_frame = time.monotonic()
        self.guide_box: Roi | None = None  # --roi, drawn on the live view (WebParts.wrap sets it)
        self.snapshot = ClassSnapshot()
        self.state = LiveState()
        self._ops: queue.SimpleQueue[tuple[Operation, Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        self._last_frame: np.ndarray | None = None
        self._prediction: Prediction | None = None
        self._submitted: tuple[Any, ...] = ()
        self._stats = Stats()

    # ----- from the web server's thread ------------------------------------------------------------
    def submit(self, operation: Operation) -> Future:
        """Queue an operation for the loop's thread; its Future holds the result (or the ApiError)."""
        future: Future = Future()
        if self._closed:
            future.set_exception(ApiError(503, "stopped", "dmf-run is stopping; nothing can change now"))
            return future
        self._ops.put((operation, future))
        self._wake.set()
        return future

    def changed(self) -> None:
        """A control changed (pause, explain): redraw the held frame without waiting for a new one."""
        self._wake.set()

    # ----- the Output protocol (the frame loop's thread) --------------------------------------------
    def emit(self, event: Event) -> None:
        self.events.publish(json.dumps(event))

    def show(self, frame: np.ndarray, prediction: Prediction | None, session: Session, stats: Stats) -> bool:
        fresh = frame is not self._last_frame
        self._last_frame = frame
        if fresh and prediction is not None:
            if self.events.listening:
                record = prediction_record(stats.frames - 1, prediction, stats.last_classify_ms)
                self.events.publish(json.dumps(record))
            self.inbox.offer(frame, prediction)
        if prediction is not None:  # a frame an enrolment took keeps the last prediction on screen
            self._prediction = prediction
        self._stats = stats
        self._refresh(session)
        self._submit_frame(frame, stats)
        self._run_ops(session, frame)
        # Held frame (paused, or the source ended): wait a little for a request instead of spinning.
        # A video file without a window: wait until its next frame is due. Requests run meanwhile.
        until = time.monotonic() + IDLE_WAIT_S
        if fresh and self.frame_rate and not session.frames_over:
            self._next_frame = max(self._next_frame + 1.0 / self.frame_rate, time.monotonic())
            until = self._next_frame
        elif fresh:
            return True
        waited = time.perf_counter()
        while (left := until - time.monotonic()) > 0:
            if self._wake.wait(left):
                self._wake.clear()
                self._run_ops(session, frame)
        self.idle_seconds += time.perf_counter() - waited
        self._submit_frame(frame, stats)  # a control may have changed what the held frame shows
        return True

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                _, future = self._ops.get_nowait()
            except queue.Empty:
                return
            future.set_exception(ApiError(503, "stopped", "dmf-run stopped before this could be done"))

    def report(self, result: RunResult) -> None:
        pass

    # ----- internals -------------------------------------------------------------------------------
    def _submit_frame(self, frame: np.ndarray, stats: Stats) -> None:
        key = (id(frame), id(self._prediction), self.explain, self.guide_box)
        if key == self._submitted:
            return  # the held frame, drawn already
        self._submitted = key
        captured = stats.end if stats.end is not None else time.perf_counter()
        self.encoder.submit(StreamItem(frame, self._prediction, captured, self.explain, self.guide_box))

    def _refresh(self, session: Session) -> None:
        """The class snapshot (when the gallery changed) and the status, for requests to read."""
        stats = self._stats
        if self.snapshot.version != session.version:
            self.snapshot = take_snapshot(self.rec, session.version)
        self.state = LiveState(
            fps=stats.recent,
            classify_ms=stats.last_classify_ms,
            frames=stats.frames,
            dirty=session.dirty,
            can_undo=bool(session.undoable),
            source_ended=session.frames_over,
        )

    def _run_ops(self, session: Session, frame: np.ndarray) -> None:
        while True:
            try:
                operation, future = self._ops.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = operation(session, frame)
            except Exception as exc:  # handed to the request, which answers with a JSON error
                future.set_exception(exc)
                continue
            finally:
                self._refresh(session)  # before the request reads the classes the operation changed
            future.set_result(result)


class Tee:
    """Several outputs as one: every event and frame goes to each. An output that does not hold the
    last frame (JSON lines, the webhook) sees each frame once, not again while the frame is held."""

    def __init__(self, *outputs: Output) -> None:
        self.outputs = outputs
        self._last_frame: np.ndarray | None = None

    @property
    def holds_last_frame(self) -> bool:  # type: ignore[override]
        return any(o.holds_last_frame for o in self.outputs)

    @property
    def paused(self) -> bool:  # type: ignore[override]
        return any(o.paused for o in self.outputs)

    def emit(self, event: Event) -> None:
        for output in self.outputs:
            output.emit(event)

    def show(self, frame: np.ndarray, prediction: Prediction | None, session: Session, stats: Stats) -> bool:
        fresh = frame is not self._last_frame
        self._last_frame = frame
        keep_going = True
        for output in self.outputs:
            if fresh or output.holds_last_frame or output.paused:
                keep_going = output.show(frame, prediction, session, stats) and keep_going
        return keep_going

    def close(self) -> None:
        for output in self.outputs:
            output.close()

    def report(self, result: RunResult) -> None:
        for output in self.outputs:
            output.report(result)

    @property
    def last_canvas(self) -> np.ndarray | None:
        """The window's last image, when one of the outputs is the window (for --screenshot)."""
        for output in self.outputs:
            canvas = getattr(output, "last_canvas", None)
            if canvas is not None:
                return canvas
        return None
