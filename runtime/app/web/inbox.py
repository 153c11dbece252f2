"""The unknown inbox: recent frames the recogniser judged unknown, to assign to a class or start one.

At most one frame a second is kept (a person standing in view for a minute is one entry a second, not
thirty), and at most INBOX_SIZE, the oldest dropped. Frames are kept whole so that assigning one
enrols exactly what the camera saw; their small JPEGs are made on the first request.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import cv2
import numpy as np

from dmf_deploy.runtime.recognizer import Prediction

INBOX_SIZE = 12
INBOX_EVERY_S = 1.0
INBOX_THUMBNAIL = 160  # pixels, the longest side


@dataclass
class UnknownFrame:
    id: int
    time: float  # seconds since the epoch
    frame: np.ndarray
    score: float
    reason: str
    jpeg: bytes | None = field(default=None, repr=False)

    def record(self) -> dict:
        score = self.score if np.isfinite(self.score) else None
        return {"id": self.id, "time": round(self.time, 3), "score": score, "reason": self.reason}


class UnknownInbox:
    def __init__(self, size: int = INBOX_SIZE, every_s: float = INBOX_EVERY_S) -> None:
        self.size, self.every_s = size, every_s
        self._items: OrderedDict[int, UnknownFrame] = OrderedDict()
        self._ids = itertools.count(1)
        self._last = float("-inf")
        self._lock = threading.Lock()

    def offer(self, frame: np.ndarray, prediction: Prediction) -> None:
        """From the frame loop: keep the frame if it was judged unknown (with classes enrolled)."""
        if prediction.label is not None or not prediction.scores:
            return
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        item = UnknownFrame(next(self._ids), time.time(), frame, prediction.score, prediction.reason)
        with self._lock:
            self._items[item.id] = item
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def records(self) -> list[dict]:
        with self._lock:
            return [item.record() for item in reversed(self._items.values())]  # newest first

    def get(self, item_id: int) -> UnknownFrame | None:
        with self._lock:
            return self._items.get(item_id)

    def discard(self, item_id: int) -> bool:
        with self._lock:
            return self._items.pop(item_id, None) is not None

    def jpeg(self, item: UnknownFrame) -> bytes:
        if item.jpeg is None:
            h, w = item.frame.shape[:2]
            scale = min(1.0, INBOX_THUMBNAIL / max(h, w))
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = cv2.resize(item.frame, size, interpolation=cv2.INTER_AREA)
            item.jpeg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
        return item.jpeg
