"""The bounds and checks every gallery reader and writer applies (torch-free).

A gallery file comes from outside: every size is checked against these bounds before anything is
allocated, names are validated as user input, thumbnails are parsed for their size before any decode,
and every failure is a GalleryError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dmf_deploy.image_size import jpeg_size
from dmf_deploy.names import InvalidClassName, validate_class_name

FORMAT = "dmf-gallery"
MAX_HEADER_BYTES = 16 << 20  # checked before json.loads: a corrupt length must not cost gigabytes
THUMBNAIL_SIZE = 64  # longest side of a thumbnail, pixels
THUMBNAIL_QUALITY = 85
THUMBNAILS_KEPT = 4  # per class: the first enrolment's, then the latest ones
SUM_DTYPE = np.dtype(np.float32)  # halves memory against float64; a few hundred shots lose nothing visible
BANK_DTYPE = np.dtype(np.float32)  # the default; a bundle may declare float16 banks
BANK_DTYPES = ("float32", "float16")
# Bounds no real gallery reaches, checked before anything is allocated: a hand-made file must not cost
# more than its own size in memory, nor overflow int64 shot counts.
MAX_CLASSES = 1 << 20
MAX_SHOTS = 1 << 31  # per class
MAX_RANK = 8  # axes of a feature or class-bank tensor
MAX_ROW_ELEMENTS = 1 << 24  # elements of one class's feature map or bank tensor (64 MB of float32)
MAX_THUMBNAIL_BYTES = 256 << 10
MAX_THUMBNAIL_SIDE = 256  # pixels; saved thumbnails are THUMBNAIL_SIZE
MAX_STAMP_LENGTH = 64
# A prototype (feature sum / shots) beyond this is no backbone's output: real feature maps stay below
# 1e3 (the demo model and ResNet-12 stay under 100), and sums of finite but huge values (3e38) make
# support.onnx overflow to infinity. 1e6 leaves three orders of headroom and overflows nothing: the
# head's largest product sums (640 channels x 9 taps x 1e6 x weights of order 1) stay near 1e10.
MAX_PROTOTYPE_ABS = 1e6


class GalleryError(ValueError):
    """A gallery file that is corrupt, of another format or model; or an invalid gallery operation."""


class GalleryNotFoundError(GalleryError, FileNotFoundError):
    """The gallery file does not exist (caught by ``except FileNotFoundError`` as well)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def short(fingerprint: str) -> str:
    return fingerprint[:12]


