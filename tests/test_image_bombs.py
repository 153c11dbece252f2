"""Image bombs (issue 29, item 2): an image's size is read from its header before it is decoded.

The attack: a 995 KB PNG of 32000 x 32000 grey pixels, which OpenCV decodes into 3 GB (BGR) before any
pixel check. It is fed to every reader of image files from outside (the shared `read_image_file` that
dmf-explain, dmf-export --calib and --cohort use, and dmf-run's folder source), each in a subprocess
that measures its own peak memory. The subprocesses run under an address-space limit, so that code
without the check fails there instead of taking the machine's memory.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from dmf_deploy.image_size import image_size
from dmf_deploy.preprocess import MAX_IMAGE_PIXELS, ImageFileError, decode_image

BOMB_SIDE = 32000
# Peak memory a refused bomb may add to a process: reading the 1 MB file and its header. 100 MB is far
# above that and far below the 3 GB that decoding costs (or the 1 GB of the smallest decoded buffer).
MAX_GROWTH_MB = 100
# A refusal reads one header: well under a second even on a loaded machine (decoding took 11 s).
MAX_SECONDS = 1.0


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid PNG, 32000 x 32000 8-bit grey, every pixel 0: about 1 MB of zlib."""
    packer = zlib.compressobj(9)
    rows = b"\0" * (BOMB_SIDE + 1) * 100  # each row: filter byte 0, then the pixels
    data = b"".join(packer.compress(rows) for _ in range(BOMB_SIDE // 100)) + packer.flush()
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 0, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
    png = b"\x89PNG\r\n\x1a\n" + chunks
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(png)
    assert len(png) < 1_100_000
    return path


def run_measured(code: str) -> dict:
    """Run `code` (which sets `seconds` and `outcome`) in a fresh Python; its peak-memory growth too."""
    script = textwrap.dedent(
        """
        import json, resource, time
        # A guard for the machine, not the measurement: code that decodes the bomb fails to allocate.
        with open("/proc/self/status") as status:
            vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), vm + (2 << 30)))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        """
    )
    script += textwrap.dedent(code)
    script += textwrap.dedent(
        """
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"seconds": seconds, "outcome": outcome, "growth_mb": (after - before) / 1024}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_bomb_claims_32000_pixels_a_side(bomb: Path) -> None:
    assert image_size(bomb.read_bytes()) == (BOMB_SIDE, BOMB_SIDE)


def test_read_image_file_refuses_the_bomb_fast_and_small(bomb: Path) -> None:
    """The one reader behind dmf-explain, dmf-export --calib and --cohort."""
    result = run_measured(
        f"""
        from dmf_deploy.preprocess import ImageFileError, read_image_file
        start = time.monotonic()
        try:
            read_image_file({str(bomb)!r}, "query image")
            outcome = "decoded"
        except ImageFileError as exc:
            outcome = str(exc)
        seconds = time.monotonic() - start
        """
    )
    assert f"is {BOMB_SIDE}x{BOMB_SIDE} pixels" in result["outcome"]
    assert result["seconds"] < MAX_SECONDS
    assert result["growth_mb"] < MAX_GROWTH_MB


def test_dmf_runs_folder_source_skips_the_bomb(bomb: Path, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "1.png").write_bytes(bomb.read_bytes())
    assert cv2.imwrite(str(folder / "2.png"), np.full((30, 40, 3), 90, np.uint8))
    result = run_measured(
        f"""
        from pathlib import Path
        from dmf_deploy.runtime.app.sources import FolderSource
        source = FolderSource(Path({str(folder)!r}))
        start = time.monotonic()
        frames = [source.read(), source.read()]
        seconds = time.monotonic() - start
        outcome = [None if f is None else list(f.shape) for f in frames]
        """
    )
    assert result["outcome"] == [[30, 40, 3], None]  # the bomb skipped, the good image read, then the end
    assert result["seconds"] < MAX_SECONDS
    assert result["growth_mb"] < MAX_GROWTH_MB


ENCODED = [".png", ".jpg", ".bmp", ".webp", ".tiff", ".gif", ".pbm", ".pgm", ".ppm", ".pam", ".pfm"]


@pytest.mark.parametrize("suffix", ENCODED)
def test_every_format_is_sized_from_its_header(suffix: str) -> None:
    """What OpenCV's own encoders write, sized without decoding, and then decoded as before."""
    image = (np.random.default_rng(1).random((23, 37, 3)) * 255).astype(np.uint8)
    if suffix in (".pbm", ".pgm"):
        image = image[:, :, 0]
    source = image.astype(np.float32) / 255 if suffix == ".pfm" else image
    ok, encoded = cv2.imencode(suffix, source)
    assert ok
    data = encoded.tobytes()
    assert image_size(data) == (37, 23)
    assert decode_image(data, "image").shape == (23, 37, 3)
    with pytest.raises(ImageFileError, match="37x23 pixels"):
        decode_image(data, "image", max_pixels=37 * 23 - 1)


def test_formats_that_cannot_be_sized_are_refused() -> None:
    """Sun raster and Radiance HDR decode in OpenCV, but their size is not read here: refused."""
    image = np.zeros((23, 37, 3), np.uint8)
    for suffix, source in ((".ras", image), (".hdr", image.astype(np.float32))):
        ok, encoded = cv2.imencode(suffix, source)
        assert ok and cv2.imdecode(encoded, cv2.IMREAD_COLOR) is not None
        with pytest.raises(ImageFileError, match="not an image of a format"):
            decode_image(encoded.tobytes(), "image")


@pytest.mark.parametrize(
    "header",
    [
        b"BM" + b"\0" * 16 + struct.pack("<ii", 40000, -40000),  # BMP, top-down rows
        b"GIF89a" + struct.pack("<HH", 65535, 65535),
        b"P5\n# a comment\n60000 60000\n255\n",
        b"P7\nWIDTH 60000\nHEIGHT 60000\nDEPTH 3\nMAXVAL 255\nENDHDR\n",
        b"II*\0"
        + struct.pack("<I", 8)
        + struct.pack("<H", 2)
        + struct.pack("<HHII", 256, 4, 1, 60000)
        + struct.pack("<HHII", 257, 4, 1, 60000),
        b"RIFF\0\0\0\0WEBPVP8X" + b"\0" * 8 + (16382).to_bytes(3, "little") * 2,
    ],
)
def test_bombs_of_other_formats_are_refused_unread(header: bytes) -> None:
    data = header + b"\0" * 64
    width, height = image_size(data)
    assert width * height > MAX_IMAGE_PIXELS
    with pytest.raises(ImageFileError, match=f"is {width}x{height} pixels"):
        decode_image(data, "image")
