"""A small hand-drawn stroke font and its renderer: capital letters and digits on a lit white card.

Polylines and arcs (no I, 0 or 1, which look like other symbols), not cv2.putText: OpenCV 5 replaced the
Hershey fonts with an outline font, so putText draws different letters on different OpenCV versions,
while polylines draw the same everywhere. `dmf-demo` films them; INT8 calibration of the demo model
renders them too. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

FRAME_SIZE = 112  # square frames: the demo model sees 56x56; Omniglot's drawings are 105x105
Point = tuple[float, float]


# ----- a small hand-drawn stroke font ----------------------------------------------------------------
def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 0) -> list[Point]:
    """An elliptic arc from angle a0 to a1 (degrees; 0 = right, 90 = down, since y points down)."""
    n = n or max(4, math.ceil(abs(a1 - a0) / 12))
    theta = np.radians(np.linspace(a0, a1, n + 1))
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in theta]


def _stroke_font() -> dict[str, tuple[tuple[Point, ...], ...]]:
    """Symbol -> strokes, each a polyline in the unit square (x right, y down)."""
    o = _arc(0.5, 0.5, 0.3, 0.35, 0, 360)
    p_bowl = [(0.25, 0.85), (0.25, 0.15), (0.5, 0.15), *_arc(0.5, 0.33, 0.22, 0.18, -90, 90), (0.25, 0.51)]
    font: dict[str, list[list[Point]]] = {
        "A": [[(0.2, 0.85), (0.5, 0.15), (0.8, 0.85)], [(0.33, 0.58), (0.67, 0.58)]],
        "B": [
            [(0.25, 0.15), (0.25, 0.85)],
            [(0.25, 0.15), (0.5, 0.15), *_arc(0.5, 0.325, 0.18, 0.175, -90, 90), (0.25, 0.5)],
            [(0.25, 0.5), (0.53, 0.5), *_arc(0.53, 0.675, 0.2, 0.175, -90, 90), (0.25, 0.85)],
        ],
        "C": [_arc(0.52, 0.5, 0.3, 0.35, 40, 320)],
        "D": [
            [(0.25, 0.15), (0.25, 0.85)],
            [(0.25, 0.15), *_arc(0.45, 0.5, 0.3, 0.35, -90, 90), (0.25, 0.85)],
        ],
        "E": [[(0.75, 0.15), (0.25, 0.15), (0.25, 0.85), (0.75, 0.85)], [(0.25, 0.5), (0.65, 0.5)]],
        "F": [[(0.75, 0.15), (0.25, 0.15), (0.25, 0.85)], [(0.25, 0.5), (0.65, 0.5)]],
        "G": [[*_arc(0.52, 0.5, 0.3, 0.35, -40, -360), (0.82, 0.5), (0.58, 0.5)]],
        "H": [[(0.25, 0.15), (0.25, 0.85)], [(0.75, 0.15), (0.75, 0.85)], [(0.25, 0.5), (0.75, 0.5)]],
        "J": [[(0.7, 0.15), (0.7, 0.65), *_arc(0.5, 0.65, 0.2, 0.2, 0, 180)]],
        "K": [[(0.25, 0.15), (0.25, 0.85)], [(0.75, 0.15), (0.25, 0.58)], [(0.42, 0.45), (0.75, 0.85)]],
        "L": [[(0.25, 0.15), (0.25, 0.85), (0.75, 0.85)]],
        "M": [[(0.2, 0.85), (0.25, 0.15), (0.5, 0.6), (0.75, 0.15), (0.8, 0.85)]],
        "N": [[(0.25, 0.85), (0.25, 0.15), (0.75, 0.85), (0.75, 0.15)]],
        "O": [o],
        "P": [p_bowl],
        "Q": [o, [(0.55, 0.65), (0.82, 0.9)]],
        "R": [p_bowl, [(0.45, 0.51), (0.75, 0.85)]],
        "S": [[*_arc(0.5, 0.33, 0.22, 0.17, -30, -270), *_arc(0.5, 0.67, 0.24, 0.18, -90, 150)]],
        "T": [[(0.2, 0.15), (0.8, 0.15)], [(0.5, 0.15), (0.5, 0.85)]],
        "U": [[(0.25, 0.15), *_arc(0.5, 0.6, 0.25, 0.25, 180, 0), (0.75, 0.15)]],
        "V": [[(0.2, 0.15), (0.5, 0.85), (0.8, 0.15)]],
        "W": [[(0.15, 0.15), (0.32, 0.85), (0.5, 0.4), (0.68, 0.85), (0.85, 0.15)]],
        "X": [[(0.25, 0.15), (0.75, 0.85)], [(0.75, 0.15), (0.25, 0.85)]],
        "Y": [[(0.2, 0.15), (0.5, 0.5), (0.8, 0.15)], [(0.5, 0.5), (0.5, 0.85)]],
        "Z": [[(0.25, 0.15), (0.75, 0.15), (0.25, 0.85), (0.75, 0.85)]],
        "2": [[*_arc(0.5, 0.35, 0.22, 0.2, 200, 360), (0.25, 0.85), (0.75, 0.85)]],
        "3": [[*_arc(0.5, 0.32, 0.2, 0.17, 200, 450), *_arc(0.5, 0.67, 0.23, 0.18, 270, 520)]],
        "4": [[(0.6, 0.85), (0.6, 0.15), (0.2, 0.65), (0.8, 0.65)]],
        "5": [[(0.72, 0.15), (0.32, 0.15), (0.3, 0.48), *_arc(0.5, 0.64, 0.24, 0.21, 220, 500)]],
        "6": [[(0.68, 0.15), (0.42, 0.32), (0.28, 0.6)], _arc(0.5, 0.64, 0.22, 0.21, 0, 360)],
        "7": [[(0.25, 0.15), (0.75, 0.15), (0.4, 0.85)]],
        "8": [_arc(0.5, 0.32, 0.18, 0.17, 0, 360), _arc(0.5, 0.67, 0.22, 0.18, 0, 360)],
        "9": [_arc(0.5, 0.36, 0.22, 0.21, 0, 360), [(0.72, 0.38), (0.62, 0.65), (0.35, 0.85)]],
    }
    return {k: tuple(tuple(s) for s in v) for k, v in font.items()}


STROKE_FONT = _stroke_font()


def _polyline_wobble(points: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Resample a polyline densely and bend it with a smooth random offset, as a hand would."""
    seg = np.hypot(*np.diff(points, axis=0).T)
    length = float(seg.sum())
    if length <= 0:
        return points
    n = max(8, int(length * 40))
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, length, n)
    dense = np.stack([np.interp(t, s, points[:, 0]), np.interp(t, s, points[:, 1])], axis=1)
    # A few low-frequency sines per axis: a smooth wobble whose size does not depend on n.
    u = t / max(length, 1e-6)
    for axis in range(2):
        for freq in (1, 2, 3):
            dense[:, axis] += amount / freq * rng.normal() * np.sin(np.pi * freq * u + rng.uniform(0, np.pi))
    return dense


