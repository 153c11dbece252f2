"""Shared test helpers: small seeded checkpoints (random weights, or trained a few seconds on glyphs)
and the bundles exported from them.

A plain module (not a conftest): a test file imports what it needs (`from bundles import ...`: pytest
puts tests/ on sys.path for the test files there) and wraps it in its own session-scoped fixture, e.g.

    @pytest.fixture(scope="session")
    def bundle(tmp_path_factory):
        return export_small_bundle(tmp_path_factory)

`export_small_bundle` caches per process on its arguments, so several test files asking for the same
bundle in one pytest session export it once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# The small model most runtime tests use: conv4, 16 channels, 8 groups, 32x32 input -> 4x4 feature maps.
SMALL = {"backbone": "conv4", "image_size": 32, "width": 16, "groups": 8}

_BUNDLES: dict[tuple, Path] = {}


def make_model(
    backbone: str = "conv4",
    image_size: int = 32,
    width: int = 16,
    groups: int = 8,
    seed: int = 0,
    **config: Any,
):
    """A DMFNet (eval mode) with seeded random weights and randomised BatchNorm statistics.

    Identity BN statistics (mean 0, var 1, weight 1, bias 0) would hide a BN folding or ordering mistake
    in export, so every BatchNorm gets its own mean, variance, scale and shift. `width` is the conv4
    width; for resnet12 pass `widths=` in `config` (default: the paper's 64-160-320-640).
    """
    import torch
    from torch import nn

    from dmf_deploy.config import ModelConfig, PreprocessConfig, conv4_config
    from dmf_deploy.model import DMFNet

    if backbone == "conv4":
        cfg = conv4_config(image_size=image_size, width=width, groups=groups, **config)
    else:
        cfg = ModelConfig(
            backbone=backbone, preprocess=PreprocessConfig(image_size=image_size), groups=groups, **config
        )
    torch.manual_seed(seed)
    model = DMFNet(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                ch = module.num_features
                module.weight.copy_(0.5 + torch.rand(ch, generator=gen))
                module.bias.copy_(0.1 * torch.randn(ch, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(ch, generator=gen))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(ch, generator=gen))
    return model.eval()


def train_on_glyphs(model, steps: int, seed: int = 0, frame_size: int = 48, per_class: int = 10):
    """Briefly train the backbone (+ global classifier) to tell glyph classes apart; returns the model.

    Random weights give features in which every glyph looks alike (5-way accuracy at chance), so tests
    that need a model that recognises anything (unknown rejection, labels) train for a few seconds:
    plain cross-entropy of the spatially pooled global classifier over `model.config.num_classes` base
    glyph classes. The base classes come from their own GlyphSet seed (1000 + seed), so the classes tests
    enrol (other seeds) are unseen. One thread, seeded: the same machine gives the same weights.
    200 steps of a 16-wide conv4 take about 5 s on one core and reach ~80% 5-way 1-shot accuracy.
    """
    import torch
    import torch.nn.functional as F

    from dmf_deploy.preprocess import preprocess_frames
    from dmf_deploy.train.glyphs import GlyphSet

    n = model.config.num_classes
    glyphs = GlyphSet(n, 1000 + seed, frame_size)
    frames = [glyphs.render(c, i) for c in range(n) for i in range(per_class)]
    images = torch.from_numpy(preprocess_frames(frames, model.config.preprocess))
    labels = torch.arange(n).repeat_interleave(per_class)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(steps):
            idx = torch.randperm(len(images), generator=gen)[:64]
            logits = model.global_classifier(model.features(images[idx])).mean(dim=(2, 3))
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return model


def make_checkpoint(
    path: str | Path,
    backbone: str = "conv4",
    image_size: int = 32,
    width: int = 16,
    groups: int = 8,
    seed: int = 0,
    train_steps: int = 0,
    **config: Any,
) -> Path:
    """Write a checkpoint (see `make_model`; trained for `train_steps` if > 0) with `save_checkpoint`."""
    from dmf_deploy.checkpoint import save_checkpoint

    model = make_model(backbone, image_size, width, groups, seed, **config)
    if train_steps:
        train_on_glyphs(model, train_steps, seed)
    note = f"seed {seed}, " + (f"{train_steps} steps on glyphs" if train_steps else "random weights")
    return save_checkpoint(model, path, note=note)


def export_small_bundle(
    tmp_path_factory: Any,
    backbone: str = "conv4",
    image_size: int = 32,
    width: int = 16,
    groups: int = 8,
    seed: int = 0,
    solver: str = "dopri5",
    steps: int = 8,
    train_steps: int = 0,
    explain: bool = False,
    **config: Any,
) -> Path:
    """Export (once per process and argument set) a small bundle; returns the bundle folder.

    `tmp_path_factory` is pytest's session fixture. Export runs with check=False: the tests that use
    the bundle do their own comparisons against PyTorch. Without `explain` the optional explain.onnx is
    left out (it adds about half the export time; tests of explanations ask for it). The checkpoint lies
    beside the bundle (`checkpoint_of`). An export takes about 10 s (the ONNX exporter), so share
    bundles where you can.
    """
    from dmf_deploy.export.bundle import export_bundle  # the package does not re-export it (yet)

    key = (backbone, image_size, width, groups, seed, solver, steps, train_steps, explain)
    key += tuple(sorted(config.items()))
    cached = _BUNDLES.get(key)
    if cached is not None and (cached / "manifest.json").is_file():
        return cached
    root = Path(tmp_path_factory.mktemp(f"bundle-{backbone}-s{seed}"))
    ckpt = root / "model.pt"
    make_checkpoint(ckpt, backbone, image_size, width, groups, seed, train_steps, **config)
    out = export_bundle(ckpt, root / "bundle", solver=solver, steps=steps, check=False, explain=explain)
    _BUNDLES[key] = out
    return out


def checkpoint_of(bundle: Path) -> Path:
    """The checkpoint `export_small_bundle` wrote beside a bundle."""
    return Path(bundle).parent / "model.pt"


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """DESIGN.md: max|got - ref| / max|ref| over the whole [Q, N] score matrix."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())
