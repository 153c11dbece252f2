"""The one preprocessing function shared by training, export and the runtime.

A frame is HxWx3 uint8 in BGR order (OpenCV's) or HxW uint8 grey, of any size. It is resized by the
model's rule (or, with `locate="drawing"`, the drawing in it is found and redrawn: dmf_deploy/drawing.py),
converted to RGB, scaled to [0, 1] and normalised with the model's mean and std.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dmf_deploy.config import PreprocessConfig
from dmf_deploy.drawing import locate_drawing
from dmf_deploy.image_size import FORMATS, image_size

_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}
MAX_IMAGE_FILE_BYTES = 64 << 20  # an image file larger than this is refused before it is read
MAX_IMAGE_PIXELS = 40_000_000  # a decoded image larger than this (a 7k x 5.7k photo) is refused


class InvalidFrame(ValueError):
    pass


def refuse_none(frame: object, where: str = "frame") -> None:
    """cv2.imread returns None for a file it cannot read: say so, rather than fail on None later."""
    if frame is None:
        raise InvalidFrame(f"{where} is None (did the image fail to load?)")


def check_frame(frame: object, index: int | None = None) -> np.ndarray:
    """Return the frame as HxWx3 BGR uint8, or raise InvalidFrame naming what is wrong."""
    where = "frame" if index is None else f"frame {index}"
    refuse_none(frame, where)
    if not isinstance(frame, np.ndarray):
        raise InvalidFrame(f"{where} must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise InvalidFrame(f"{where} must be uint8 (0..255), got dtype {frame.dtype}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    elif frame.ndim != 3 or frame.shape[2] != 3:
        raise InvalidFrame(f"{where} has shape {frame.shape}; expected HxWx3 (BGR) or HxW (grey)")
    if frame.shape[0] < 2 or frame.shape[1] < 2:
        raise InvalidFrame(f"{where} is too small: {frame.shape[1]}x{frame.shape[0]} pixels")
    return frame


def resize_frame(bgr: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """A checked BGR frame -> image_size x image_size BGR uint8, by the model's rule."""
    size = config.image_size
    if config.locate == "drawing":
        return locate_drawing(bgr, size)
    nw, nh, left, top = resize_box(bgr.shape, config)
    bgr = cv2.resize(bgr, (nw, nh), interpolation=_INTERPOLATION[config.interpolation])
    return bgr[top : top + size, left : left + size]


