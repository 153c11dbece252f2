"""Find the drawing in a camera frame, and redraw it as dark ink on white, framed as in training.

A webcam sees a card somewhere in the frame, smaller than the frame, on grey paper under uneven,
tinted light. The model was trained on black-on-white scans whose character fills about two thirds of
the image. This module is the `locate="drawing"` rule of `PreprocessConfig`:

1. Ink is what is darker than the paper around it. A morphological closing with a square wider than a
   stroke removes the strokes and leaves the local paper brightness; ink contrast is
   (paper - pixel) / paper, which no paper grey, light gradient, vignette or colour cast changes.
   The closing leaves the straight edges of large shapes (the card, a desk) unchanged, so only thin
   dark things respond.
2. The strongest cluster of ink, weighted by how bright the paper under it is, is the drawing
   (clutter around the card is rarely on the brightest surface).
3. A square around the cluster, its side the drawing's larger side / DRAWING_FILL, is redrawn:
   ink contrast over the drawing's own ink level, so that ink is black and paper white; contrast at
   the level of paper texture and noise is cut to white.

A frame with no drawing gives a white image, which the open-set rule's contrast gate refuses. Besides
a frame with no ink at all (blank paper, a dark or uniform frame), that is a frame whose strongest
cluster is not ink on paper: on a coloured surface (skin, a desk; paper is white or grey), on a surface
much darker than the brightest in the frame (a pen on the desk beside the card), or too small to be a
drawing once framed (a speck, the edge of a card).

Searching runs on a copy whose short side is SEARCH_SIDE pixels, so the cost does not depend on the
camera's resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

SEARCH_SIDE = 160  # short side of the frame while searching for ink
# Closing square, as a fraction of the searched short side (11 px at 160): wider than a stroke. Large
# frames shrink by a whole factor, so their searched side lies between 160 and 320 pixels.
STROKE_KERNEL = 0.07
MIN_INK = 0.12  # ink contrast below this is paper texture, sensor noise or shading
# A frame whose strongest ink is fainter than this holds no drawing. Pen on paper under a webcam
# measures 0.49 at the 1st percentile (the simulator's ranges: ink 20-80 on paper 180-240, every
# factor on); empty scenes (a blank card, a desk, a hand, a dark room) 0.30-0.39 at the median. A
# light pencil line (40% darker than its paper or less) is therefore not a drawing to this rule.
MIN_DRAWING_INK = 0.4
INK_SHARE = 0.35  # of the strongest ink's contrast: fainter pixels are not ink
DRAWING_FILL = 0.65  # the drawing's larger side over the output's side (Omniglot's median)
REDRAW_SCALE = 2  # the crop is redrawn at this multiple of the output size, then averaged down
REDRAW_KERNEL = 0.1  # closing square while redrawing, as a fraction of the crop's side
CARD_SHARE = 0.7  # the card: pixels at least this bright, relative to the paper under the drawing
CARD_FILL = 0.8  # the card region must fill this share of its minimum-area rectangle to set the angle
PAPER_SHARE = 0.8  # ink counts only on paper at least this bright, relative to the drawing's own
PAPER_FLOOR = 48.0  # grey level: darker "paper" is not paper (a dark room has no ink on it)
# The gates below were chosen on the validation alphabet's simulated webcam frames (every factor on)
# against empty scenes (benchmarks/camera.py); each refuses under 1% of real drawings.
# Paper is white or grey: the chroma ((max - min) / max of the median B, G, R) of the paper between
# and beside the strokes is at most 0.14 for 99% of drawings under a 7% colour cast; a hand measures
# 0.23 or more for 95% of frames. A drawing on coloured paper (a yellow sticky note) is therefore not
# a drawing to this rule.
MAX_PAPER_CHROMA = 0.25
PAPER_SAMPLES = 512  # pixels of paper whose median colour is measured
MIN_PAPER_RANK = 0.8  # the drawing's paper against the frame's brightest (its 95th percentile)
# Share of the framed view darker than mid-grey: characters 0.029 at the 1st percentile, long thin pen
# lines 0.021; noise or a card's edge taken for ink, mostly less.
MIN_VIEW_INK = 0.02


@dataclass(frozen=True)
class DrawingBox:
    """The drawing's box in frame pixels: its centre, its size along the card's axes, and the card's
    rotation in degrees (0: the card upright; the drawing is upright on its card)."""

    cx: float
    cy: float
    width: float
    height: float
    angle: float = 0.0

    @property
    def side(self) -> float:
        return max(self.width, self.height)


def _square(side: int) -> np.ndarray:
    # A square rather than a disc: OpenCV runs it as two fast 1-D passes, and strokes go either way.
    side = max(3, side | 1)
    return np.ones((side, side), np.uint8)


def _quantiles(values: np.ndarray, *qs: float) -> list[float]:
    flat = values.ravel()
    ks = [min(len(flat) - 1, int(q * len(flat))) for q in qs]
    part = np.partition(flat, ks)
    return [float(part[k]) for k in ks]


def _median(values: np.ndarray) -> float:
    """np.median of a 1-D array, by one partition (np.median's own overhead is most of its cost here)."""
    half = len(values) // 2
    if len(values) % 2:
        return float(np.partition(values, half)[half])
    part = np.partition(values, (half - 1, half))
    return (float(part[half - 1]) + float(part[half])) / 2


def _block_means(image: np.ndarray, factor: int) -> np.ndarray:
    """The mean of each factor x factor block of an image whose sides are multiples of `factor`:
    INTER_AREA's pixels. At odd factors a box filter read at every factor-th pixel gives them exactly
    (an odd block's mean has no ties to round) at about half INTER_AREA's cost; at even factors it
    would round ties differently, and cost more."""
    h, w = image.shape[:2]
    if factor % 2 == 0:
        return cv2.resize(image, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    means = cv2.boxFilter(image, -1, (factor, factor), anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(means[::factor, ::factor])


def _shrink(image: np.ndarray) -> tuple[np.ndarray, float]:
    """A copy whose short side is about SEARCH_SIDE, and the scale from frame to copy. Large frames
    shrink by a whole factor (edge rows cut to a multiple of it): an area average.
    HxW or HxWx3."""
    h, w = image.shape[:2]
    factor = min(h, w) // SEARCH_SIDE
    if factor >= 2:
        return _block_means(image[: h - h % factor, : w - w % factor], factor), 1.0 / factor
    # A small frame is enlarged to SEARCH_SIDE, but a long thin one no further than 4 x SEARCH_SIDE
    # along its long side: a 2 x 30000 strip must not become 160 x 2,400,000 pixels.
    scale = min(SEARCH_SIDE / min(h, w), 4 * SEARCH_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR), scale


def ink_contrast(grey: np.ndarray, kernel_side: int) -> tuple[np.ndarray, np.ndarray]:
    """(contrast, paper): (paper - pixel) / paper in [0, 1], and the paper brightness, float32."""
    paper = cv2.morphologyEx(grey, cv2.MORPH_CLOSE, _square(kernel_side)).astype(np.float32)
    contrast = (paper - grey.astype(np.float32)) / np.maximum(paper, PAPER_FLOOR)
    return contrast, paper


def find_drawing(frame: np.ndarray) -> DrawingBox | None:
    """The drawing's box in a uint8 frame of any size, BGR or grey, or None when it holds no drawing.
    (A grey frame has no colour to check: its paper counts as grey.)"""
    if frame.ndim == 3:
        return _find(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), frame)
    return _find(frame, None)


def _find(grey: np.ndarray, colour: np.ndarray | None) -> DrawingBox | None:
    """`find_drawing` of a frame given as its grey copy and, where it has one, its colour."""
    small, scale = _shrink(grey)
    kernel = round(STROKE_KERNEL * min(small.shape))
    contrast, paper = ink_contrast(small, kernel)
    strongest = float(contrast.max(initial=0.0))
    if strongest < MIN_DRAWING_INK:
        return None
    ink = (contrast >= max(MIN_INK, INK_SHARE * strongest)).astype(np.uint8)
    # Strokes of one drawing lie within a kernel's width of each other: merge them into clusters.
    merged = cv2.dilate(ink, _square(kernel))
    count, labels = cv2.connectedComponents(merged, connectivity=8)
    if count < 2:
        return None
    brightest = max(_quantiles(paper, 0.95)[0], PAPER_FLOOR)
    # Each cluster's score: its ink's contrast, weighted by how bright the paper under it is.
    at_ink = np.flatnonzero(ink)
    ink_labels = labels.ravel()[at_ink]
    weight = contrast.ravel()[at_ink] * (paper.ravel()[at_ink] / brightest) ** 2
    score = np.bincount(ink_labels, weights=weight, minlength=count)
    score[0] = 0.0
    best = int(score.argmax())
    # The rest looks only inside the chosen cluster's bounding box: its ink's, widened by the merging.
    rows, cols = np.divmod(at_ink[ink_labels == best], small.shape[1])
    reach = _square(kernel).shape[0] // 2
    top, left = max(0, int(rows.min()) - reach), max(0, int(cols.min()) - reach)
    window = np.s_[top : int(rows.max()) + reach + 1, left : int(cols.max()) + reach + 1]
    in_cluster, ink_w, paper_w = labels[window] == best, ink[window] > 0, paper[window]
    chosen = in_cluster & ink_w
    # Clutter next to the card can join the drawing's cluster; it lies on a darker surface than the
    # drawing's paper, so ink on paper much darker than the cluster's typical paper is left out.
    typical = _median(paper_w[chosen])
    ys, xs = np.nonzero(chosen & (paper_w >= PAPER_SHARE * typical))
    # The paper is what lies between and beside the strokes (under a stroke wider than the closing
    # square, the paper map is the stroke's own grey).
    around = in_cluster & ~ink_w
    if len(xs) == 0 or not around.any():
        return None
    if _median(paper_w[around]) < MIN_PAPER_RANK * brightest:
        return None
    if colour is not None and _chroma(_pixels_at(colour, around, (top, left), scale)) > MAX_PAPER_CHROMA:
        return None
    xs, ys = xs + left, ys + top
    card = small >= CARD_SHARE * typical
    card[window] |= chosen
    angle = card_angle(card, xs, ys)
    # The box along the card's axes: ink coordinates turned back by the card's rotation.
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    u = (xs + 0.5 - cx) * c + (ys + 0.5 - cy) * s
    v = -(xs + 0.5 - cx) * s + (ys + 0.5 - cy) * c
    mu, mv = (u.min() + u.max()) / 2, (v.min() + v.max()) / 2
    centre_x, centre_y = cx + mu * c - mv * s, cy + mu * s + mv * c
    width, height = u.max() - u.min() + 1, v.max() - v.min() + 1
    return DrawingBox(centre_x / scale, centre_y / scale, width / scale, height / scale, angle)


def _pixels_at(frame: np.ndarray, mask: np.ndarray, origin: tuple[int, int], scale: float) -> np.ndarray:
    """The frame's pixels under `mask`, a window of the searched copy whose top-left cell is `origin`
    (row, column): one pixel at each masked cell's centre, the cells read on a grid spaced so that
    about PAPER_SAMPLES at most are read. A sample: cheaper than shrinking the whole colour frame, and a
    median needs no more."""
    step = max(1, math.ceil(math.sqrt(np.count_nonzero(mask) / PAPER_SAMPLES)))
    ys, xs = np.nonzero(mask[::step, ::step])
    ys, xs = ys * step + origin[0], xs * step + origin[1]
    h, w = frame.shape[:2]
    rows = np.minimum(((ys + 0.5) / scale).astype(np.intp), h - 1)
    cols = np.minimum(((xs + 0.5) / scale).astype(np.intp), w - 1)
    return frame[rows, cols]


def _chroma(pixels: np.ndarray) -> float:
    """(max - min) / max of the median B, G, R of N x 3 pixels: 0 for grey."""
    b, g, r = np.median(pixels.astype(np.float32), axis=0)
    return float((max(b, g, r) - min(b, g, r)) / max(b, g, r, 1.0))


def card_angle(card: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> float:
    """The rotation (degrees, -45..45) of the card the ink at (xs, ys) lies on: the minimum-area
    rectangle of the region of `card` (a mask of the frame as searched: the bright paper and the ink on
    it) that holds the most of that ink. 0 when the
    card is not seen whole (it touches the frame's edge, so the frame's edge would set the angle) or
    is not rectangular enough to trust. (Not the closing's paper map: the closing fills the narrow
    dark wedges at a turned card's corners and squares the card up.)"""
    # (connectedComponents and one contour: connectedComponentsWithStats costs several times more.)
    count, labels = cv2.connectedComponents(card.astype(np.uint8), connectivity=8)
    holding = np.bincount(labels[ys, xs], minlength=count)
    holding[0] = 0
    if count < 2 or holding.max() == 0:
        return 0.0
    region = (labels == int(holding.argmax())).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    left, top, width, height = cv2.boundingRect(np.concatenate(contours))
    h, w = card.shape
    if left == 0 or top == 0 or left + width >= w or top + height >= h:
        return 0.0
    area = np.count_nonzero(region)
    (_, _), (rw, rh), angle = cv2.minAreaRect(max(contours, key=cv2.contourArea))
    if rw * rh <= 0 or area / (rw * rh) < CARD_FILL:
        return 0.0
    return float((angle + 45.0) % 90.0 - 45.0)


def view_matrix(box: DrawingBox, size: int) -> np.ndarray:
    """2x3 affine: view pixel (x, y, 1) of the size x size redrawn image -> frame pixel. The view is
    the square of side box.side / DRAWING_FILL around the drawing, turned with its card."""
    k = max(box.side / DRAWING_FILL, 4.0) / size  # frame pixels per view pixel
    c, s = math.cos(math.radians(box.angle)), math.sin(math.radians(box.angle))
    half = (size - 1) / 2
    # frame = centre + R @ (k * (view - half)), pixel centres at integers on both sides.
    return np.array(
        [
            [k * c, -k * s, box.cx - 0.5 - k * (c * half - s * half)],
            [k * s, k * c, box.cy - 0.5 - k * (s * half + c * half)],
        ],
        np.float64,
    )


def drawing_view_matrix(bgr: np.ndarray, size: int) -> np.ndarray | None:
    """`view_matrix` of the drawing `locate_drawing` finds in a BGR frame; None: no drawing."""
    box, _ = framed_drawing(bgr, size)
    return None if box is None else view_matrix(box, size)


def redraw(grey: np.ndarray, box: DrawingBox | None, size: int) -> np.ndarray:
    """size x size uint8: the square around `box`, ink black on white; all white for no box."""
    if box is None:
        return np.full((size, size), 255, np.uint8)
    side_out = size * REDRAW_SCALE
    matrix = view_matrix(box, side_out)
    k = math.hypot(matrix[0, 0], matrix[1, 0])  # frame pixels per crop pixel
    h, w = grey.shape
    factor = min(int(k), h // 2, w // 2)  # never to less than 2 x 2 pixels
    if factor >= 2:  # shrink by a whole factor first: an area average, as a camera's optics would
        # Only the part of the frame the square reads, in whole blocks of the shrink, with a margin.
        top, left, bottom, right = _reach(matrix, side_out, factor, (h - h % factor, w - w % factor))
        grey = _block_means(grey[top:bottom, left:right], factor)
        matrix = matrix.copy()
        matrix[:, 2] -= (left, top)
        matrix = matrix / factor
        matrix[:, 2] += (1 - factor) / (2 * factor)  # pixel centres of the shrunk frame
    # The square may reach past the frame: the frame's edge pixels repeat there.
    crop = cv2.warpAffine(
        grey,
        matrix,
        (side_out, side_out),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    contrast, _ = ink_contrast(crop, round(REDRAW_KERNEL * side_out))
    # Ink level: the strongest 1% of the crop. Paper texture and sensor noise sit below twice the
    # upper quartile (strokes cover well under a quarter of the crop): that much is cut to white.
    quartile, level = _quantiles(contrast, 0.75, 0.99)
    level = max(level, MIN_INK)
    floor = min(2.0 * max(quartile, 0.0) + 0.02, level / 2)
    white = 255.0 * (1.0 - np.clip((contrast - floor) / (level - floor), 0.0, 1.0))
    return cv2.resize(white, (size, size), interpolation=cv2.INTER_AREA).round().astype(np.uint8)


def _reach(matrix: np.ndarray, side: int, block: int, bounds: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right): the frame pixels that a side x side view through `matrix` (view ->
    frame) reads by linear interpolation, widened by two blocks, on multiples of `block`, within
    `bounds` (height, width; multiples of `block`). Where the view reaches past the frame, the frame's
    edge stays the window's edge, so that edge pixels repeat as they would have."""
    ends = (-0.5, side - 0.5)
    corners = matrix @ np.array([[x, y, 1.0] for x in ends for y in ends]).T
    (x_min, y_min), (x_max, y_max) = corners.min(axis=1), corners.max(axis=1)
    margin = 2 * block
    height, width = bounds

    def span(low: float, high: float, limit: int) -> tuple[int, int]:
        start = min(max(0, math.floor(low) - margin) // block * block, limit - block)
        stop = max(min(limit, -(-(math.ceil(high) + margin) // block) * block), start + block)
        return start, stop

    top, bottom = span(y_min, y_max, height)
    left, right = span(x_min, x_max, width)
    return top, left, bottom, right


def framed_drawing(bgr: np.ndarray, size: int) -> tuple[DrawingBox | None, np.ndarray]:
    """The drawing's box in a checked HxWx3 BGR frame and its size x size grey view; (None, white)
    when there is no drawing, or what was found is too small a share of its view to be one."""
    factor = _enlargement(bgr.shape)
    if factor > 1:
        bgr = cv2.resize(bgr, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    box = _find(grey, bgr)
    white = redraw(grey, box, size)
    if box is None or np.count_nonzero(white < 128) < MIN_VIEW_INK * white.size:
        return None, np.full_like(white, 255)
    scale = 1.0 / factor  # the box back in the frame's pixels
    return DrawingBox(box.cx * scale, box.cy * scale, box.width * scale, box.height * scale, box.angle), white


def _enlargement(shape: tuple[int, ...]) -> int:
    """Whole factor that brings a frame with a short side under SEARCH_SIDE (a scan, a thumbnail) to
    twice that: its drawing is then redrawn from a smooth enlargement, as from a webcam's card, rather
    than pixel for pixel (Greek 20-way 1-shot error on 105 px scans: 9.55% as they are, 8.78% so)."""
    short, long = sorted(shape[:2])
    if short >= SEARCH_SIDE:
        return 1
    # No long side past 8 x SEARCH_SIDE: a 2 x 30000 strip must not become 320 x 4,800,000 pixels.
    return max(1, min(math.ceil(2 * SEARCH_SIDE / short), 8 * SEARCH_SIDE // long))


def locate_drawing(bgr: np.ndarray, size: int) -> np.ndarray:
    """A checked HxWx3 BGR frame -> size x size x 3 BGR: the drawing, black on white, centred."""
    return cv2.cvtColor(framed_drawing(bgr, size)[1], cv2.COLOR_GRAY2BGR)
