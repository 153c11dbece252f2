"""Uploaded images: bounded in bytes (per request) and in pixels (from the file's header, before decoding).

A request's body is at most MAX_UPLOAD_BYTES (20 MB: a phone photo is 2 to 8 MB); the guard counts it
as it arrives (guard.py). An image must be JPEG, PNG, WebP or BMP, and the width and height that its
header states are checked against MAX_UPLOAD_PIXELS before OpenCV decodes a byte of it: a PNG that
claims 100,000 x 100,000 pixels is refused without allocating anything.

`header_size` is this console's own header reader. A shared header-size check is being added to
dmf_deploy/preprocess.py; when it lands, `header_size` is the one function to swap for it.
"""

from __future__ import annotations

import struct

import numpy as np

from dmf_deploy.preprocess import MAX_IMAGE_PIXELS, ImageFileError, decode_image
from dmf_deploy.runtime.gallery import jpeg_size

MAX_UPLOAD_BYTES = 20 << 20  # one request's body, every file and field together
MAX_UPLOAD_FILES = 32  # images in one request
MAX_UPLOAD_PIXELS = MAX_IMAGE_PIXELS  # 40 megapixels: a 7,000 x 5,700 photo
FORMATS = "JPEG, PNG, WebP or BMP"


class UploadError(ValueError):
    """An upload that is refused: the HTTP status, a short error name and what was wrong."""

    def __init__(self, status: int, name: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.name, self.detail = status, name, detail


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as a JPEG, PNG, WebP or BMP header states them; None for anything else."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:2] == b"\xff\xd8":
        return jpeg_size(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)  # a negative height is a top-down bitmap
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


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
