"""Procedural glyphs: unlimited, deterministic few-shot classes drawn with cv2 (no torch).

A class is a few random strokes (lines, arcs, polylines, circles). An instance redraws them with
jitter: endpoint noise, a small random affine and a thickness change. So instances of one class look
alike and classes differ clearly. Export's parity check, tests, smoke training runs (through
`dmf_deploy.train.glyphs`) and the demo video use them because they need no download and render in
well under a millisecond.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

STROKE_KINDS = ("line", "arc", "polyline", "circle")
Color = tuple[int, int, int]
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel stroke positions, so small jitter is not lost to rounding
# Per-parameter noise for round strokes: centre and radius move like vertices; arc ends turn by
# ~4x as much (in radians), and a circle stays closed.
_NOISE_SCALE = {"arc": np.array([[1, 1], [1, 0], [4, 4]]), "circle": np.array([[1, 1], [1, 0], [0, 0]])}


@dataclass(frozen=True)
class Stroke:
    """One stroke in unit coordinates ([0, 1] square). `params` depends on the kind:
    line/polyline: vertices [n, 2]; arc/circle: [[cx, cy], [r, 0], [start, end]] (angles in radians)."""

    kind: str
    params: np.ndarray

    def points(self, rng: np.random.Generator | None, noise: float) -> np.ndarray:
        """The stroke as a polyline [n, 2]; with rng, the defining points move by ~`noise`."""
        p = self.params.copy()
        if rng is not None:
            p += rng.normal(0.0, noise, size=p.shape) * _NOISE_SCALE.get(self.kind, 1.0)
        if self.kind in ("line", "polyline"):
            return p
        (cx, cy), (r, _), (a0, a1) = p
        theta = np.linspace(a0, a1, 24)
        return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)


def _random_stroke(rng: np.random.Generator) -> Stroke:
    kind = STROKE_KINDS[rng.integers(len(STROKE_KINDS))]
    if kind == "line":
        a = rng.uniform(0.15, 0.85, 2)
        while True:  # lines shorter than a third of the box are too easy to confuse with noise
            b = rng.uniform(0.15, 0.85, 2)
            if np.hypot(*(a - b)) > 0.35:
                return Stroke(kind, np.stack([a, b]))
    if kind == "polyline":
        return Stroke(kind, rng.uniform(0.15, 0.85, (int(rng.integers(3, 6)), 2)))
    r = rng.uniform(0.12, 0.3)
    c = rng.uniform(0.15 + r, 0.85 - r, 2)
    if kind == "circle":
        return Stroke(kind, np.array([c, [r, 0.0], [0.0, 2 * np.pi]]))
    start = rng.uniform(0, 2 * np.pi)
    return Stroke(kind, np.array([c, [r, 0.0], [start, start + rng.uniform(0.6, 1.5) * np.pi]]))


@dataclass(frozen=True)
class GlyphClass:
    strokes: tuple[Stroke, ...]
    thickness: float  # in units of image_size / 84
    ink: Color


class GlyphSet:
    """`num_classes` glyph classes fixed by `seed`; `render(class_id, instance_seed)` draws one instance.

    ink=None gives every class its own dark colour (for demos); otherwise all ink is `ink`.
    `jitter` scales every instance perturbation (0 draws the clean class template every time).
    """

    def __init__(
        self,
        num_classes: int,
        seed: int = 0,
        image_size: int = 84,
        *,
        ink: Color | None = (0, 0, 0),
        paper: Color = (255, 255, 255),
        strokes: tuple[int, int] = (2, 4),
        jitter: float = 1.0,
    ) -> None:
        if num_classes < 1 or image_size < 8 or seed < 0:
            raise ValueError(
                f"need num_classes >= 1, image_size >= 8, seed >= 0; got {num_classes}, {image_size}, {seed}"
            )
        if not 1 <= strokes[0] <= strokes[1]:
            raise ValueError(f"strokes must be a (min, max) range with min >= 1, got {strokes}")
        self.num_classes = num_classes
        self.seed = seed
        self.image_size = image_size
        self.paper = tuple(int(v) for v in paper)
        self.jitter = jitter
        self.classes = [self._make_class(c, ink, strokes) for c in range(num_classes)]

    def _make_class(self, class_id: int, ink: Color | None, strokes: tuple[int, int]) -> GlyphClass:
        rng = np.random.default_rng([self.seed, class_id, 0])  # tag 0: class definitions
        count = int(rng.integers(strokes[0], strokes[1] + 1))
        shapes = tuple(_random_stroke(rng) for _ in range(count))
        thickness = float(rng.uniform(2.5, 4.5))
        own_ink = tuple(int(v) for v in rng.integers(0, 160, 3))  # always drawn: ink must not change shapes
        return GlyphClass(shapes, thickness, own_ink if ink is None else tuple(int(v) for v in ink))

    def render(self, class_id: int, instance_seed: int | None = 0) -> np.ndarray:
        """HxWx3 uint8 BGR. instance_seed=None draws the clean class template."""
        if not 0 <= class_id < self.num_classes:
            raise IndexError(f"class_id {class_id} out of range for {self.num_classes} classes")
        glyph = self.classes[class_id]
        size = self.image_size
        jitter = self.jitter
        rng = None  # no generator: the clean template
        affine = np.eye(2, 3)
        thickness = glyph.thickness
        if instance_seed is not None:
            rng = np.random.default_rng([self.seed, class_id, 1, instance_seed])  # tag 1: instances
            # Small rotation, scale, shear and shift about the centre, in unit coordinates.
            angle = rng.normal(0, 0.12) * jitter
            scale = 1 + rng.normal(0, 0.06) * jitter
            shear = rng.normal(0, 0.08) * jitter
            lin = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            lin = lin @ np.array([[1, shear], [0, 1]])
            shift = rng.normal(0, 0.03, 2) * jitter
            affine = np.concatenate([lin, (np.array([0.5, 0.5]) - lin @ [0.5, 0.5] + shift)[:, None]], axis=1)
            thickness += rng.uniform(-0.8, 0.8) * jitter
        image = np.full((size, size, 3), self.paper, dtype=np.uint8)
        width = max(1, round(thickness * size / 84))
        for stroke in glyph.strokes:
            pts = stroke.points(rng, 0.02 * jitter)
            pts = pts @ affine[:, :2].T + affine[:, 2]
            fixed = np.round(pts * size * (1 << _SHIFT)).astype(np.int32)
            cv2.polylines(image, [fixed], stroke.kind == "circle", glyph.ink, width, cv2.LINE_AA, _SHIFT)
        return image
