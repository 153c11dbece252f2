"""Simulated webcam frames of a drawing on a card: what `dmf-run --camera 0` actually sees.

A drawing (dark strokes on a light background, e.g. an Omniglot character or a dmf-demo symbol) is put
on a sheet of paper held in front of a camera. Each factor of a real webcam is switchable, so that a
benchmark can measure them one at a time and training can draw them all:

- ink: the paper is grey (180..240) and the ink not black (20..80), as under room light;
- tone: contrast and gamma of the camera's response;
- cast: a colour cast, each channel's gain within +-7%;
- light: a light gradient across the frame and a vignette;
- defocus, motion: Gaussian defocus and a linear motion blur;
- noise: sensor noise; jpeg: MJPEG compression at quality 75;
- scale: the card 30..100% of the frame height; offset: anywhere in the frame;
- rotation: +-15 degrees; perspective: the card tilted towards or away from the camera;
- background: a textured, coloured surface around the card (off: the paper fills the frame).

Torch-free (numpy and OpenCV), so that training, the benchmark, the tests and `dmf-demo`'s video
share one simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import cv2
import numpy as np

FRAME_SIZE = (640, 480)  # (width, height) of a webcam's default mode

FACTORS = (
    "ink",
    "tone",
    "cast",
    "light",
    "defocus",
    "motion",
    "noise",
    "jpeg",
    "scale",
    "offset",
    "rotation",
    "perspective",
    "background",
)


@dataclass(frozen=True)
class CameraConditions:
    """Which factors are on, and their ranges. Lengths are fractions of the frame height, so that one
    setting means the same at 640x480 and at a smaller training frame."""

    ink: bool = True
    paper_range: tuple[float, float] = (180.0, 240.0)  # grey level of the lit paper
    ink_range: tuple[float, float] = (20.0, 80.0)  # grey level of the ink
    tone: bool = True
    contrast_range: tuple[float, float] = (0.7, 1.0)  # scales the frame about its mean grey
    gamma_range: tuple[float, float] = (0.7, 1.4)
    cast: bool = True
    cast_max: float = 0.07  # each channel's gain within 1 +- cast_max
    light: bool = True
    gradient_max: float = 0.4  # darkest side of the gradient at 1 - gradient_max of the brightest
    vignette_max: float = 0.3  # corners at 1 - vignette_max of the centre
    defocus: bool = True
    defocus_max: float = 0.005  # Gaussian sigma, up to 2.4 px at 480 lines
    motion: bool = True
    motion_max: float = 0.02  # blur length, up to 9.6 px at 480 lines
    noise: bool = True
    noise_range: tuple[float, float] = (2.0, 6.0)  # grey levels, standard deviation
    jpeg: bool = True
    jpeg_quality: int = 75
    scale: bool = True
    scale_range: tuple[float, float] = (0.3, 1.0)  # card side over frame height
    offset: bool = True
    rotation: bool = True
    rotation_max: float = 15.0  # degrees
    perspective: bool = True
    perspective_max: float = 0.08  # each corner moves up to this fraction of the card side
    background: bool = True

    @classmethod
    def clean(cls) -> CameraConditions:
        """Every factor off: the drawing, black on white, filling the frame's height, centred."""
        return cls(**{name: False for name in FACTORS})

    @classmethod
    def only(cls, *names: str) -> CameraConditions:
        """Clean, with the named factors on."""
        unknown = set(names) - set(FACTORS)
        if unknown:
            raise ValueError(f"unknown camera factors {sorted(unknown)}; choose from {', '.join(FACTORS)}")
        return replace(cls.clean(), **{name: True for name in names})

    def active(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if f.name in FACTORS and getattr(self, f.name))


def _grey_levels(drawing: np.ndarray) -> np.ndarray:
    """HxW(x3) uint8, dark strokes on light -> ink amount in [0, 1] (1 = full ink), float32."""
    grey = cv2.cvtColor(drawing, cv2.COLOR_BGR2GRAY) if drawing.ndim == 3 else drawing
    return (255.0 - grey.astype(np.float32)) / 255.0


