"""INT8 backbones: ONNX Runtime's static quantization (QDQ) calibrated on images.

The backbone is quantized with `quantize_static` after its pre-processing step (`quant_pre_process`:
shape inference and graph optimisation); support and head stay float32. Calibration images come from
a folder, preprocessed exactly as the runtime does (`dmf_deploy.preprocess.preprocess_frames`); every
`HOLDOUT_EVERY`-th of them (by name) is held out of calibration, for the INT8 gate to measure agreement
on images of the user's domain that calibration never saw (`export/int8_parity.py`). For the packaged
demo model the package renders its own calibration set (`demo_calibration_frames`), and its held-out
set with another seed.

The quantized form follows the export target (`QUANT_SETTINGS`):

- ``onnxruntime``: uint8 activations with zero points, int8 weights per output channel, the form
  ONNX Runtime's CPU kernels run fastest;
- ``tensorrt``: TensorRT's explicit quantization, symmetric int8 for both (zero points 0), weights per
  output channel (`dmf_deploy.export.lint` checks it).

`quantize_static`'s own defaults (int8 activations, per-tensor weights) are neither, so both are named.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from dmf_deploy.config import PreprocessConfig
from dmf_deploy.export.int8_parity import HOLDOUT_EVERY
from dmf_deploy.manifest import Calibration
from dmf_deploy.preprocess import ImageFileError, decode_image, preprocess_frames, read_image_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MAX_CALIBRATION_IMAGES = 1024  # a few hundred suffice for MinMax ranges; the cap bounds time and memory
MAX_IMAGE_BYTES = 64 << 20  # a calibration image larger than this is refused, not decoded
DEMO_CALIBRATION_IMAGES = 256
DEMO_HELDOUT_IMAGES = 400  # x 4 views: 1,600 agreement queries, about 1,100 of them clear (not near-tied)
CALIBRATION_BATCH = 16


class CalibrationError(ValueError):
    """A calibration folder that cannot be used (missing, empty, too large, an unreadable image)."""


def quant_settings(target: str) -> dict[str, Any]:
    """`quantize_static` keyword arguments of the quantized form for an export target."""
    if target == "tensorrt":
        return {
            "activation_type": QuantType.QInt8,
            "weight_type": QuantType.QInt8,
            "per_channel": True,
            # Biases stay float: TensorRT's Q/DQ layers take int8, not the int32 bias form.
            "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
        }
    return {
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "per_channel": True,
        "extra_options": {},
    }


# ----- calibration images ------------------------------------------------------------------------------


def calibration_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files directly in `folder`, sorted by name; CalibrationError when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise CalibrationError(f"calibration folder {root} does not exist or is not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CalibrationError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(files) > MAX_CALIBRATION_IMAGES:
        raise CalibrationError(
            f"{root} holds {len(files)} images; calibration takes at most {MAX_CALIBRATION_IMAGES}"
        )
    return files


def read_calibration_folder(
    folder: str | os.PathLike[str], preprocess: PreprocessConfig
) -> tuple[np.ndarray, Calibration, np.ndarray]:
    """The folder's images preprocessed as the runtime does (one at a time, so only model-sized arrays
    are held): those to calibrate on, their Calibration record (count and sha256 over the files' names
    and bytes), and the held-out ones (every HOLDOUT_EVERY-th by name; none from a folder of fewer)."""

    digest = hashlib.sha256()
    images: list[np.ndarray] = []
    held_out: list[np.ndarray] = []
    for index, path in enumerate(calibration_files(folder)):
        try:
            data = read_image_bytes(path, "calibration image", MAX_IMAGE_BYTES)
            frame = decode_image(data, f"calibration image {path}")
        except ImageFileError as exc:
            raise CalibrationError(str(exc)) from exc
        image = preprocess_frames([frame], preprocess)[0]
        if index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1:
            held_out.append(image)
            continue
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(data).digest())
        images.append(image)
    size = preprocess.image_size
    rest = np.stack(held_out) if held_out else np.zeros((0, 3, size, size), np.float32)
    return np.stack(images), Calibration(len(images), digest.hexdigest()), rest


def demo_calibration_frames(
    count: int = DEMO_CALIBRATION_IMAGES, seed: int = 7
) -> tuple[list[np.ndarray], Calibration]:
    """The demo model's default calibration set and its record, all rendered by the package, seeded:
    a quarter the demo's stroke-font symbols on its card (`dmf_deploy.symbols.render_symbol`) at
    stroke widths from thin to heavy, the rest random-stroke glyphs (`dmf_deploy.glyphs`, the
    images export parity uses, other classes). Heavy overlapping ink drives the features twice as high
    as the letters do, and MinMax ranges must cover it (benchmarks/README.md: letters alone gave 94%
    top-1 agreement, half and half 99.0%, a quarter 99.4%). Another `seed` renders other images of the
    same mix (the INT8 gate's held-out set)."""
    from dmf_deploy.glyphs import GlyphSet
    from dmf_deploy.symbols import STROKE_FONT, render_symbol

    symbols = sorted(STROKE_FONT)
    letters = count // 4
    frames = [
        render_symbol(
            STROKE_FONT[symbols[i % len(symbols)]],
            np.random.default_rng([seed, i]),
            stroke_width=0.04 + 0.12 * (i % 7) / 6,
        )
        for i in range(letters)
    ]
    glyphs = GlyphSet(num_classes=count - letters, seed=seed, image_size=64)
    frames += [glyphs.render(c, 0) for c in range(count - letters)]
    digest = hashlib.sha256()
    for frame in frames:
        digest.update(np.ascontiguousarray(frame).tobytes())
    return frames, Calibration(count, digest.hexdigest())


class _ImageReader(CalibrationDataReader):
    """`CalibrationDataReader` over preprocessed images, in batches of the backbone's ``images`` input."""

    def __init__(self, images: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self._batches: Iterator[np.ndarray] = (images[i : i + batch] for i in range(0, len(images), batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"images": batch}


# ----- quantization ------------------------------------------------------------------------------------


def quantize_backbone(
    fp32_path: Path, out_path: Path, images: np.ndarray, target: str = "onnxruntime"
) -> None:
    """Write the QDQ INT8 form of backbone.onnx (`fp32_path`) to `out_path`, calibrated on `images`
    (preprocessed, [M, 3, S, S])."""
    reader = _ImageReader(images)
    with tempfile.TemporaryDirectory(prefix="dmf-quant-", dir=out_path.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        quantize_static(
            str(prepared),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            calibrate_method=CalibrationMethod.MinMax,
            **quant_settings(target),
        )
