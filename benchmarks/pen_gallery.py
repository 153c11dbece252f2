"""Many classes for the demo model: pen strokes on grey paper, enrolled through the public API.

The benchmarks that need a big gallery of the packaged demo model (serve_enrol.py, app_scale.py) build
it here as an application would: `Recognizer.enroll` of one frame per class, `rec.save()` every
SAVE_EVERY classes (each save one transaction of what changed). Class `c`'s drawing is two to four
strokes placed by its own seed; `pen_frame(c, shot)` with shot > 0 moves every stroke end a few
pixels, another shot of the same drawing.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from dmf_deploy.preprocess import InvalidFrame
from dmf_deploy.runtime import Recognizer

FRAME_SIZE = (120, 160)  # height, width: a small camera frame; the demo model finds the drawing in it
PAPER, INK = 200, 30  # grey paper, dark pen (the demo model's frame rule takes thin dark lines for ink)
SAVE_EVERY = 500  # classes enrolled between saves while building


def pen_frame(class_id: int, shot: int = 0) -> np.ndarray:
    """An HxWx3 BGR frame of class `class_id`'s drawing; `shot` jitters it (0: as enrolled)."""
    h, w = FRAME_SIZE
    rng = np.random.default_rng(class_id)
    strokes = rng.integers(0, 1 << 16, (int(rng.integers(2, 5)), 2, 2)) / float(1 << 16)
    ends = strokes * (w - 40, h - 40) + 20
    if shot:
        ends += np.random.default_rng((class_id, shot)).uniform(-3, 3, ends.shape)
    frame = np.full((h, w, 3), PAPER, np.uint8)
    for a, b in ends.round().astype(int):
        cv2.line(frame, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), (INK, INK, INK), 3, cv2.LINE_AA)
    return frame


def class_name(class_id: int) -> str:
    return f"drawing {class_id}"


RETAKES = 5  # another drawing of the class, as a user would show the card again


def enrol_one(rec: Recognizer, class_id: int) -> None:
    """Enrol one shot of the class; a drawing the frame rule calls blank (about 2 in 1,000 of these
    random pen lines) is drawn again, as `pen_frame(class_id, shot)` for the next shot."""
    for shot in range(RETAKES):
        try:
            rec.enroll(class_name(class_id), [pen_frame(class_id, shot)])
            return
        except InvalidFrame:
            continue
    raise RuntimeError(f"{RETAKES} drawings of class {class_id} were all blank to the model")


def build_gallery(bundle: str | Path, path: Path, n: int) -> float:
    """Enrol classes 0..n-1 into the gallery at `path` (new or holding some of them); seconds taken."""
    start = time.perf_counter()
    with Recognizer.open(bundle, gallery=path) as rec:
        for c in range(len(rec.classes), n):
            enrol_one(rec, c)
            if (c + 1) % SAVE_EVERY == 0:
                rec.save()
        rec.save()
        assert len(rec.classes) == n, f"{path} holds {len(rec.classes)} classes, not {n}"
    return time.perf_counter() - start