def _card_corners(cond: CameraConditions, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """The card's four corners in the frame (top-left, top-right, bottom-right, bottom-left), float32."""
    side = height * (rng.uniform(*cond.scale_range) if cond.scale else 1.0)
    half = side / 2
    square = np.array([[-half, -half], [half, -half], [half, half], [-half, half]], np.float64)
    if cond.perspective:
        square = square + rng.uniform(-1, 1, size=(4, 2)) * cond.perspective_max * side
    if cond.rotation:
        angle = math.radians(rng.uniform(-cond.rotation_max, cond.rotation_max))
        c, s = math.cos(angle), math.sin(angle)
        square = square @ np.array([[c, s], [-s, c]])
    centre = np.array([width / 2, height / 2])
    if cond.offset:
        # Anywhere that keeps the card's outline in view where it fits (a user holds it where the
        # screen shows it); a card as large as the frame on an axis stays centred on that axis.
        room = np.maximum(np.array([width, height]) / 2 - np.abs(square).max(axis=0), 0)
        centre = centre + rng.uniform(-1, 1, size=2) * room
    return (square + centre).astype(np.float32)


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A surface behind the card: a coloured, shaded, textured desk or wall with a few objects on it.
    Drawn on a 1/4 grid (HxWx3 float32) and resized: a background is out of focus anyway."""
    gw, gh = max(2, width // 4), max(2, height // 4)
    colour = rng.uniform(25, 170) * rng.uniform(0.75, 1.25, size=3)
    coarse = rng.normal(0, 1, size=(6, 8, 3)).astype(np.float32) * rng.uniform(5, 25)
    surface = colour.astype(np.float32) + cv2.resize(coarse, (gw, gh), interpolation=cv2.INTER_CUBIC)
    surface += rng.normal(0, rng.uniform(2, 10), size=(gh, gw, 1)).astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):  # a few objects: pens, a mug, a keyboard edge
        x0, x1 = sorted(rng.uniform(0, gw, size=2))
        y0, y1 = sorted(rng.uniform(0, gh, size=2))
        cv2.rectangle(
            surface, (int(x0), int(y0)), (int(x1), int(y1)), rng.uniform(0, 200, size=3).tolist(), -1
        )
    return cv2.resize(np.clip(surface, 0, 255), (width, height), interpolation=cv2.INTER_LINEAR)


def render_card_frame(
    drawing: np.ndarray,
    rng: np.random.Generator,
    cond: CameraConditions | None = None,
    size: tuple[int, int] = FRAME_SIZE,
) -> np.ndarray:
    """One simulated webcam frame (size = (width, height), BGR uint8) of `drawing` on a card.

    `drawing` is HxW or HxWx3 uint8 with dark strokes on a light background; its whole image becomes
    the card (so a drawing's own margin is the card's margin)."""
    cond = cond or CameraConditions()
    width, height = size
    ink = _grey_levels(drawing)
    paper = rng.uniform(*cond.paper_range) if cond.ink else 255.0
    ink_level = rng.uniform(*cond.ink_range) if cond.ink else 0.0
    card = (paper - ink * (paper - ink_level)).astype(np.float32)

    corners = _card_corners(cond, width, height, rng)
    h, w = card.shape
    source = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    homography = cv2.getPerspectiveTransform(source, corners)
    frame = cv2.warpPerspective(card, homography, size, flags=cv2.INTER_LINEAR, borderValue=paper)
    frame = cv2.merge([frame, frame, frame])
    if cond.background:
        mask = cv2.warpPerspective(np.ones_like(card), homography, size, flags=cv2.INTER_LINEAR)
        surface = _background(width, height, rng)
        frame = surface + cv2.merge([mask, mask, mask]) * (frame - surface)

    return camera_response(frame, rng, cond)


def camera_response(scene: np.ndarray, rng: np.random.Generator, cond: CameraConditions) -> np.ndarray:
    """What the camera makes of a lit scene (HxWx3 float32 or uint8, BGR): light, colour cast, tone
    curve, defocus, motion blur, sensor noise and JPEG, each as `cond` switches them. uint8 BGR out."""
    height, width = scene.shape[:2]
    frame = scene.astype(np.float32)
    gain = np.ones(3, np.float32)
    if cond.cast:
        gain = rng.uniform(1 - cond.cast_max, 1 + cond.cast_max, size=3).astype(np.float32)
    if cond.light:
        shade = _shading(cond, width, height, rng)
        frame = frame * cv2.merge([shade * gain[0], shade * gain[1], shade * gain[2]])
    elif cond.cast:
        frame = frame * gain
    out = np.clip(frame, 0, 255).astype(np.uint8)
    if cond.tone:
        out = cv2.LUT(out, _tone_table(float(out.mean()), cond, rng))
    if cond.defocus:
        sigma = rng.uniform(0, cond.defocus_max) * height
        if sigma > 0.3:
            out = cv2.GaussianBlur(out, (0, 0), sigma)
    if cond.motion:
        length = rng.uniform(0, cond.motion_max) * height
        if length >= 1.5:
            out = _motion_blur(out, length, rng.uniform(0, 180))
    if cond.noise:
        out = _add_noise(out, rng.uniform(*cond.noise_range), rng)
    if cond.jpeg:
        ok, data = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, cond.jpeg_quality])
        if ok:
            out = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return out


def _shading(cond: CameraConditions, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Light over the frame (1 = full): a linear gradient in a random direction times a vignette.
    Smooth, so it is computed on a 1/8 grid and resized."""
    gw, gh = max(2, width // 8), max(2, height // 8)
    ys, xs = np.mgrid[0:gh, 0:gw].astype(np.float32)
    xs, ys = (xs + 0.5) / gw - 0.5, (ys + 0.5) / gh - 0.5  # -0.5 .. 0.5 across the frame
    angle = rng.uniform(0, 2 * math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    along /= max(float(np.abs(along).max()), 1e-6)  # -1 .. 1
    gradient = 1 - rng.uniform(0, cond.gradient_max) * (1 - along) / 2
    vignette = 1 - rng.uniform(0, cond.vignette_max) * (xs**2 + ys**2) / 0.5
    return cv2.resize(gradient * vignette, (width, height), interpolation=cv2.INTER_LINEAR)


def _tone_table(mean: float, cond: CameraConditions, rng: np.random.Generator) -> np.ndarray:
    """A 256-entry table: contrast scaled about the frame's mean grey, then a gamma curve."""
    levels = np.arange(256, dtype=np.float32)
    levels = mean + (levels - mean) * rng.uniform(*cond.contrast_range)
    levels = 255.0 * (np.clip(levels, 0, 255) / 255.0) ** rng.uniform(*cond.gamma_range)
    return np.clip(np.rint(levels), 0, 255).astype(np.uint8)


_NOISE_BANK: dict[tuple[int, ...], np.ndarray] = {}


def _add_noise(out: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian sensor noise of `sigma` grey levels: a random window of a fixed bank of standard normal
    samples twice the frame's size (drawing fresh normals for every frame would cost more than the
    rest of the simulation)."""
    h, w, c = out.shape
    bank = _NOISE_BANK.get(out.shape)
    if bank is None:
        bank = np.random.default_rng(0).standard_normal((2 * h, 2 * w, c), dtype=np.float32)
        _NOISE_BANK[out.shape] = bank
    top, left = int(rng.integers(0, h)), int(rng.integers(0, w))
    noisy = out.astype(np.float32) + bank[top : top + h, left : left + w] * np.float32(sigma)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _motion_blur(frame: np.ndarray, length: float, degrees: float) -> np.ndarray:
    side = int(math.ceil(length)) | 1
    kernel = np.zeros((side, side), np.float32)
    centre = side // 2
    dx, dy = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    half = length / 2
    cv2.line(
        kernel,
        (int(round(centre - dx * half)), int(round(centre - dy * half))),
        (int(round(centre + dx * half)), int(round(centre + dy * half))),
        1.0,
        1,
    )
    return cv2.filter2D(frame, -1, kernel / max(kernel.sum(), 1e-6))


EMPTY_SCENES = ("blank card", "no card", "dark", "hand")


def render_empty_scene(
    kind: str,
    rng: np.random.Generator,
    cond: CameraConditions | None = None,
    size: tuple[int, int] = FRAME_SIZE,
) -> np.ndarray:
    """A frame with nothing to recognise, under the same camera: a blank card, the background alone,
    a dark room (the lens covered, the light off), or a hand in front of the camera."""
    cond = cond or CameraConditions()
    width, height = size
    if kind == "blank card":
        return render_card_frame(np.full((105, 105), 255, np.uint8), rng, cond, size)
    if kind == "dark":
        scene = render_card_frame(np.full((105, 105), 255, np.uint8), rng, CameraConditions.clean(), size)
        return camera_response(scene.astype(np.float32) * rng.uniform(0.01, 0.08), rng, cond)
    # The surface behind the card alone, or with a hand in front of it.
    scene = _background(width, height, rng)
    if kind == "no card":
        return camera_response(scene, rng, cond)
    if kind == "hand":
        skin = (np.array([120, 150, 200]) * rng.uniform(0.7, 1.2)).tolist()
        cx, cy = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.5, 0.8)
        u = height / 480 * rng.uniform(0.8, 1.3)
        tilt = rng.uniform(-25, 25)

        def blob(x: float, y: float, half_w: float, half_h: float, angle: float) -> None:
            centre = (int(cx + x * u), int(cy + y * u))
            cv2.ellipse(scene, centre, (int(half_w * u), int(half_h * u)), angle + tilt, 0, 360, skin, -1)

        blob(0, 0, 110, 150, 0)  # palm
        for i in range(4):
            blob(-80 + 50 * i, -160, 22, 80, -10 + 7 * i)  # fingers
        blob(130, -30, 20, 70, 40)  # thumb
        return camera_response(scene, rng, cond)
    raise ValueError(f"unknown scene {kind!r}; choose one of {', '.join(EMPTY_SCENES)}")
