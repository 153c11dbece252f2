"""Checkpoints: official chmxu/Dynamic-Meta-filter files, our own format, and files we must refuse.

The official forward is reimplemented here from the paper and the official code (chmxu/Dynamic-Meta-filter:
rk4 means one 3/8-rule step, the padded 1x1 meta-classifier scales scores) with plain functional ops on
the state dict, so that it shares no code with `dmf_deploy.head` or `dmf_deploy.backbones`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bundles import (  # tests/bundles.py
    OFFICIAL_CLASSES,
    OFFICIAL_WIDTHS,
    add_official_head,
    official_base_state,
    relative_error,
    save_official,
)
from optional_imports import torchvision_or_skip
from torch import nn

import dmf_deploy
from dmf_deploy import CheckpointError, load_checkpoint, save_checkpoint
from dmf_deploy.checkpoint import DEMO_PATH, load_checkpoint_with_metadata
from dmf_deploy.config import conv4_config

torchdiffeq = pytest.importorskip("torchdiffeq")
torchvision = torchvision_or_skip()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors (tests/conftest.py)


WIDTHS = OFFICIAL_WIDTHS
C = WIDTHS[-1]
IMAGE = 32  # 32x32 input -> 4x4 feature maps: small enough for CPU, big enough for offsets to matter
NUM_CLASSES = OFFICIAL_CLASSES
N_WAY, SHOTS, QUERIES = 3, 2, 3

# Our float32 model (the product dtype) against a float64 reference: what remains is the float32
# rounding of 12 conv+BN layers, the offset conv and the head, measured at 8e-8..4e-7 of the largest
# score on these inputs. 1e-5 leaves >20x headroom, while the modelling differences checked below move
# the scores by far more (tap-major k = 3 filter: 2e-2; the score scale 16/36: >1).
REL_TOL = 1e-5


# ----- the official forward, independently ---------------------------------------------------------
def ref_backbone(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ResNet-12: per stage 3x(3x3 conv, BN, LeakyReLU 0.1) with a 1x1 conv+BN shortcut added before the
    last LeakyReLU, then MaxPool(2, ceil_mode=True) except after the last stage."""

    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(
            t, sd[name + "running_mean"], sd[name + "running_var"], sd[name + "weight"], sd[name + "bias"],
            training=False, eps=1e-5,
        )  # fmt: skip

    for i in range(1, 5):
        p = f"base.layer{i}.0."
        out = F.leaky_relu(bn(F.conv2d(x, sd[p + "conv1.weight"], padding=1), p + "bn1."), 0.1)
        out = F.leaky_relu(bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), p + "bn2."), 0.1)
        out = bn(F.conv2d(out, sd[p + "conv3.weight"], padding=1), p + "bn3.")
        out = F.leaky_relu(out + bn(F.conv2d(x, sd[p + "downsample.0.weight"]), p + "downsample.1."), 0.1)
        x = F.max_pool2d(out, 2, ceil_mode=True) if i < 4 else out
    return x


