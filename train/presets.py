"""Training presets: the paper's settings for miniImageNet / tieredImageNet, and a CPU-sized Omniglot demo."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class TrainSettings:
    dataset: str = "glyphs"  # a dmf_deploy.train.datasets kind
    data_root: str | None = None
    backbone: str = "resnet12"
    width: int = 64  # conv4 channel width
    image_size: int = 84
    groups: int = 64
    kernel: int = 1
    solver: str = "rk4-38"  # the official code's: one 3/8-rule step
    steps: int = 1
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 6
    episodes_per_batch: int = 4
    episodes_per_epoch: int = 1200
    epochs: int = 95  # including warm-up
    warmup_epochs: int = 5
    lr: float = 0.35
    momentum: float = 0.9
    weight_decay: float = 5e-4
    val_way: int = 5
    val_shot: int = 1
    val_episodes: int = 600
    val_within_alphabet: bool = False
    rotations: bool = False
    crop: str = "pad"
    pad: int = 8
    pad_mode: str = "constant"
    color_jitter: float = 0.4
    erase_prob: float = 0.5
    within_alphabet: bool = False  # Omniglot: draw each training episode from one alphabet
    seed: int = 0
    workers: int = 2
    amp: bool = True  # CUDA only

    def replace(self, **changes: Any) -> TrainSettings:
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PRESETS: dict[str, TrainSettings] = {
    "mini-1shot": TrainSettings(dataset="mini-pickle", groups=64, k_shot=1, lr=0.35),
    "mini-5shot": TrainSettings(dataset="mini-pickle", groups=160, k_shot=5, val_shot=5, lr=0.35),
    "tiered-1shot": TrainSettings(dataset="tiered", groups=64, k_shot=1, lr=0.05),
    "tiered-5shot": TrainSettings(dataset="tiered", groups=320, k_shot=5, val_shot=5, lr=0.05),
    # The shipped demo model (dmf_deploy/assets/demo.pt) was trained with exactly this preset on one
    # H100 in about 4 minutes (benchmarks/gpu_session.sh); a 2-core CPU needs hours.
    "omniglot-demo": TrainSettings(
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