def resize_box(shape: tuple[int, ...], config: PreprocessConfig) -> tuple[int, int, int, int]:
    """(width, height) a frame of `shape` is resized to, and (left, top) of the image_size square kept."""
    size = config.image_size
    side = config.crop_from or size
    if config.resize == "center-crop":
        h, w = shape[:2]
        scale = side / min(h, w)
        nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
    else:
        nh = nw = side
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def normalize(bgr: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """HxWx3 BGR uint8 of the final size -> 3xHxW float32, RGB, normalised."""
    rgb = bgr[:, :, ::-1].astype(np.float32) * np.float32(config.scale)
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    return np.ascontiguousarray(((rgb - mean) / std).transpose(2, 0, 1))


def preprocess_frame(frame: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    return normalize(resize_frame(check_frame(frame), config), config)


def checked_frames(frames: Sequence[np.ndarray] | np.ndarray, roi: Roi | None = None) -> list[np.ndarray]:
    """Every frame checked (HxWx3 BGR uint8) and cut to `roi`; InvalidFrame naming what is wrong."""
    refuse_none(frames)
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        if frames.ndim == 2 or (frames.ndim == 3 and frames.shape[2] in (1, 3)):
            raise InvalidFrame(
                f"expected a sequence of frames but got a single frame of shape {frames.shape}; "
                "wrap it in a list"
            )
        # Iterated, an HxWx4 (BGRA) array would be taken for H grey frames of W x 4 pixels, and a
        # 1-D array for numbers: an array must be a [B, H, W, C] batch.
        raise InvalidFrame(
            f"expected a sequence of frames or a [B, H, W, C] array of them, got one array of shape "
            f"{frames.shape}; a frame is HxWx3 uint8 (BGR) or HxW (grey), wrapped in a list"
        )
    if len(frames) == 0:
        raise InvalidFrame("no frames given")
    checked = [check_frame(frame, i) for i, frame in enumerate(frames)]
    return checked if roi is None else [roi.crop(frame) for frame in checked]


def preprocess_frames(
    frames: Sequence[np.ndarray] | np.ndarray, config: PreprocessConfig, roi: Roi | None = None
) -> np.ndarray:
    """A sequence of frames -> [B, 3, S, S] float32, exactly what the backbone is fed. `roi`: the region
    of each frame the model sees (None: the whole frame)."""
    return stack_inputs(model_views(frames, config, roi)[1], config)


def model_views(
    frames: Sequence[np.ndarray] | np.ndarray, config: PreprocessConfig, roi: Roi | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(checked frames cut to `roi`, what the model sees of each: S x S BGR uint8 by the model's rule).
    For callers that need both, e.g. the contrast gate, which may measure either."""
    checked = checked_frames(frames, roi)
    return checked, [resize_frame(frame, config) for frame in checked]


def stack_inputs(views: Sequence[np.ndarray], config: PreprocessConfig) -> np.ndarray:
    """Model views (S x S BGR uint8, from resize_frame) -> [B, 3, S, S] float32."""
    size = config.image_size
    out = np.empty((len(views), 3, size, size), dtype=np.float32)
    for i, view in enumerate(views):
        out[i] = normalize(view, config)
    return out


@dataclass(frozen=True)
class Roi:
    """A region of the frame, in fractions of its width and height: the guide box a card is held in."""

    x: float
    y: float
    w: float
    h: float

    def __post_init__(self) -> None:
        values = (self.x, self.y, self.w, self.h)
        if not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise ValueError(f"roi needs four finite numbers (x, y, w, h), got {values!r}")
        if self.x < 0 or self.y < 0 or self.w <= 0 or self.h <= 0:
            raise ValueError(f"roi x, y must be >= 0 and w, h > 0 (fractions of the frame), got {values}")
        if self.x + self.w > 1 + 1e-9 or self.y + self.h > 1 + 1e-9:
            raise ValueError(
                "roi must lie inside the frame: x + w and y + h at most 1 (fractions of the frame), "
                f"got {values}"
            )

    @classmethod
    def of(cls, value: Roi | Sequence[float] | str | None) -> Roi | None:
        """A Roi from (x, y, w, h), "x,y,w,h" or a Roi; None stays None. ValueError when malformed."""
        if value is None or isinstance(value, Roi):
            return value
        if isinstance(value, str):
            parts = value.split(",")
            try:
                value = [float(p) for p in parts]
            except ValueError:
                raise ValueError(
                    f"roi must be four numbers x,y,w,h (fractions of the frame), got {value!r}"
                ) from None
        if isinstance(value, np.ndarray) or not isinstance(value, Sequence) or len(value) != 4:
            raise ValueError(f"roi must be four numbers x, y, w, h (fractions of the frame), got {value!r}")
        return cls(*value)

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in pixels of a width x height frame, at least 2 x 2 pixels."""
        left = min(int(round(self.x * width)), width - 2)
        top = min(int(round(self.y * height)), height - 2)
        right = max(left + 2, min(width, int(round((self.x + self.w) * width))))
        bottom = max(top + 2, min(height, int(round((self.y + self.h) * height))))
        return left, top, right, bottom

    def crop(self, frame: np.ndarray) -> np.ndarray:
        left, top, right, bottom = self.box(frame.shape[1], frame.shape[0])
        return frame[top:bottom, left:right]


class ImageFileError(ValueError):
    """An image file that is missing, unreadable, empty, too large or not decodable."""


def read_image_bytes(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_IMAGE_FILE_BYTES) -> bytes:
    """A file's bytes, bounded before reading; ImageFileError naming the file and the problem."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ImageFileError(f"{what} {path} does not exist or is not a file")
        if path.stat().st_size > max_bytes:
            raise ImageFileError(f"{what} {path} is larger than {max_bytes >> 20} MB")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageFileError(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc
    if not data:
        raise ImageFileError(f"{what} {path} is empty")
    return data


def decode_image(data: bytes, what: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """BGR uint8 from encoded bytes; ImageFileError when it is not an image or is too large.

    The size is read from the header first (dmf_deploy/image_size.py): an image larger than
    `max_pixels`, or of a format whose size cannot be read before decoding, is never decoded.
    """
    size = image_size(data)
    if size is None:
        raise ImageFileError(f"{what} is not an image of a format dmf-deploy reads ({FORMATS})")
    if min(size) < 1 or size[0] * size[1] > max_pixels:
        raise ImageFileError(
            f"{what} is {size[0]}x{size[1]} pixels; images of 1 to {max_pixels} pixels are accepted"
        )
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None:
        raise ImageFileError(f"{what} is not an image OpenCV can decode")
    if image.shape[0] * image.shape[1] > max_pixels:  # a header that lied about its size
        raise ImageFileError(f"{what} has more than {max_pixels} pixels")
    return image


def read_image_file(
    path: str | os.PathLike[str], what: str = "image", max_bytes: int = MAX_IMAGE_FILE_BYTES
) -> np.ndarray:
    """A BGR uint8 image from a file, or ImageFileError naming the file and the problem."""
    return decode_image(read_image_bytes(path, what, max_bytes), f"{what} {path}")
