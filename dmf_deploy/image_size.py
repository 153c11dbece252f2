"""An encoded image's width and height, read from its header without decoding it.

OpenCV allocates the whole image before it decodes a pixel, and a 1 MB PNG can claim 32000 x 32000
(3 GB once decoded). `image_size` reads the size from the header, so that `dmf_deploy.preprocess`
refuses such a file before anything is allocated. It knows the formats users pass: PNG, JPEG, BMP,
WebP, TIFF, GIF and the Netpbm family (PBM, PGM, PPM, PAM, PFM); `None` means "not one of those"
(or a header too broken to read), and the caller refuses the file: what cannot be sized is not decoded.
"""

from __future__ import annotations

import re

FORMATS = "PNG, JPEG, BMP, WebP, TIFF, GIF, PBM/PGM/PPM/PAM/PFM"


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of an encoded image, or None if it is not a format listed above."""
    for reader in (_png, jpeg_size, _bmp, _webp, _tiff, _gif, _netpbm):
        size = reader(data)
        if size is not None:
            return size
    return None


def _uint(data: bytes, start: int, length: int, order: str = "big") -> int:
    return int.from_bytes(data[start : start + length], order)  # type: ignore[arg-type]


def _png(data: bytes) -> tuple[int, int] | None:
    # Signature, then the IHDR chunk first: length (4), "IHDR", width (4), height (4).
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return _uint(data, 16, 4), _uint(data, 20, 4)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, read without decoding; None if it has none."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or a scan before any frame header
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            if i + 9 > len(data):
                return None
            height = _uint(data, i + 5, 2)
            width = _uint(data, i + 7, 2)
            return width, height
        length = _uint(data, i + 2, 2)
        if length < 2:
            return None
        i += 2 + length
    return None


def _bmp(data: bytes) -> tuple[int, int] | None:
    if data[:2] != b"BM" or len(data) < 26:
        return None
    if _uint(data, 14, 4, "little") == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return _uint(data, 18, 2, "little"), _uint(data, 20, 2, "little")
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)  # negative: rows stored top-down
    return abs(width), abs(height)


def _webp(data: bytes) -> tuple[int, int] | None:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: the canvas size, 24 bits each, minus one
        return _uint(data, 24, 3, "little") + 1, _uint(data, 27, 3, "little") + 1
    if chunk == b"VP8L" and data[20] == 0x2F:  # lossless: 14 bits each, minus one
        bits = _uint(data, 21, 4, "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy: key frame start code, 14 bits each
        return _uint(data, 26, 2, "little") & 0x3FFF, _uint(data, 28, 2, "little") & 0x3FFF
    return None


def _tiff(data: bytes) -> tuple[int, int] | None:
    """The first image's ImageWidth (256) and ImageLength (257): the page OpenCV decodes."""
    order = {b"II": "little", b"MM": "big"}.get(data[:2])
    if order is None:
        return None
    kind = _uint(data, 2, 2, order)
    if kind == 42:  # classic TIFF: 4-byte offsets, 12-byte entries
        offset, count_size, entry_size, value_at = _uint(data, 4, 4, order), 2, 12, 8
    elif kind == 43:  # BigTIFF: 8-byte offsets, 20-byte entries
        offset, count_size, entry_size, value_at = _uint(data, 8, 8, order), 8, 20, 12
    else:
        return None
    if offset + count_size > len(data):
        return None
    found: dict[int, int] = {}
    start = offset + count_size
    for n in range(_uint(data, offset, count_size, order)):
        entry = start + n * entry_size
        if entry + entry_size > len(data):
            return None
        tag, kind = _uint(data, entry, 2, order), _uint(data, entry + 2, 2, order)
        width = {3: 2, 4: 4, 16: 8}.get(kind)  # SHORT, LONG, LONG8
        if tag in (256, 257) and width is not None:
            found[tag] = _uint(data, entry + value_at, width, order)
    if 256 not in found or 257 not in found:
        return None
    return found[256], found[257]


def _gif(data: bytes) -> tuple[int, int] | None:
    """The logical screen: OpenCV decodes every frame onto a canvas of this size."""
    if data[:6] not in (b"GIF87a", b"GIF89a") or len(data) < 10:
        return None
    return _uint(data, 6, 2, "little"), _uint(data, 8, 2, "little")


_NETPBM = re.compile(rb"P[1-6Ff](?:\s|#[^\n]*\n)+(\d{1,10})(?:\s|#[^\n]*\n)+(\d{1,10})\s")


def _netpbm(data: bytes) -> tuple[int, int] | None:
    head = data[:4096]
    if head[:2] == b"P7":  # PAM: WIDTH and HEIGHT lines before ENDHDR
        header = head.split(b"ENDHDR", 1)[0]
        width = re.search(rb"^WIDTH\s+(\d{1,10})\s*$", header, re.MULTILINE)
        height = re.search(rb"^HEIGHT\s+(\d{1,10})\s*$", header, re.MULTILINE)
        return (int(width.group(1)), int(height.group(1))) if width and height else None
    match = _NETPBM.match(head)
    return (int(match.group(1)), int(match.group(2))) if match else None
