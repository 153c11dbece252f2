"""Training presets: the paper's settings for miniImageNet / tieredImageNet, and a CPU-sized Omniglot demo.

The paper presets follow the official code (chmxu/Dynamic-Meta-filter), which produced the published
numbers; tests/test_presets.py checks them against its values, quoted with file and line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from dmf_deploy.config import ModelConfig

DROPBLOCK_RAMP_PASSES = 40000  # backbone passes over which dmf_deploy.backbones ramps the DropBlock rate
OFFICIAL_EVAL_SIZES = (92, 84)  # tieredImageNet's official test transform: resize to 92, centre-crop 84


@dataclass(frozen=True)
class TrainSettings:
    dataset: str = "glyphs"  # a dmf_deploy.train.datasets kind
    data_root: str | None = None
    backbone: str = "resnet12"
    width: int = 64  # conv4 channel width
    image_size: int = 84
    groups: int = 64
    kernel: int = 1
    dynamic_sampling: bool = True  # False: the paper's ablation, the plain 3x3 neighbourhood
    solver: str = "rk4-38"  # the official code's: one 3/8-rule step
    steps: int = 1
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 6
    episodes_per_batch: int = 4  # per optimizer step, all DDP ranks together
    episodes_per_epoch: int = 1200
    epochs: int = 95  # including warm-up
    warmup_epochs: int = 5
    lr: float = 0.35
    momentum: float = 0.9
    weight_decay: float = 5e-4
    val_way: int = 5
    val_shot: int = 1
    val_episodes: int = 600
    val_seed: int = 1
    # Validate (and maybe save best.pt) after epoch 1, every val_every-th epoch, every epoch after
    # val_all_after, and the last epoch. The official code: 10 and 60.
    val_every: int = 1
    val_all_after: int = 0
    val_within_alphabet: bool = False
    rotations: bool = False
    crop: str = "pad"  # training crop: "pad" (pad, random crop), "resized" (RandomResizedCrop) or "none"
    eval_crop_from: int | None = None  # evaluation: resize to this side, then centre-crop image_size
    pad: int = 8
    pad_mode: str = "constant"
    color_jitter: float = 0.4
    erase_prob: float = 0.5
    affine: float = 0.0  # handwriting distortions (train.augment.AugmentConfig): affine strength,
    elastic: float = 0.0  # elastic amplitude (fraction of the image side),
    stroke: float = 0.0  # probability of a stroke-width change
    camera: float = 0.0  # probability that a training image becomes a simulated webcam frame
    locate: str = "none"  # the model's frame rule (PreprocessConfig.locate): "drawing" for camera frames
    init: str | None = None  # checkpoint whose weights training starts from ("demo": the packaged one)
    within_alphabet: bool = False  # Omniglot: draw each training episode from one alphabet
    seed: int = 0
    workers: int = 2
    amp: bool = False  # bf16 autocast of the backbone (CUDA, or a CPU with bf16); the official code: fp32

    def replace(self, **changes: Any) -> TrainSettings:
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def validates_after(self, epoch: int) -> bool:
        """Whether validation runs after (1-based) `epoch`."""
        return (
            epoch == 1
            or epoch == self.epochs
            or epoch > self.val_all_after
            or (self.val_every > 0 and epoch % self.val_every == 0)
        )

    def validation_epochs(self) -> list[int]:
        return [e for e in range(1, self.epochs + 1) if self.validates_after(e)]

    def steps_per_epoch(self) -> int:
        return -(-self.episodes_per_epoch // self.episodes_per_batch)


# The official validation: 2000 episodes of seed 112 after epochs 1, 10, 20, ..., 60 and every epoch after.
_OFFICIAL_VALIDATION = {"val_episodes": 2000, "val_seed": 112, "val_every": 10, "val_all_after": 60}
# tieredImageNet: 5 warm-up + 80 epochs of 13,980 episodes, RandomResizedCrop training, 92 -> 84 test crop.
_TIERED = {
    "dataset": "tiered",
    "lr": 0.05,
    "epochs": 85,
    "episodes_per_epoch": 13980,
    "crop": "resized",
    "eval_crop_from": OFFICIAL_EVAL_SIZES[0],
    **_OFFICIAL_VALIDATION,
}


_OMNIGLOT_DEMO = TrainSettings(
    dataset="omniglot",
    backbone="conv4",
    width=64,
    image_size=56,
    groups=16,
    solver="dopri5",
    steps=8,
    n_way=20,
    k_shot=1,
    q_query=5,
    episodes_per_batch=4,
    episodes_per_epoch=700,
    epochs=18,
    warmup_epochs=2,
    lr=0.1,
    val_way=20,
    val_shot=1,
    val_episodes=150,
    val_within_alphabet=True,
    rotations=True,
    crop="pad",
    pad=4,
    pad_mode="replicate",
    color_jitter=0.0,
    erase_prob=0.0,
    within_alphabet=True,
    workers=7,
    amp=True,
)


PRESETS: dict[str, TrainSettings] = {
    "mini-1shot": TrainSettings(dataset="mini-pickle", groups=64, k_shot=1, lr=0.35, **_OFFICIAL_VALIDATION),
    "mini-5shot": TrainSettings(
        dataset="mini-pickle", groups=160, k_shot=5, val_shot=5, lr=0.35, **_OFFICIAL_VALIDATION
    ),
    "tiered-1shot": TrainSettings(groups=64, k_shot=1, **_TIERED),
    "tiered-5shot": TrainSettings(groups=320, k_shot=5, val_shot=5, **_TIERED),
    # The demo model's first stage (0.1.0's demo.pt): exactly this preset, on one H100 in about 4
    # minutes (benchmarks/gpu_session.sh); a 2-core CPU needs about 2 hours.
    "omniglot-demo": _OMNIGLOT_DEMO,
    # Its second stage (dmf_deploy/assets/README.md): from stage one's best.pt (--init), more epochs
    # with handwriting distortions at a lower rate, bf16 on a CPU.
    "omniglot-demo-finetune": _OMNIGLOT_DEMO.replace(
        episodes_per_epoch=400,
        epochs=12,
        warmup_epochs=1,
        lr=0.03,
        affine=0.7,
        elastic=0.02,
        stroke=0.3,
        workers=0,
    ),
    # Its third stage, the 0.3 demo model: from the second stage's weights, 60% of the images become
    # simulated webcam frames (dmf_deploy.camera_sim), and the model finds the drawing in the frame.
    "omniglot-demo-camera": _OMNIGLOT_DEMO.replace(
        episodes_per_epoch=400,
        epochs=6,
        warmup_epochs=0,
        lr=0.03,
        affine=0.7,
        elastic=0.02,
        stroke=0.3,
        camera=0.6,
        locate="drawing",
        val_episodes=40,
        workers=1,
    ),
    "glyphs-smoke": TrainSettings(
        dataset="glyphs",
        backbone="conv4",
        width=32,
        image_size=32,
        groups=8,
        solver="exact",
        steps=1,
        n_way=5,
        k_shot=1,
        q_query=4,
        episodes_per_batch=2,
        episodes_per_epoch=40,
        epochs=4,
        warmup_epochs=1,
        lr=0.05,
        val_episodes=60,
        crop="pad",
        pad=2,
        pad_mode="replicate",
        color_jitter=0.0,
        erase_prob=0.0,
        workers=0,
    ),
}


def resolved_settings(settings: TrainSettings) -> dict[str, Any]:
    """The settings and what follows from them for one run (what `dmf-train fit --dry-run` prints)."""
    steps = settings.steps_per_epoch()
    validations = settings.validation_epochs()
    # Backbone passes, as the official ResNet-12 counts them: one per step, one per 4 validation episodes.
    per_validation = -(-settings.val_episodes // settings.episodes_per_batch)
    passes = settings.epochs * steps + len(validations) * per_validation
    drop_rate = ModelConfig.drop_rate if settings.backbone == "resnet12" else 0.0
    return {
        **asdict(settings),
        "steps_per_epoch": steps,
        "total_steps": settings.epochs * steps,
        "warmup_steps": settings.warmup_epochs * steps,
        "validation_epochs": _ranges(validations),
        "dropblock_passes": passes if drop_rate else 0,
        "final_drop_rate": round(drop_rate * min(1.0, passes / DROPBLOCK_RAMP_PASSES), 6),
    }


def _ranges(numbers: list[int]) -> str:
    """[1, 10, 20, 60, 61, 62] -> "1,10,20,60-62"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
