"""The live view's frames: the overlay drawn and the JPEG encoded once per frame, on a thread of their own.

The frame loop hands each frame to `StreamEncoder.submit` (it only keeps a reference: the loop never
waits). The encoder's thread takes the newest frame when it is free, draws the overlay (label and
score, the guide box, the explanation's points when toggled), encodes one JPEG and publishes it to the
FrameHub, which every viewer reads. With no viewer nothing is encoded; frames that arrive while one is
being encoded, or sooner than MAX_VIEW_FPS allows, are skipped (the newest wins), so the stream never
falls behind the camera.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np

from dmf_deploy.preprocess import Roi
from dmf_deploy.runtime.app.overlay import (
    KNOWN,
    UNKNOWN,
    draw_guide_box,
    fit_text,
    letterbox,
    letterbox_affine,
    put,
)
from dmf_deploy.runtime.app.web.hubs import EncodedFrame, FrameHub
from dmf_deploy.runtime.explain import ExplanationUnavailable, draw_live
from dmf_deploy.runtime.recognizer import Prediction, Recognizer

log = logging.getLogger("dmf_deploy.runtime")

STREAM_WIDTH = 640  # the live view fits 640 x 480 (the window's video area), the frame's aspect kept
MAX_STREAM_HEIGHT = 480
JPEG_QUALITY = 80
# The live view shows at most this many frames a second (a camera gives no more; a file played as fast
# as it goes would otherwise make the encoder and the server race the loop for the CPU).
MAX_VIEW_FPS = 30.0


@dataclass(frozen=True)
class StreamItem:
    """What one live-view image shows."""

    frame: np.ndarray
    prediction: Prediction | None
    captured: float  # time.perf_counter() at capture
    explain: bool = False
    guide_box: Roi | None = None  # --roi: the region of the frame the model sees


def draw_stream(item: StreamItem, rec: Recognizer | None = None) -> np.ndarray:
    """The live view's image: the frame scaled to fit STREAM_WIDTH x MAX_STREAM_HEIGHT, the overlay on it."""
    frame = item.frame
    h, w = frame.shape[:2]
    fit = min(STREAM_WIDTH / w, MAX_STREAM_HEIGHT / h)
    width, height = max(1, round(w * fit)), max(1, round(h * fit))
    # Exactly the frame's aspect: no bars. A frame of the right size is only copied.
    canvas = frame.copy() if (width, height) == (w, h) else letterbox(frame, width, height)
    scale, shift = letterbox_affine(frame.shape, width, height)
    if item.guide_box is not None:  # drawn as the window draws it: the pixels the model sees
        draw_guide_box(canvas, item.guide_box, frame.shape)
    pred = item.prediction
    if item.explain and rec is not None and pred is not None and pred.label is not None:
        # No explain.onnx, or the class went away since the prediction: no points.
        with contextlib.suppress(ExplanationUnavailable, KeyError, ValueError):
            draw_live(canvas, rec.explain(frame, pred.label), frame, (scale, shift), None)
    if pred is not None:
        if pred.label is None:
            text, color = "unknown", UNKNOWN
        else:
            text, color = f"{pred.label}  {pred.score:.3f}", KNOWN
        text = fit_text(text, width - 24, 0.8, 2)
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.8, 2)
        band = canvas[: th + 20, : tw + 24]
        band[:] = (band * 0.35).astype(np.uint8)  # a dark band under the text, the video still visible
        put(canvas, text, (12, th + 10), 0.8, color, 2)
    return canvas


class StreamEncoder:
    """A thread that draws and encodes the newest submitted frame while anyone is watching."""

    def __init__(self, hub: FrameHub, rec: Recognizer | None = None) -> None:
        self.hub, self.rec = hub, rec
        self.encoded = 0  # frames encoded, for the tests and the benchmark: at most one per frame
        self.encode_seconds = 0.0
        self._item: StreamItem | None = None
        self._fresh = False  # the item was not encoded yet
        self._stopping = False
        self._seq = 0
        self._wake = threading.Condition()
        hub.on_viewer.append(self.wake)
        self._thread = threading.Thread(target=self._run, name="dmf-run-web-encoder", daemon=True)
        self._thread.start()

    def submit(self, item: StreamItem) -> None:
        """From the frame loop: the newest frame (a reference is kept; nothing is copied or waited for)."""
        with self._wake:
            self._item, self._fresh = item, True
            self._wake.notify()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=5)

    def _due(self, last_captured: float, last_encoded: float) -> float:
        """Seconds until the newest frame may be encoded (0: now). A frame captured a view interval
        after the last one shown goes at once (a camera at MAX_VIEW_FPS never waits); one captured
        sooner waits until a view interval has passed since the last encode, unless a newer one comes."""
        assert self._item is not None
        interval = 1.0 / MAX_VIEW_FPS
        if self._item.captured - last_captured >= 0.9 * interval:  # 10% for a camera's jitter
            return 0.0
        return max(0.0, last_encoded + interval - time.perf_counter())

    def _run(self) -> None:
        last_captured = last_encoded = float("-inf")
        while True:
            with self._wake:
                while not self._stopping:
                    wait = self._due(last_captured, last_encoded) if self._fresh else 0.5
                    if self._fresh and self.hub.viewers > 0 and wait <= 0:
                        break
                    self._wake.wait(timeout=min(0.5, wait) if wait > 0 else 0.5)
                if self._stopping:
                    return
                item, self._fresh = self._item, False
            last_captured, last_encoded = item.captured, time.perf_counter()
            assert item is not None
            start = time.perf_counter()
            try:
                image = draw_stream(item, self.rec)
                ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            except cv2.error as exc:  # never let one odd frame end the live view
                log.warning("live view: could not encode a frame: %s", exc)
                continue
            if not ok:
                continue
            self._seq += 1
            self.encoded += 1
            self.encode_seconds += time.perf_counter() - start
            self.hub.publish(EncodedFrame(self._seq, jpeg.tobytes(), item.captured))
