"""ModelConfig: everything needed to rebuild a DMF network and feed it, as plain JSON-able data.

Torch-free on purpose: the runtime reads it from a bundle's manifest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

BACKBONES = ("resnet12", "conv4")
FIXED_SOLVERS = ("euler", "midpoint", "rk4", "rk4-38", "dopri5")
ADAPTIVE_SOLVERS = ("dopri5-adaptive",)
SOLVERS = (*FIXED_SOLVERS, *ADAPTIVE_SOLVERS, "exact")
EXPORTABLE_SOLVERS = (*FIXED_SOLVERS, "exact")  # an adaptive solver's step count depends on the data
# The one default step count for a fixed-step solver: fixed-step dopri5 x 8 equals the closed form to
# within float32 rounding (docs/solvers.md), so more steps buy nothing.
DEFAULT_STEPS = 8
RESIZE_RULES = ("stretch", "center-crop")
# "none": the whole frame by the resize rule; "drawing": find the drawing in a camera frame and redraw it
# black on white, framed as in training (dmf_deploy/drawing.py).
LOCATE_RULES = ("none", "drawing")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Solver:
    """A solver choice, checked once where it enters (config, CLI, `episode_scores`, export).

    `name` is one of SOLVERS; `steps` the fixed-step count (an adaptive solver chooses its own steps
    and ignores it, `exact` is one closed-form step). `exact` exists only for kernel 1.
    """

    name: str
    steps: int

    @property
    def adaptive(self) -> bool:
        return self.name in ADAPTIVE_SOLVERS

    @classmethod
    def checked(cls, name: str, steps: int, kernel: int) -> Solver:
        """The solver `name` x `steps` for a head of `kernel`; ValueError naming what is wrong."""
        if name not in SOLVERS:
            raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if name == "exact" and kernel != 1:
            raise ValueError(f"the 'exact' solver exists only for kernel 1; this model has k = {kernel}")
        return cls(name, steps)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a frame becomes a network input. The model owns this; training, export and runtime share it."""

    image_size: int = 84
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color: str = "rgb"  # channel order the network expects
    resize: str = "stretch"  # "stretch": resize to size x size; "center-crop": shorter side, then crop
    # Resize to crop_from (instead of image_size) by the rule above, then keep the central image_size
    # square: tieredImageNet's official test transform is 92 then 84. None: no margin is cut.
    crop_from: int | None = None
    interpolation: str = "linear"  # cv2.INTER_LINEAR
    scale: float = 1.0 / 255.0
    locate: str = "none"  # one of LOCATE_RULES; "drawing" replaces the resize rule and crop_from

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.color != "rgb":
            raise ValueError(f"only colour order 'rgb' is supported, got {self.color!r}")
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, got {self.resize!r}")
        if self.crop_from is not None and self.crop_from < self.image_size:
            raise ValueError(f"crop_from must be >= image_size {self.image_size}, got {self.crop_from}")
        if self.locate not in LOCATE_RULES:
            raise ValueError(f"locate must be one of {LOCATE_RULES}, got {self.locate!r}")
        if self.locate != "none" and self.crop_from is not None:
            raise ValueError("locate='drawing' frames the drawing itself; it takes no crop_from")
        if self.interpolation not in ("linear", "area"):
            raise ValueError(f"interpolation must be 'linear' or 'area', got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std positive")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet12"
    widths: tuple[int, ...] = (64, 160, 320, 640)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    groups: int = 64
    kernel: int = 1
    num_classes: int = 64  # base classes of the global classifier (training only)
    solver: str = "rk4-38"  # the solver the checkpoint was trained with
    steps: int = 1
    rtol: float = 1e-2
    atol: float = 1e-2
    drop_rate: float = 0.1
    dropblock_size: int = 5
    # False: the meta-filter reads the plain 3x3 neighbourhood (the paper's "no dynamic sampling"
    # ablation): no offset conv, and the bank's support_offset is all zeros.
    dynamic_sampling: bool = True
    # Official-code compatibility (chmxu/Dynamic-Meta-filter), set when importing its checkpoints.
    official_score_scale: bool = False  # scores times hw/((h+2)(w+2)) from the padded 1x1 conv
    official_filter_order: bool = False  # k=3 filter read with reshape(-1, k*k) in memory order

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone == "resnet12" and len(self.widths) != 4:
            raise ValueError(f"resnet12 needs 4 widths, got {self.widths}")
        if self.backbone == "conv4" and len(self.widths) != 4:
            raise ValueError(f"conv4 needs 4 widths, got {self.widths}")
        if self.kernel not in (1, 3):
            raise ValueError(f"kernel must be 1 or 3, got {self.kernel}")
        if not isinstance(self.dynamic_sampling, bool):
            raise ValueError(f"dynamic_sampling must be true or false, got {self.dynamic_sampling!r}")
        if self.groups < 1 or self.channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide the feature channels {self.channels}")
        Solver.checked(self.solver, self.steps, self.kernel)

    @property
    def channels(self) -> int:
        return self.widths[-1]

    @property
    def feature_size(self) -> int:
        """Side of the final feature map: three ceil-mode 2x2 pools, none after the last stage."""
        side = self.preprocess.image_size
        for _ in range(3):
            side = math.ceil(side / 2)
        return side

    @property
    def filter_channels(self) -> int:
        return self.groups * self.kernel * self.kernel

    def score_scale(self, map_size: tuple[int, int] | None = None) -> float:
        """hw/((h+2)(w+2)) for official checkpoints, of the actual score map (default: the configured one)."""
        if not self.official_score_scale:
            return 1.0
        h, w = (self.feature_size, self.feature_size) if map_size is None else map_size
        return (h * w) / ((h + 2) * (w + 2))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["widths"] = list(self.widths)
        data["preprocess"]["mean"] = list(self.preprocess.mean)
        data["preprocess"]["std"] = list(self.preprocess.std)
        if self.preprocess.crop_from is None:
            del data["preprocess"]["crop_from"]  # manifests and fingerprints of models without it unchanged
        if self.preprocess.locate == "none":
            del data["preprocess"]["locate"]  # likewise for every model that takes the whole frame
        if self.dynamic_sampling:
            del data["dynamic_sampling"]  # likewise for every model with the paper's sampling
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        data = dict(data)
        pre = dict(data.pop("preprocess", {}))
        for key in ("mean", "std"):
            if key in pre:
                pre[key] = tuple(float(v) for v in pre[key])
        if "widths" in data:
            data["widths"] = tuple(int(v) for v in data["widths"])
        return cls(preprocess=PreprocessConfig(**pre), **data)

    def architecture_dict(self) -> dict[str, Any]:
        """What defines the function the weights compute, minus the solver (see the gallery fingerprint)."""
        data = self.to_dict()
        for key in ("solver", "steps", "rtol", "atol", "drop_rate", "dropblock_size", "num_classes"):
            data.pop(key)
        return data


def conv4_config(image_size: int = 84, width: int = 64, **overrides: Any) -> ModelConfig:
    """The small CPU backbone: four 3x3 conv-BN-ReLU blocks of `width` channels."""
    pre = overrides.pop("preprocess", PreprocessConfig(image_size=image_size))
    overrides.setdefault("groups", min(64, width))
    return ModelConfig(backbone="conv4", widths=(width,) * 4, preprocess=pre, **overrides)