class OfficialOdeFunc(nn.Module):
    """dX/dt = ReLU(dynconv(X; filter)), state (X, filter) with d(filter)/dt = 0, as the official code.

    dynconv: nn.Unfold gives, per channel c and position p, the k*k window values (tap t = ky*k + kx);
    channels are split into G contiguous groups of R; each (sample, group, position) row of the
    filter, read from memory as filter.reshape(-1, k*k) (official order), weights the window by bmm.
    """

    def __init__(self, groups: int, kernel: int, memory_order: bool = True) -> None:
        super().__init__()
        self.groups, self.kk, self.memory_order = groups, kernel * kernel, memory_order
        self.unfold = nn.Unfold(kernel_size=(kernel, kernel), padding=(kernel - 1) // 2)

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        x, filt = state
        p, c, h, w = x.shape
        g, kk = self.groups, self.kk
        r = c // g
        windows = self.unfold(x).reshape(p, c, kk, h * w)  # [P, C, kk, hw]
        windows = windows.reshape(p, g, r, kk, h * w).permute(0, 1, 4, 2, 3)  # [P, G, hw, R, kk]
        windows = windows.reshape(p * g * h * w, r, kk)
        if self.memory_order:
            rows = filt.reshape(-1, kk)  # row (n, g, p) = kk consecutive floats of the [P, G*kk, h, w] map
        else:  # tap-major: channel g*kk + t (our own k = 3 models); only to show the test tells them apart
            rows = filt.reshape(p, g, kk, h * w).permute(0, 1, 3, 2).reshape(-1, kk)
        out = torch.bmm(windows, rows.unsqueeze(2))  # [P*G*hw, R, 1]
        out = out.reshape(p, g, h * w, r).permute(0, 1, 3, 2).reshape(p, c, h, w)
        return F.relu(out), torch.zeros_like(filt)


def ref_head_scores(
    sd: dict[str, torch.Tensor],
    query: torch.Tensor,
    protos: torch.Tensor,
    groups: int,
    kernel: int,
    memory_order: bool = True,
    method: str = "rk4",
) -> tuple[torch.Tensor, torch.Tensor]:
    """[Q, N] official scores and the deformable sampling positions [P, 9, 2, h, w] (for the checks)."""
    from torchvision.ops import deform_conv2d

    q, c, h, w = query.shape
    n = protos.shape[0]
    qs = query.repeat_interleave(n, dim=0)  # pair (i, j) at row i*N + j
    ss = protos.repeat(q, 1, 1, 1)
    offset = F.conv2d(torch.cat([qs, ss], dim=1), sd["dw_gen.off_conv.weight"], padding=2)  # query first
    filt = torch.sigmoid(deform_conv2d(ss, offset, sd["dw_gen.kernel_conv.weight"], padding=(1, 1)))
    func = OfficialOdeFunc(groups, kernel, memory_order)
    t = torch.tensor([0.0, 1.0], dtype=query.dtype)
    # odeint(..., method="rk4") with no step size: one step of torchdiffeq's rk4 (the 3/8 rule).
    x1 = torchdiffeq.odeint(func, (qs, filt), t, method=method)[0][1]
    # Meta-classifier: a 1x1 conv with padding=1 whose weight is the spatial mean of the L2-normalised
    # prototype, then the mean over the zero-bordered (h+2)x(w+2) map.
    weight = F.normalize(ss, p=2, dim=1, eps=1e-12).mean(dim=(2, 3), keepdim=True)  # [P, C, 1, 1]
    maps = F.conv2d(x1.reshape(1, -1, h, w), weight, groups=q * n, padding=1)  # [1, P, h+2, w+2]
    scores = maps.mean(dim=(2, 3)).reshape(q, n)
    shifts = torch.tensor([(ty - 1, tx - 1) for ty in range(3) for tx in range(3)], dtype=query.dtype)
    base = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).to(query.dtype)
    positions = base[None, None] + shifts[None, :, :, None, None] + offset.reshape(-1, 9, 2, h, w)
    return scores, positions


def ref_episode(
    sd64: dict[str, torch.Tensor], feats: torch.Tensor, labels: torch.Tensor, groups: int, kernel: int, **kw
) -> tuple[torch.Tensor, torch.Tensor]:
    """feats: ref_backbone of cat[support, query]; a prototype is the mean of its class's shots."""
    fs, fq = feats[: len(labels)], feats[len(labels) :]
    protos = torch.stack([fs[labels == j].mean(0) for j in range(int(labels.max()) + 1)])
    return ref_head_scores(sd64, fq, protos, groups, kernel, **kw)


