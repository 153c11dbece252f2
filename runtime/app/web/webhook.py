"""--webhook URL: POST a JSON object when the recognition changes, from a thread that never blocks the loop.

A change is reported once the new label has held for STABLE_FRAMES frames (a label that flickers for
one frame is not news): a label appears (from unknown), changes to another, or goes (unknown). Posts
wait in a queue of WEBHOOK_QUEUE (when it is full the oldest is dropped, with a warning); each is tried
up to WEBHOOK_TRIES times, WEBHOOK_TIMEOUT_S each, with a growing pause between. The loop only ever
puts an item in the queue.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from dmf_deploy.runtime.app.commands import Event, Session
from dmf_deploy.runtime.app.loop import RunResult, Stats
from dmf_deploy.runtime.recognizer import Prediction

log = logging.getLogger("dmf_deploy.runtime")

STABLE_FRAMES = 3
WEBHOOK_QUEUE = 64
WEBHOOK_TRIES = 3
WEBHOOK_TIMEOUT_S = 2.0
WEBHOOK_BACKOFF_S = 0.5  # then 1.0, 2.0, ...


class Webhook:
    """An Output of the frame loop that only watches the labels (compose it with Tee)."""

    holds_last_frame = False
    paused = False

    def __init__(self, url: str, sleep=time.sleep) -> None:
        self.url = url
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._sleep = sleep
        self._reported: str | None = None
        self._candidate: str | None = None
        self._run = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=WEBHOOK_QUEUE)
        self._thread = threading.Thread(target=self._post_all, name="dmf-run-webhook", daemon=True)
        self._thread.start()

    # ----- the Output protocol ---------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        pass

    def show(self, frame: np.ndarray, prediction: Prediction | None, session: Session, stats: Stats) -> bool:
        if prediction is not None:
            self.observe(prediction, stats.frames - 1)
        return True

    def close(self) -> None:
        """Posts already queued are still tried (bounded: at most a queue's worth of timeouts)."""
        self._put(None)
        self._thread.join(timeout=WEBHOOK_TIMEOUT_S * WEBHOOK_TRIES + 1)

    def report(self, result: RunResult) -> None:
        pass

    # ----- changes ---------------------------------------------------------------------------------
    def observe(self, prediction: Prediction, frame: int) -> None:
        label = prediction.label
        if label == self._candidate:
            self._run += 1
        else:
            self._candidate, self._run = label, 1
        if self._run != STABLE_FRAMES or label == self._reported:
            return  # not stable yet, or stable and already reported (unknown at the start is no news)
        change = "unknown" if label is None else ("appeared" if self._reported is None else "changed")
        score = prediction.score if np.isfinite(prediction.score) else None
        self._put(
            {
                "event": "recognition",
                "change": change,
                "label": label,
                "previous": self._reported,
                "score": score,
                "frame": frame,
                "time": round(time.time(), 3),
            }
        )
        self._reported = label

    def _put(self, item: dict[str, Any] | None) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                    log.warning("webhook %s: falling behind; the oldest change was dropped", self.url)
                except queue.Empty:
                    pass

    def _post_all(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._post(item):
                self.sent += 1
            else:
                self.failed += 1

    def _post(self, item: dict[str, Any]) -> bool:
        body = json.dumps(item).encode()
        pause = WEBHOOK_BACKOFF_S
        for attempt in range(1, WEBHOOK_TRIES + 1):
            request = urllib.request.Request(
                self.url, body, {"Content-Type": "application/json", "User-Agent": "dmf-run"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as response:
                    response.read(1024)
                return True
            except urllib.error.HTTPError as exc:
                if 400 <= exc.code < 500 and exc.code != 429:  # the receiver refuses it: retrying is no use
                    log.warning("webhook %s refused a change: HTTP %d", self.url, exc.code)
                    return False
                problem = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError, ValueError) as exc:
                problem = str(getattr(exc, "reason", exc))
            if attempt < WEBHOOK_TRIES:
                self._sleep(pause)
                pause *= 2
        log.warning("webhook %s: gave up after %d tries (%s)", self.url, WEBHOOK_TRIES, problem)
        return False
