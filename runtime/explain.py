"""What the model aligned for one frame and one enrolled class: `Explanation` and its figures.

`Recognizer.explain(frame, name)` runs the bundle's optional explain.onnx (`dmf_deploy.explain_head`)
and returns an `Explanation`. Its coordinates are pixels of the preprocessed S x S image with pixel
centres at integers (OpenCV's convention). Feature position p = i * w + j lies at
x = (j + 0.5) * S / w - 0.5, y = (i + 0.5) * S / h - 0.5, and one feature cell of sampling offset is
S / w pixels in x (S / h in y). Tap t = 3 * (dy + 1) + (dx + 1).

`Explanation.render` draws the paper's figures side by side (Fig. 3 and the contribution map):
the query with its contribution heat map and one position in green on the left; the class's first
enrolment thumbnail (or a given support frame) on the right, with the nine points that position's taps
read in red. `draw_live` draws the same on dmf-run's window (the `e` key).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from dmf_deploy.config import PreprocessConfig
from dmf_deploy.drawing import drawing_view_matrix
from dmf_deploy.manifest import BundleError
from dmf_deploy.preprocess import Roi, check_frame, resize_box, resize_frame
from dmf_deploy.runtime.gallery import GalleryError

FIGURE_WIDTH, FIGURE_HEIGHT = 640, 384  # `render`'s image: two 300 px panels, a title and a legend
PANEL = 300
PANEL_TOP = 44
PANEL_LEFT = (13, 327)  # query, support
LIVE_THUMB = 160  # the support inset on dmf-run's video
HEAT_ALPHA = 0.5  # weight of the heat map over the image
QUERY_COLOUR = (0, 230, 0)  # BGR green (the paper's query dot)
SAMPLE_COLOUR = (0, 0, 255)  # BGR red (the paper's sampled points)
OUTLINE = (0, 0, 0)
TEXT = (235, 235, 235)
BG = (32, 32, 32)
FONT = cv2.FONT_HERSHEY_SIMPLEX


class ExplanationUnavailable(BundleError):
    """The bundle has no explain.onnx: it was exported without explanation support."""


class UnknownClassError(GalleryError):
    """The class asked about is not enrolled."""


def feature_to_pixels(cells: np.ndarray, size: int, h: int, w: int) -> np.ndarray:
    """(x, y) in feature cells [..., 2] -> (x, y) pixels of the preprocessed size x size image."""
    scale = np.array([size / w, size / h], np.float32)
    return ((cells + 0.5) * scale - 0.5).astype(np.float32)


def feature_grid(h: int, w: int) -> np.ndarray:
    """[h*w, 2]: (j, i) of every feature position p = i * w + j."""
    rows, cols = np.divmod(np.arange(h * w), w)
    return np.stack([cols, rows], axis=-1).astype(np.float32)


@dataclass(frozen=True)
class Explanation:
    """One frame against one class; see the module doc for the coordinate convention."""

    class_name: str
    preprocess: PreprocessConfig  # the frame -> S x S rule the points are in
    query_points: np.ndarray  # float32 [h*w, 2]: (x, y) of each feature position in the query
    sampled_points: np.ndarray  # float32 [h*w, 9, 2]: (x, y) in the support where each tap read
    contributions: np.ndarray  # float32 [h, w]: each position's term of the score (their mean)
    aligned: np.ndarray  # float32 [h, w]: L2 norm over channels of the aligned query feature
    thumbnail: np.ndarray | None = None  # the class's first enrolment thumbnail, BGR
    roi: Roi | None = None  # the region of the frame the recogniser sees (None: all of it)

    @classmethod
    def from_outputs(
        cls,
        class_name: str,
        preprocess: PreprocessConfig,
        outputs: dict[str, np.ndarray],
        thumbnail: np.ndarray | None = None,
        roi: Roi | None = None,
    ) -> Explanation:
        """From explain.onnx's outputs for one query and one class ([1, 1, ...] each)."""
        contributions = outputs["contributions"][0, 0].astype(np.float32)
        h, w = contributions.shape
        size = preprocess.image_size
        return cls(
            class_name,
            preprocess,
            feature_to_pixels(feature_grid(h, w), size, h, w),
            feature_to_pixels(outputs["sampling_positions"][0, 0], size, h, w),
            contributions,
            outputs["aligned"][0, 0].astype(np.float32),
            thumbnail,
            roi,
        )

    @property
    def score(self) -> float:
        """The class's score: the mean of the contributions."""
        return float(self.contributions.astype(np.float64).mean())

    @property
    def best_position(self) -> int:
        """The position that contributes most to the score."""
        return int(np.argmax(self.contributions))

    def position_at(self, x: float, y: float) -> int:
        """The feature position whose cell holds pixel (x, y) of the preprocessed image."""
        h, w = self.contributions.shape
        size = self.preprocess.image_size
        j = int(np.clip(np.floor((x + 0.5) * w / size), 0, w - 1))
        i = int(np.clip(np.floor((y + 0.5) * h / size), 0, h - 1))
        return i * w + j

    def render(
        self, frame: np.ndarray, support: np.ndarray | None = None, position: int | None = None
    ) -> np.ndarray:
        """A FIGURE_HEIGHT x FIGURE_WIDTH BGR figure: the query `frame` with its contribution heat map
        and `position` (default: the best-contributing one) in green; the class's first enrolment
        thumbnail, or `support`, with the points that position's taps read in red."""
        p = self.best_position if position is None else int(position)
        if not 0 <= p < len(self.query_points):
            raise ValueError(f"position must be in 0..{len(self.query_points) - 1}, got {position}")
        figure = np.full((FIGURE_HEIGHT, FIGURE_WIDTH, 3), BG, np.uint8)
        size = self.preprocess.image_size
        query = cv2.resize(self.heat_image(frame), (PANEL, PANEL), interpolation=cv2.INTER_LINEAR)
        draw_points(query, self.query_points[p : p + 1], PANEL / size, QUERY_COLOUR)
        support_image = self.support_image(support)
        if support_image is None:
            right = np.full((PANEL, PANEL, 3), (64, 64, 64), np.uint8)
            _text(right, "no thumbnail", (90, PANEL // 2))
        else:
            right = cv2.resize(support_image, (PANEL, PANEL), interpolation=cv2.INTER_LINEAR)
            draw_points(right, self.sampled_points[p], PANEL / size, SAMPLE_COLOUR)
        for left, panel in zip(PANEL_LEFT, (query, right)):
            figure[PANEL_TOP : PANEL_TOP + PANEL, left : left + PANEL] = panel
        h, w = self.contributions.shape
        i, j = divmod(p, w)
        _text(figure, f"query vs '{self.class_name}': score {self.score:.4f}", (PANEL_LEFT[0], 18), 0.5)
        _text(figure, "contribution: blue low, red high", (PANEL_LEFT[0], 37), 0.42)
        _text(figure, "support: where the query position read", (PANEL_LEFT[1], 37), 0.42)
        legend = (
            f"green: position ({i}, {j}) of {h}x{w}, contributes {float(self.contributions[i, j]):.4f}"
            f"   red: its 9 sampled points"
        )
        _text(figure, legend, (PANEL_LEFT[0], PANEL_TOP + PANEL + 24), 0.42)
        return figure

    def heat_image(self, frame: np.ndarray) -> np.ndarray:
        """The frame as preprocessed (S x S, BGR) with the contribution heat map blended over it."""
        image = resize_frame(self.view_frame(frame), self.preprocess)
        size = self.preprocess.image_size
        heat = cv2.resize(normalised(self.contributions), (size, size), interpolation=cv2.INTER_LINEAR)
        colours = cv2.applyColorMap(heat, cv2.COLORMAP_JET)
        return cv2.addWeighted(image, 1 - HEAT_ALPHA, colours, HEAT_ALPHA, 0)

    def view_frame(self, frame: np.ndarray) -> np.ndarray:
        """The checked frame, cut to the recogniser's roi: what its preprocessing starts from."""
        checked = check_frame(frame)
        return checked if self.roi is None else self.roi.crop(checked)

    def support_image(self, support: np.ndarray | None) -> np.ndarray | None:
        """The support (given, or the thumbnail) as the model saw it: S x S BGR."""
        image = support if support is not None else self.thumbnail
        return None if image is None else resize_frame(check_frame(image), self.preprocess)


def normalised(values: np.ndarray) -> np.ndarray:
    """[h, w] floats -> uint8 0..255 over their own range (a flat map is mid-grey)."""
    low, high = float(values.min()), float(values.max())
    if high - low <= 0:
        return np.full(values.shape, 128, np.uint8)
    return np.round(255 * (values - low) / (high - low)).astype(np.uint8)


def draw_points(image: np.ndarray, points: np.ndarray, scale: float, colour: tuple[int, int, int]) -> None:
    """Filled dots with a dark outline at (x, y) points given in S x S pixels, on an image `scale`
    times as large (pixel centres at integers on both)."""
    centres = [(round((x + 0.5) * scale - 0.5), round((y + 0.5) * scale - 0.5)) for x, y in points]
    for centre in centres:  # every outline first, so that a close neighbour's never covers a dot
        cv2.circle(image, centre, 6, OUTLINE, -1, cv2.LINE_AA)
    for centre in centres:
        cv2.circle(image, centre, 4, colour, -1, cv2.LINE_AA)


def _text(image: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.5) -> None:
    ascii_only = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    cv2.putText(image, ascii_only, org, FONT, scale, TEXT, 1, cv2.LINE_AA)


# ----- on dmf-run's window ---------------------------------------------------------------------------
def frame_affine(frame: np.ndarray, preprocess: PreprocessConfig, roi: Roi | None = None) -> np.ndarray:
    """2x3 affine matrix M with frame pixel = M @ (x, y, 1) for a preprocessed pixel (x, y): the
    inverse of the roi cut and of the preprocessing (`resize_box`; for locate="drawing", the square
    the drawing was redrawn from, found in this checked BGR frame and turned with its card)."""
    h, w = frame.shape[:2]
    left, top = 0, 0
    if roi is not None:
        left, top, right, bottom = roi.box(w, h)
        frame = frame[top:bottom, left:right]
    size = preprocess.image_size
    if preprocess.locate == "drawing":
        matrix = drawing_view_matrix(frame, size)
        if matrix is None:  # no drawing: the view is blank, any square will do
            side = min(frame.shape[:2])
            matrix = np.array([[side / size, 0, 0], [0, side / size, 0]], np.float64)
    else:
        nw, nh, crop_left, crop_top = resize_box(frame.shape, preprocess)
        ratio = np.array([frame.shape[1] / nw, frame.shape[0] / nh], np.float64)
        shift = (np.array([crop_left, crop_top], np.float64) + 0.5) * ratio - 0.5
        matrix = np.array([[ratio[0], 0, shift[0]], [0, ratio[1], shift[1]]], np.float64)
    matrix[:, 2] += (left, top)
    return matrix


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def draw_live(
    area: np.ndarray,
    explanation: Explanation,
    frame: np.ndarray,
    to_area: tuple[np.ndarray, np.ndarray],
    pointer: tuple[float, float] | None = None,
) -> int:
    """Draw the explanation on dmf-run's video `area` (the frame letterboxed into it; `to_area` maps
    frame pixels to area pixels as (scale, shift) per axis). The heat map covers what the model saw,
    where it lies in the frame; the query position under `pointer` (area pixels; None or off the
    view: the best one) is marked in green, and an inset of the class thumbnail in the area's
    bottom-right corner shows its sampled points in red. Returns the position shown."""
    to_frame = frame_affine(frame, explanation.preprocess, explanation.roi)
    matrix = to_frame * np.asarray(to_area[0], np.float64)[:, None]  # area = scale * frame + shift
    matrix[:, 2] += to_area[1]
    size = explanation.preprocess.image_size
    position = explanation.best_position
    if pointer is not None:
        inverse = cv2.invertAffineTransform(matrix)
        x, y = _apply(inverse, np.asarray(pointer, np.float64))
        if -0.5 <= x <= size - 0.5 and -0.5 <= y <= size - 0.5:
            position = explanation.position_at(x, y)
    height, width = area.shape[:2]
    heat = cv2.warpAffine(explanation.heat_image(frame), matrix, (width, height), flags=cv2.INTER_LINEAR)
    inside = cv2.warpAffine(np.full((size, size), 255, np.uint8), matrix, (width, height)) > 0
    area[inside] = heat[inside]
    _dot(area, _apply(matrix, explanation.query_points[position]), QUERY_COLOUR)
    support = explanation.support_image(None)
    if support is not None and height > LIVE_THUMB and width > LIVE_THUMB:
        inset = cv2.resize(support, (LIVE_THUMB, LIVE_THUMB), interpolation=cv2.INTER_LINEAR)
        draw_points(inset, explanation.sampled_points[position], LIVE_THUMB / size, SAMPLE_COLOUR)
        area[height - LIVE_THUMB :, width - LIVE_THUMB :] = inset
    return position


def _dot(image: np.ndarray, xy: np.ndarray, colour: tuple[int, int, int]) -> None:
    centre = (round(float(xy[0])), round(float(xy[1])))
    cv2.circle(image, centre, 7, OUTLINE, -1, cv2.LINE_AA)
    cv2.circle(image, centre, 5, colour, -1, cv2.LINE_AA)