# ----- the episode: classes that really differ (on random images all scores look alike) ---------------
@pytest.fixture(scope="module")
def episode() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    patterns = F.interpolate(torch.randn(N_WAY, 3, 8, 8, generator=gen), size=IMAGE, mode="bilinear")

    def noisy(idx: torch.Tensor) -> torch.Tensor:
        return patterns[idx] + 0.3 * torch.randn(len(idx), 3, IMAGE, IMAGE, generator=gen)

    labels = torch.tensor([2, 0, 1, 0, 2, 1])  # SHOTS per class, shuffled: prototypes must follow labels
    query_labels = torch.arange(N_WAY).repeat_interleave(QUERIES // N_WAY + 1)[:QUERIES]
    return noisy(labels), labels, noisy(query_labels)


def double(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def base_state(episode) -> tuple[dict[str, torch.Tensor], float, torch.Tensor]:
    """Official backbone weights, the RMS of their features, and the reference features (float64)."""
    sd = official_base_state(seed=11)
    support, _, query = episode
    with torch.inference_mode():
        feats = ref_backbone(double(sd), torch.cat([support, query]).double())
    return sd, float(feats.pow(2).mean().sqrt()), feats


@pytest.mark.parametrize(
    ("kernel", "groups", "prefix"),
    [(1, 64, ""), (3, 64, ""), (1, 160, "module.")],
    ids=["k1-G64", "k3-G64", "k1-G160-module-prefix"],
)
def test_official_checkpoint_matches_official_forward(tmp_path, episode, base_state, kernel, groups, prefix):
    sd, rms, ref_feats = base_state
    state = add_official_head(sd, groups, kernel, rms, seed=100 + kernel)
    path = save_official(tmp_path / "best_model.pth.tar", state, prefix)
    model = load_checkpoint(path)

    cfg = model.config
    assert (cfg.backbone, cfg.widths, cfg.groups, cfg.kernel) == ("resnet12", WIDTHS, groups, kernel)
    assert (cfg.solver, cfg.steps, cfg.num_classes) == ("rk4-38", 1, NUM_CLASSES)
    assert cfg.official_score_scale and cfg.official_filter_order == (kernel == 3)
    assert not model.training

    support, labels, query = episode
    with torch.inference_mode():
        got = model.episode_scores(support, labels, query)  # float32, the checkpoint's own solver
        sd64 = double(state)
        ref, positions = ref_episode(sd64, ref_feats, labels, groups, kernel)
    assert got.shape == (QUERIES, N_WAY) and got.dtype == torch.float32

    # The test is only as strong as its offsets: some samples move by more than a pixel, some fall
    # outside the 4x4 map (reading zeros), and some stay inside.
    h = w = query.shape[-1] // 8
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).double()
    shifts = torch.tensor([(ty - 1, tx - 1) for ty in range(3) for tx in range(3)], dtype=torch.float64)
    offsets = positions - grid[None, None] - shifts[None, :, :, None, None]
    assert (offsets.abs() > 1).float().mean() > 0.2  # many move by more than a pixel
    # DCN v1 reads zero where a coordinate is <= -1 or >= the side (no bilinear corner inside the map)
    outside = (positions[:, :, 0] <= -1) | (positions[:, :, 0] >= h) | (positions[:, :, 1] <= -1)
    outside |= positions[:, :, 1] >= w
    assert outside.float().mean() > 0.05 and (~outside).float().mean() > 0.3

    err = relative_error(got, ref)
    assert err < REL_TOL, f"official forward mismatch: relative error {err:.2e}"

    # The score scale hw/((h+2)(w+2)) = 16/36 is in the reference: the unscaled mean would fail.
    assert relative_error(got / cfg.score_scale((h, w)), ref) > 100 * REL_TOL
    if kernel == 3:
        # Reading the filter tap-major instead of in memory order changes the official scores by far
        # more than the tolerance: the check has teeth. (Classic rk4 against the 3/8 rule is not a
        # useful probe here: these features are mostly positive, the ODE is then nearly linear, and
        # the two 4th-order methods agree on linear problems; tests/test_solvers.py separates them.)
        with torch.inference_mode():
            tap_major, _ = ref_episode(sd64, ref_feats, labels, groups, kernel, memory_order=False)
        assert relative_error(tap_major, ref) > 100 * REL_TOL


def test_round_trip_through_our_format_is_bit_identical(tmp_path, episode, base_state):
    sd, rms, _ = base_state
    official = load_checkpoint(
        save_official(tmp_path / "official.pth.tar", add_official_head(sd, 64, 3, rms, 5))
    )
    ours = save_checkpoint(official, tmp_path / "ours.pt", note="round trip")
    assert isinstance(ours, Path) and ours.is_file()
    reloaded, metadata = load_checkpoint_with_metadata(os.fspath(ours))
    assert reloaded.config == official.config and metadata["note"] == "round trip"
    support, labels, query = episode
    with torch.inference_mode():
        a = official.episode_scores(support, labels, query)
        b = reloaded.episode_scores(support, labels, query)
    # Same weights, same config, same ops on the same CPU: nothing may change, not even the last bit.
    assert torch.equal(a, b)
    for key, value in official.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


# ----- files that must be refused, clearly ---------------------------------------------------------
def test_truncated_files_are_refused(tmp_path):
    # Every official key, with its tensors cut to a few values: the pickle header (where truncation
    # trips the unpickler in the most varied ways) is that of a real file, the data part just shorter.
    sd = add_official_head(official_base_state(seed=3), 64, 1, feature_rms=1.0, seed=4)
    small = {k: v.flatten()[:3].clone() if v.ndim else v for k, v in sd.items()}
    legacy = io.BytesIO()
    torch.save({"state_dict": small, "acc": 0.5, "epoch": 1}, legacy, _use_new_zipfile_serialization=False)
    save_checkpoint(dmf_deploy.DMFNet(conv4_config(32, width=16)), tmp_path / "ours.pt")
    for fmt, data in (("legacy", legacy.getvalue()), ("ours-zip", (tmp_path / "ours.pt").read_bytes())):
        # Cut inside the pickle header (first bytes), inside the tensor data, and one byte short.
        for cut in (0, 1, 3, 18, 57, 150, 400, 777, 1500, len(data) // 2, len(data) - 1):
            path = tmp_path / f"cut_{fmt}_{cut}.pt"
            path.write_bytes(data[:cut])
            with pytest.raises(CheckpointError) as info:
                load_checkpoint(path)
            assert str(path) in str(info.value), (fmt, cut)
        path = tmp_path / f"half_{fmt}.pt"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_checkpoint(path)


def test_other_architecture_is_refused(tmp_path):
    resnet18 = torchvision.models.resnet18(weights=None, num_classes=10)
    path = tmp_path / "resnet18.pth.tar"
    torch.save({"state_dict": resnet18.state_dict(), "acc": 0.9, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="neither a dmf-deploy nor an official DMF checkpoint") as info:
        load_checkpoint(path)
    assert "missing keys" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "victim",
    [
        "base.layer3.0.bn2.running_var",
        "base.layer2.0.num_batches_tracked",  # the block-level counter of the official BasicBlock
        "dw_gen.off_conv.weight",  # renamed internally; the error must still use the file's spelling
        "global_clasifier.bias",
    ],
)
def test_missing_key_is_named(tmp_path, victim):
    sd = add_official_head(official_base_state(seed=3), 64, 1, feature_rms=1.0, seed=4)
    del sd[victim]
    path = save_official(tmp_path / "broken.pth.tar", sd)
    with pytest.raises(CheckpointError, match="missing keys") as info:
        load_checkpoint(path)
    assert victim in str(info.value)


class NotAWeight:
    """Any user class: unpickling it would import and run code, so weights_only must refuse it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_pickle_that_weights_only_refuses(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "extra": NotAWeight()}, path)
    with pytest.raises(CheckpointError, match=r"weights_only=True\) refuses") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_reserved_demo_name():
    if DEMO_PATH.exists():  # shipped: "demo" loads it, like any checkpoint
        model = load_checkpoint("demo")
        assert isinstance(model, dmf_deploy.DMFNet) and not model.training
        return
    with pytest.raises(CheckpointError, match="demo checkpoint is not installed") as info:
        load_checkpoint("demo")
    assert str(DEMO_PATH) in str(info.value)


def test_missing_path_is_named(tmp_path):
    path = tmp_path / "nowhere" / "best.pt"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


# ----- atomic saving ---------------------------------------------------------------------------------
def test_save_is_atomic(tmp_path, monkeypatch):
    model = dmf_deploy.DMFNet(conv4_config(32, width=16, groups=4)).eval()
    target = tmp_path / "best.pt"
    save_checkpoint(model, target, epoch=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]  # no temporary file left behind
    old = target.read_bytes()
    assert load_checkpoint(target).config == model.config

    # Replacing an existing file: a writer that dies half-way must leave the old file untouched.
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise OSError("No space left on device")

    with torch.no_grad():
        model.head.off_conv.weight.mul_(2.0)
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model, target, epoch=2)
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]

    # A completed write replaces it.
    save_checkpoint(model, target, epoch=2)
    assert target.read_bytes() != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    assert torch.equal(load_checkpoint(target).head.off_conv.weight, model.head.off_conv.weight)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("preprocess.image_size", lambda c: c["preprocess"].update(image_size=100_000)),
        ("widths", lambda c: c.update(widths=[12_000, 12_000, 12_000, 12_000], groups=1)),
        ("num_classes", lambda c: c.update(num_classes=10**9)),
    ],
)
def test_a_config_that_asks_for_gigabytes_is_refused_before_the_model_is_built(tmp_path, field, change):
    """Issue 29, item 8: a few-KB checkpoint whose config names a huge model (image_size 100000: a
    240 GB allocation; widths of 12,000: 5.6 GB and 11 s) is refused at load, naming the field."""
    path = tmp_path / "small.pt"
    save_checkpoint(dmf_deploy.DMFNet(conv4_config(32, width=16, groups=4)), path)
    payload = torch.load(path, weights_only=True)
    change(payload["config"])
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"asks for {field} = .*; at most"):
        load_checkpoint(path)
