"""Training augmentations layered on the one shared preprocessing function.

The official DMF recipe (pickled miniImageNet) is RandomCrop(84, padding=8), ColorJitter(0.4, 0.4,
0.4), RandomHorizontalFlip, ToTensor, Normalize, RandomErasing(0.5). Here crop, flip and colour
jitter act on uint8 BGR around `dmf_deploy.preprocess.resize_frame`; `normalize` follows; random
erasing acts on the normalised array. Every example therefore passes through resize_frame and
normalize exactly as the runtime's frames do (less the model's evaluation crop, see random_crop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np

from dmf_deploy.camera_sim import CameraConditions, render_card_frame
from dmf_deploy.config import PreprocessConfig
from dmf_deploy.preprocess import check_frame, normalize, resize_frame

from .fewshot import FewShotDataset

CROPS = ("pad", "resized", "none")
_BORDERS = {
    "constant": cv2.BORDER_CONSTANT,
    "replicate": cv2.BORDER_REPLICATE,
    "reflect": cv2.BORDER_REFLECT_101,
}


@dataclass(frozen=True)
class AugmentConfig:
    """crop: "pad" (pad then random crop back to size), "resized" (random area/aspect crop of the
    original, then resize_frame) or "none". Jitter strengths follow torchvision's ColorJitter."""

    crop: str = "pad"
    pad: int = 8
    pad_mode: str = "constant"  # "replicate" suits white-background characters better than black
    pad_value: int = 0
    resized_scale: tuple[float, float] = (0.08, 1.0)
    resized_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    erase_prob: float = 0.5
    erase_scale: tuple[float, float] = (0.02, 0.4)
    erase_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    erase_value: str = "zero"  # "zero" (the mean colour after normalising) or "noise" (standard normal)
    # Handwriting distortions of the original image, before the crop (0: off), as handwriting models use:
    affine: float = 0.0  # strength: rotation up to 15 deg x a, shear 0.3 x a, scale 1 +- 0.2 x a per axis
    elastic: float = 0.0  # smooth random displacement, amplitude as a fraction of the image side
    stroke: float = 0.0  # probability of thickening or thinning dark strokes by a 2x2 or 3x3 min/max filter
    # Probability that the (distorted) image becomes a simulated webcam frame of it on a card, every
    # factor of dmf_deploy.camera_sim drawn, before the crop: the frames the runtime will see.
    camera: float = 0.0
    camera_size: tuple[int, int] = (320, 240)  # (width, height): half a webcam's, to train faster

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.pad_mode not in _BORDERS:
            raise ValueError(f"pad_mode must be one of {tuple(_BORDERS)}, got {self.pad_mode!r}")
        if self.pad < 0 or min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("pad and colour jitter strengths must be >= 0")
        if not 0 <= self.erase_prob <= 1:
            raise ValueError(f"erase_prob must lie in [0, 1], got {self.erase_prob}")
        if not 0 <= self.camera <= 1:
            raise ValueError(f"camera must lie in [0, 1], got {self.camera}")
        # Bounded so that a warp stays a warp: affine 2 still scales each axis by at least 0.6.
        if not (0 <= self.affine <= 2 and 0 <= self.elastic <= 0.1 and 0 <= self.stroke <= 1):
            raise ValueError(
                f"affine must lie in [0, 2], elastic in [0, 0.1] and stroke in [0, 1]; got "
                f"{self.affine}, {self.elastic}, {self.stroke}"
            )
        if self.erase_value not in ("zero", "noise"):
            raise ValueError(f"erase_value must be 'zero' or 'noise', got {self.erase_value!r}")

    @classmethod
    def for_dataset(cls, dataset: FewShotDataset, **overrides: Any) -> AugmentConfig:
        """Defaults with flips off where a mirror image is another class (Omniglot, glyphs).
        This follows the data, not a training preset; an explicit hflip= still wins."""
        overrides.setdefault("hflip", dataset.flips_preserve_class)
        return cls(**overrides)

    def without(self, *names: str) -> AugmentConfig:
        """A copy with the named steps off: crop, hflip, color, erase, handwriting, camera."""
        off: dict[str, Any] = {}
        for name in names:
            if name == "crop":
                off["crop"] = "none"
            elif name == "hflip":
                off["hflip"] = False
            elif name == "color":
                off.update(brightness=0.0, contrast=0.0, saturation=0.0)
            elif name == "erase":
                off["erase_prob"] = 0.0
            elif name == "handwriting":
                off.update(affine=0.0, elastic=0.0, stroke=0.0)
            elif name == "camera":
                off["camera"] = 0.0
            else:
                raise ValueError(f"unknown augmentation step {name!r}")
        return replace(self, **off)


