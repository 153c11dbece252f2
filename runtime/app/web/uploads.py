"""Uploaded images: bounded in bytes (per request) and in pixels (from the file's header, before decoding).

A request's body is at most MAX_UPLOAD_BYTES (20 MB: a phone photo is 2 to 8 MB); the guard counts it
as it arrives (guard.py). An image must be in a format whose header states its size (FORMATS), and
the width and height that its header states are checked against MAX_UPLOAD_PIXELS before OpenCV
decodes a byte of it: a PNG that
claims 100,000 x 100,000 pixels is refused without allocating anything.

The header is read by the project's one header reader (dmf_deploy/image_size.py), the same that
every other image file from outside goes through.
"""

from __future__ import annotations

import numpy as np

from dmf_deploy.image_size import FORMATS
from dmf_deploy.image_size import image_size as header_size
from dmf_deploy.preprocess import MAX_IMAGE_PIXELS, ImageFileError, decode_image

MAX_UPLOAD_BYTES = 20 << 20  # one request's body, every file and field together
MAX_UPLOAD_FILES = 32  # images in one request
MAX_UPLOAD_PIXELS = MAX_IMAGE_PIXELS  # 40 megapixels: a 7,000 x 5,700 photo


class UploadError(ValueError):
    """An upload that is refused: the HTTP status, a short error name and what was wrong."""

    def __init__(self, status: int, name: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.name, self.detail = status, name, detail


def decode_upload(data: bytes, what: str) -> np.ndarray:
    """A BGR uint8 image from an uploaded file, or UploadError (415 not an image, 422 too many pixels)."""
    if not data:
        raise UploadError(400, "empty_file", f"{what} is empty")
    size = header_size(data)
    if size is None:
        raise UploadError(415, "not_an_image", f"{what} is not a {FORMATS} image")
    width, height = size
    if width < 1 or height < 1 or width * height > MAX_UPLOAD_PIXELS:
        raise UploadError(
            422,
            "image_too_large",
            f"{what} says it is {width} x {height} pixels; the limit is {MAX_UPLOAD_PIXELS:,} pixels",
        )
    try:
        return decode_image(data, what, MAX_UPLOAD_PIXELS)
    except ImageFileError as exc:
        raise UploadError(415, "not_an_image", str(exc)) from None