def symbol_ink(
    strokes: Sequence[Sequence[Point]],
    rng: np.random.Generator,
    size: int = FRAME_SIZE,
    jitter: float = 1.0,
    stroke_width: float = 0.05,
) -> np.ndarray:
    """One hand-drawn instance of a symbol as ink coverage: size x size uint8, 255 = full ink."""
    angle = rng.normal(0.0, 0.10) * jitter
    scale = 0.78 * (1 + rng.normal(0.0, 0.06) * jitter)
    shear = rng.normal(0.0, 0.10) * jitter
    lin = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    lin = lin @ np.array([[1.0, shear], [0.0, 1.0]])
    shift = rng.normal(0.0, 0.035, 2) * jitter
    offset = np.array([0.5, 0.5]) - lin @ np.array([0.5, 0.5]) + shift
    width = max(1, round(size * stroke_width * (1 + rng.uniform(-0.3, 0.3) * jitter)))

    ink = np.zeros((size, size), np.uint8)
    shift_bits = 4  # sub-pixel positions, so small jitter is not lost to rounding
    for stroke in strokes:
        pts = np.asarray(stroke, dtype=np.float64)
        # The hand misses each corner a little (a curve moves as a whole, so that it stays smooth).
        miss = pts.shape if len(pts) <= 6 else (1, 2)
        pts = pts + rng.normal(0.0, 0.015 * jitter, miss)
        pts = _polyline_wobble(pts, rng, 0.012 * jitter)
        pts = pts @ lin.T + offset
        fixed = np.round(pts * size * (1 << shift_bits)).astype(np.int32)
        cv2.polylines(ink, [fixed], False, 255, width, cv2.LINE_AA, shift_bits)
    return ink


def render_symbol(
    strokes: Sequence[Sequence[Point]],
    rng: np.random.Generator,
    size: int = FRAME_SIZE,
    jitter: float = 1.0,
    stroke_width: float = 0.05,
) -> np.ndarray:
    """One hand-drawn-looking instance of a symbol: HxWx3 uint8 BGR, dark ink on a lit white card,
    filmed close up (what INT8 calibration renders; dmf-demo films `symbol_ink` through
    dmf_deploy.camera_sim instead)."""
    ink = symbol_ink(strokes, rng, size, jitter, stroke_width)
    # The card: white (a well-exposed camera saturates paper, as Omniglot's scans are white) with a
    # slight vignette; dark-grey ink; camera blur and sensor noise. The paper stays white: 0.2's demo
    # model only ever saw white backgrounds (benchmarks/README.md, "The demo's symbols"), and INT8
    # calibration keeps rendering these close-ups.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    paper = 255 - rng.uniform(0, 24) * (xx * xx + yy * yy)
    ink_level = rng.uniform(10, 60)
    alpha = ink.astype(np.float32) / 255
    image = paper * (1 - alpha) + ink_level * alpha
    image = cv2.GaussianBlur(image, (0, 0), 0.2 + 0.5 * rng.uniform() * jitter)
    image = image + rng.normal(0.0, 4.0, image.shape)
    grey = np.clip(image, 0, 255).astype(np.uint8)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