def _resized_crop_box(h: int, w: int, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop box (top, left, height, width), centre fallback."""
    area = h * w
    log_ratio = (math.log(cfg.resized_ratio[0]), math.log(cfg.resized_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*cfg.resized_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ratio = w / h
    if ratio < cfg.resized_ratio[0]:
        cw, ch = w, round(w / cfg.resized_ratio[0])
    elif ratio > cfg.resized_ratio[1]:
        ch, cw = h, round(h * cfg.resized_ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_crop(
    bgr: np.ndarray, pre: PreprocessConfig, cfg: AugmentConfig, rng: np.random.Generator
) -> np.ndarray:
    """Original-size BGR -> SxS BGR, always through resize_frame.

    The model's evaluation crop (`crop_from`, e.g. tieredImageNet's 92 -> 84) is not applied: training
    crops are resized straight to the input size, as the official RandomResizedCrop and RandomCrop are."""
    pre = replace(pre, crop_from=None)
    if cfg.crop == "resized":
        top, left, ch, cw = _resized_crop_box(*bgr.shape[:2], cfg, rng)
        return resize_frame(bgr[top : top + ch, left : left + cw], pre)
    out = resize_frame(bgr, pre)
    if cfg.crop == "none" or cfg.pad == 0:
        return out
    p = cfg.pad
    padded = cv2.copyMakeBorder(out, p, p, p, p, _BORDERS[cfg.pad_mode], value=(cfg.pad_value,) * 3)
    top, left = rng.integers(0, 2 * p + 1, size=2)
    return padded[top : top + pre.image_size, left : left + pre.image_size]


def handwriting(bgr: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Stroke width, then one random affine and elastic warp of the original-size image.

    Dark strokes on a light page: a min filter thickens them, a max filter thins them. Pixels pulled in
    from outside the image repeat its border (the blank page)."""
    if cfg.stroke and rng.uniform() < cfg.stroke:
        size = int(rng.integers(2, 4))
        kernel = np.ones((size, size), np.uint8)
        bgr = cv2.erode(bgr, kernel) if rng.uniform() < 0.5 else cv2.dilate(bgr, kernel)
    if not (cfg.affine or cfg.elastic):
        return bgr
    h, w = bgr.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    if cfg.affine:
        a = cfg.affine
        angle = math.radians(rng.uniform(-15, 15) * a)
        shear = rng.uniform(-0.3, 0.3) * a
        sy, sx = rng.uniform(1 - 0.2 * a, 1 + 0.2 * a, size=2)
        cos, sin = math.cos(angle), math.sin(angle)
        # Output pixel -> source pixel, about the centre: inverse of rotate . shear . scale.
        forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1, shear], [0, 1]]) @ np.diag([sx, sy])
        inverse = np.linalg.inv(forward).astype(np.float32)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        dx, dy = xs - cx, ys - cy
        xs, ys = inverse[0, 0] * dx + inverse[0, 1] * dy + cx, inverse[1, 0] * dx + inverse[1, 1] * dy + cy
    if cfg.elastic:
        # Displacements drawn on a coarse 8x8 grid and resized smoothly: a few bends per stroke.
        amplitude = cfg.elastic * max(h, w)
        field = rng.uniform(-1, 1, size=(2, 8, 8)).astype(np.float32) * amplitude
        xs = xs + cv2.resize(field[0], (w, h), interpolation=cv2.INTER_CUBIC)
        ys = ys + cv2.resize(field[1], (w, h), interpolation=cv2.INTER_CUBIC)
    return cv2.remap(bgr, xs, ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def color_jitter(bgr: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation in random order (torchvision's ColorJitter), on uint8 BGR."""
    img = bgr.astype(np.float32)
    for op in rng.permutation(3):
        strength = (cfg.brightness, cfg.contrast, cfg.saturation)[op]
        if strength == 0:
            continue
        factor = np.float32(rng.uniform(max(0.0, 1 - strength), 1 + strength))
        if op == 0:  # brightness: blend with black
            img = img * factor
        else:
            grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
            # contrast blends with the mean grey level, saturation with the per-pixel grey image
            other = np.float32(grey.mean()) if op == 1 else grey[:, :, None]
            img = other + factor * (img - other)
        img = np.clip(img, 0, 255)
    return np.rint(img).astype(np.uint8)


def random_erase(chw: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Erase one random rectangle of the normalised [3,H,W] array in place (torchvision's rule)."""
    if cfg.erase_prob == 0 or rng.uniform() >= cfg.erase_prob:
        return chw
    _, h, w = chw.shape
    log_ratio = (math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1]))
    for _ in range(10):
        target = h * w * rng.uniform(*cfg.erase_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        eh, ew = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < eh < h and 0 < ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            if cfg.erase_value == "noise":
                chw[:, top : top + eh, left : left + ew] = rng.standard_normal((3, eh, ew), dtype=np.float32)
            else:
                chw[:, top : top + eh, left : left + ew] = 0.0
            break
    return chw


def make_example(
    image_bgr: np.ndarray,
    preprocess_config: PreprocessConfig,
    rng: np.random.Generator | None = None,
    train: bool = False,
    augment: AugmentConfig | None = None,
) -> np.ndarray:
    """One image -> [3,S,S] float32 network input. train=False is exactly the runtime's preprocessing;
    train=True adds the augmentations of `augment` (default AugmentConfig(); prefer
    AugmentConfig.for_dataset so flips follow the data), drawing randomness only from `rng`."""
    bgr = check_frame(image_bgr)
    if not train:
        return normalize(resize_frame(bgr, preprocess_config), preprocess_config)
    if rng is None:
        raise ValueError("make_example(train=True) needs a seeded np.random.Generator")
    cfg = augment or AugmentConfig()
    if cfg.stroke or cfg.affine or cfg.elastic:
        bgr = handwriting(bgr, cfg, rng)
    if cfg.camera and rng.uniform() < cfg.camera:
        bgr = render_card_frame(bgr, rng, CameraConditions(), size=cfg.camera_size)
    img = random_crop(bgr, preprocess_config, cfg, rng)
    if cfg.hflip and rng.uniform() < 0.5:
        img = cv2.flip(img, 1)
    if cfg.brightness or cfg.contrast or cfg.saturation:
        img = color_jitter(img, cfg, rng)
    return random_erase(normalize(np.ascontiguousarray(img), preprocess_config), cfg, rng)