def check_shape(value: Any, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise GalleryError(
            f"{what} must be a sequence of positive integers, got {str(value)[:100]!r}"
        ) from exc
    if not shape or min(shape) < 1:
        raise GalleryError(f"{what} must be a non-empty sequence of positive integers, got {value!r}")
    if len(shape) > MAX_RANK or math.prod(shape) > MAX_ROW_ELEMENTS:
        raise GalleryError(
            f"{what} {shape} is too large: at most {MAX_RANK} axes and {MAX_ROW_ELEMENTS} elements"
        )
    return shape


def check_bank_dtypes(
    dtypes: Mapping[str, str] | None, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.dtype]:
    """Each bank tensor's dtype (default float32); GalleryError for other names or dtypes."""
    if dtypes is None:
        return {k: BANK_DTYPE for k in shapes}
    if not isinstance(dtypes, Mapping) or set(dtypes) != set(shapes):
        raise GalleryError(f"bank_dtypes must name exactly the bank tensors {sorted(shapes)}")
    for key, name in dtypes.items():
        if name not in BANK_DTYPES:
            raise GalleryError(f"bank dtype of {key!r} is {name!r}; a gallery stores {BANK_DTYPES}")
    return {k: np.dtype(dtypes[k]) for k in shapes}


def another_model(
    path: object, theirs: str, saved_by: str, fingerprint: str, open_model: str
) -> GalleryError:
    """The error for a gallery of another model: names both, so the user knows which bundle it needs."""
    return GalleryError(
        f"{path} was enrolled with another model: it belongs to {saved_by or '(no description)'!r} "
        f"(fingerprint {short(theirs)}), but the open model is {open_model or '(no description)'!r} "
        f"(fingerprint {short(fingerprint)}). Enrol the classes again with this model, "
        "or open the bundle the gallery was made with."
    )


def check_class_entry(path: object, name: object, shots: object, created: object, updated: object) -> str:
    """A stored class's name (NFC), shot count and timestamps; GalleryError naming what is wrong."""
    try:
        name = validate_class_name(name)  # NFC: a gallery of older versions may hold NFD
    except InvalidClassName as exc:
        raise GalleryError(f"{path} holds an invalid class name: {exc}") from exc
    if isinstance(shots, bool) or not isinstance(shots, int) or not 1 <= shots <= MAX_SHOTS:
        raise GalleryError(
            f"{path}: class {name!r} has an invalid shot count {str(shots)[:40]!r} (1..{MAX_SHOTS})"
        )
    if not all(isinstance(s, str) and len(s) <= MAX_STAMP_LENGTH for s in (created, updated)):
        raise GalleryError(f"{path}: class {name!r} has invalid timestamps")
    return name


def check_feature_sum(path: object, name: str, total: np.ndarray, shots: int) -> np.ndarray:
    """A stored or computed feature sum: finite, and its prototype within MAX_PROTOTYPE_ABS."""
    if not np.all(np.isfinite(total)):
        raise GalleryError(f"{path}: the feature sum of {name!r} contains NaN or infinity")
    peak = float(np.max(np.abs(total))) / shots if total.size else 0.0
    if peak > MAX_PROTOTYPE_ABS:
        raise GalleryError(
            f"{path}: the features of {name!r} reach {peak:.3g}, beyond any backbone's output "
            f"(at most {MAX_PROTOTYPE_ABS:g})"
        )
    return total


def check_feature_sums(path: object, names: list[str], sums: np.ndarray, counts: list[int]) -> None:
    """`check_feature_sum` of every row of `sums` [N, ...] (row i: class names[i], counts[i] shots), a
    block of rows at a time: one numpy call per block rather than per class. The error names the first
    class that fails."""
    block = 1024
    for start in range(0, len(names), block):
        rows = sums[start : start + block].reshape(min(block, len(names) - start), -1)
        shots = np.asarray(counts[start : start + block], np.float64)
        finite = np.isfinite(rows).all(axis=1)
        peaks = np.abs(np.nan_to_num(rows)).max(axis=1, initial=0.0) / shots
        bad = np.flatnonzero(~finite | (peaks > MAX_PROTOTYPE_ABS))
        if len(bad):
            i = start + int(bad[0])
            check_feature_sum(path, names[i], sums[i], counts[i])  # raises, with the class's message


def encode_thumbnail(frame: np.ndarray, size: int = THUMBNAIL_SIZE) -> bytes:
    """JPEG of a BGR uint8 (HxWx3) or grey (HxW) frame, its longest side scaled to `size`."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)):
        raise GalleryError(
            f"a thumbnail needs an HxWx3 BGR or HxW grey uint8 frame, got {frame.dtype} {frame.shape}"
        )
    h, w = frame.shape[:2]
    if h < 1 or w < 1:
        raise GalleryError(f"cannot make a thumbnail of an empty frame {frame.shape}")
    scale = size / max(h, w)
    small = cv2.resize(
        frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])
    if not ok:
        raise GalleryError("OpenCV could not encode the thumbnail")
    return buf.tobytes()


def thumbnail_problem(data: bytes) -> str | None:
    if len(data) > MAX_THUMBNAIL_BYTES:
        return f"is {len(data)} bytes (the limit is {MAX_THUMBNAIL_BYTES})"
    size = jpeg_size(data)
    if size is None:
        return "is not a JPEG image"
    if min(size) < 1 or max(size) > MAX_THUMBNAIL_SIDE:
        return f"is {size[0]}x{size[1]} pixels (the limit is {MAX_THUMBNAIL_SIDE} a side)"
    return None


def checked_thumbnail(path: Path, name: str, data: bytes) -> bytes | None:
    if not data:
        return None
    problem = thumbnail_problem(data)
    if problem:
        raise GalleryError(f"{path}: the thumbnail of {name!r} {problem}")
    return data


def decode_thumbnail(data: bytes | None) -> np.ndarray | None:
    """A thumbnail as a BGR image; None when there is none or it is not a small JPEG.

    Dimensions are read from the JPEG header first: a "thumbnail" of 10000x10000 pixels is never decoded.
    """
    if not data or thumbnail_problem(data):
        return None
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
