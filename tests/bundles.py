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

import json
import math
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pytest

from dmf_deploy.config import ModelConfig, conv4_config
from dmf_deploy.export import profiles
from dmf_deploy.manifest import GRAPH_NAMES, EngineSpec, Manifest, graph_io, read_manifest, sha256_file
from dmf_deploy.runtime.gallery import Gallery

if TYPE_CHECKING:
    import onnxruntime
    import torch

    from dmf_deploy.runtime.app.commands import Session

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


def relative_error(got: Any, ref: Any) -> float:
    """max|got - ref| / max|ref| over the whole [Q, N] score matrix: what "relative" means everywhere.

    numpy arrays or CPU torch tensors; computed in float64.
    """
    got, ref = (np.asarray(x.detach() if hasattr(x, "detach") else x, np.float64) for x in (got, ref))
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# ----- an official (chmxu/Dynamic-Meta-filter) checkpoint, built from random weights --------------------

OFFICIAL_WIDTHS = (64, 160, 320, 640)  # the official ResNet-12
OFFICIAL_CLASSES = 64  # global classifier rows
OFFICIAL_C = OFFICIAL_WIDTHS[-1]  # feature channels


def _bn(sd: dict[str, torch.Tensor], prefix: str, ch: int, gen: torch.Generator) -> None:
    """Randomised BatchNorm statistics: identity stats (mean 0, var 1) would hide a BN mix-up."""
    import torch

    sd[prefix + "weight"] = 0.5 + torch.rand(ch, generator=gen)
    sd[prefix + "bias"] = 0.1 * torch.randn(ch, generator=gen)
    sd[prefix + "running_mean"] = 0.1 * torch.randn(ch, generator=gen)
    sd[prefix + "running_var"] = 0.5 + 1.5 * torch.rand(ch, generator=gen)
    sd[prefix + "num_batches_tracked"] = torch.tensor(int(torch.randint(1, 10**5, (1,), generator=gen)))


def official_base_state(seed: int) -> dict[str, torch.Tensor]:
    """The official ResNet-12 and global classifier, random weights, under the official key names."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    chans = (3, *OFFICIAL_WIDTHS)
    for i in range(4):
        pre, cin, cout = f"base.layer{i + 1}.0.", chans[i], chans[i + 1]
        for j, fan_in in ((1, cin), (2, cout), (3, cout)):
            sd[f"{pre}conv{j}.weight"] = torch.randn(cout, fan_in, 3, 3, generator=gen) * math.sqrt(
                2.0 / (9 * fan_in)
            )
            _bn(sd, f"{pre}bn{j}.", cout, gen)
        sd[f"{pre}downsample.0.weight"] = torch.randn(cout, cin, 1, 1, generator=gen) / math.sqrt(cin)
        _bn(sd, f"{pre}downsample.1.", cout, gen)
        # The official BasicBlock registers its own counter (DropBlock warm-up) at block level.
        sd[f"{pre}num_batches_tracked"] = torch.tensor(40000 + i)
    weight = torch.randn(OFFICIAL_CLASSES, OFFICIAL_C, 1, 1, generator=gen)
    sd["global_clasifier.weight"] = weight / math.sqrt(OFFICIAL_C)  # sic: the official spelling
    sd["global_clasifier.bias"] = 0.1 * torch.randn(OFFICIAL_CLASSES, generator=gen)
    return sd


def add_official_head(
    sd: dict[str, torch.Tensor], groups: int, kernel: int, feature_rms: float, seed: int
) -> dict[str, torch.Tensor]:
    """dw_gen weights scaled to the features: offsets of about 1.5 px (many past the 4x4 map's edge)
    and pre-sigmoid filters of about 2 (sigmoid neither flat nor saturated)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = dict(sd)
    sd["dw_gen.off_conv.weight"] = torch.randn(18, 2 * OFFICIAL_C, 5, 5, generator=gen) * (
        1.5 / (feature_rms * math.sqrt(2 * OFFICIAL_C * 25))
    )
    taps = groups * kernel * kernel
    sd["dw_gen.kernel_conv.weight"] = torch.randn(taps, OFFICIAL_C, 3, 3, generator=gen) * (
        2.0 / (feature_rms * math.sqrt(9 * OFFICIAL_C))
    )
    return sd


def save_official(path: Path, state: dict[str, torch.Tensor], prefix: str = "") -> Path:
    import torch

    payload = {"state_dict": {prefix + k: v for k, v in state.items()}, "acc": 0.6789, "epoch": 87}
    torch.save(payload, path, _use_new_zipfile_serialization=False)  # torch 1.4 wrote the legacy format
    return path


# ----- small galleries without a bundle (fake banks: any function of the prototype will do) ---------------

FP = "a1b2c3d4e5f6" + "0" * 52
FEATURE_SHAPE = (8, 3, 3)
BANK_SHAPES = {"support_offset": (18, 3, 3), "tap_projections": (9, 4, 3, 3), "class_weight": (8,)}


def fake_bank(prototype: np.ndarray) -> dict[str, np.ndarray]:
    """A deterministic stand-in for support.onnx: any function of the prototype will do here."""
    p = prototype.astype(np.float32)
    return {
        "support_offset": np.concatenate([p, p, p[:2]]),
        "tap_projections": np.stack([p[:4] * (t + 1) for t in range(9)]),
        "class_weight": p.mean(axis=(1, 2)),
    }


def enroll(g: Gallery, name: str, feats: np.ndarray, frame: np.ndarray | None = None) -> int:
    """What the Recognizer does: add the shots, then set the bank computed from the new prototype."""
    row = g.add_shots(name, feats.sum(axis=0), len(feats), frame)
    g.set_bank(row, fake_bank(g.prototype(row)))
    return row


def new_gallery(description: str = "conv4 test model") -> Gallery:
    return Gallery(FP, FEATURE_SHAPE, BANK_SHAPES, description)


def filled(n: int, seed: int = 0, thumbs: bool = True) -> Gallery:
    rng = np.random.default_rng(seed)
    g = new_gallery()
    for i in range(n):
        frame = rng.integers(0, 256, (48 + i, 80, 3), dtype=np.uint8) if thumbs and i % 2 == 0 else None
        enroll(g, f"class {i}", rng.standard_normal((1 + i % 3, *FEATURE_SHAPE)).astype(np.float32), frame)
    return g


def snapshot(g: Gallery) -> dict:
    return {
        "names": g.names,
        "counts": g.counts.copy(),
        "sums": g.feature_sums.copy(),
        "banks": {k: v.copy() for k, v in g.bank_arrays().items()},
        "thumbs": [g.thumbnail(n) for n in g.names],
        "stamps": [g.timestamps(n) for n in g.names],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["names"] == b["names"]
    assert a["thumbs"] == b["thumbs"]
    assert a["stamps"] == b["stamps"]
    for key in ("counts", "sums"):
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key])
    assert a["banks"].keys() == b["banks"].keys()
    for key in a["banks"]:
        assert a["banks"][key].dtype == b["banks"][key].dtype
        assert np.array_equal(a["banks"][key], b["banks"][key])


def complete_banks(g: Gallery) -> Gallery:
    """What the Recognizer does at open: compute the banks the gallery lacks (here with fake_bank)."""
    for name in g.missing_banks:
        row = g.index(name)
        g.set_bank(row, fake_bank(g.prototype(row)), touch=False)
    return g


def saved(g: Gallery, path: Path) -> Path:
    """Save and close: the file (one file, its WAL checkpointed) and its bank cache are free to reopen."""
    g.save(path)
    g.close()
    return path


def save_v2(g: Gallery, path: Path, version: int = 2) -> Path:
    """Write `g` as dmf-deploy 0.2 wrote galleries (format version 2, one .npz; version 1 without
    bank_dtypes): the runtime still reads them, and the hostile-file tests of that reader build on it."""
    header = {
        "format": "dmf-gallery",
        "format_version": version,
        "fingerprint": g.fingerprint,
        "model_description": g.model_description,
        "feature_shape": list(g.feature_shape),
        "feature_dtype": "float32",
        "bank_shapes": {k: list(s) for k, s in g.bank_shapes.items()},
        "bank_dtypes": g.bank_dtypes,
        "classes": [
            {"name": n, "shots": int(c), "created": g.timestamps(n)[0], "updated": g.timestamps(n)[1]}
            for n, c in zip(g.names, g.counts)
        ],
    }
    if version == 1:
        del header["bank_dtypes"]
    thumbs = [g.thumbnail(n) or b"" for n in g.names]
    offsets = np.zeros(len(g) + 1, np.int64)
    offsets[1:] = np.cumsum([len(t) for t in thumbs], dtype=np.int64)
    savez(
        path,
        header=np.frombuffer(json.dumps(header).encode(), np.uint8),
        feature_sums=np.asarray(g.feature_sums),
        thumbnail_bytes=np.frombuffer(b"".join(thumbs), np.uint8),
        thumbnail_offsets=offsets,
        **{"bank." + k: np.asarray(a) for k, a in g.bank_arrays().items()},
    )
    return path


def npz_members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_header(path: Path) -> dict:
    return json.loads(npz_members(path)["header"].tobytes())


def savez(path: Path, **members: np.ndarray) -> None:
    """np.savez to exactly `path` (given a name, np.savez would append ".npz")."""
    with open(path, "wb") as handle:
        np.savez(handle, **members)


def rewrite(path: Path, header: dict | None = None, **arrays: np.ndarray) -> None:
    """Re-save a gallery file with some members replaced (np.savez, as a tampering writer would)."""
    members = npz_members(path)
    if header is not None:
        members["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    members.update(arrays)
    savez(path, **members)


# ----- dmf-run as a user runs it ------------------------------------------------------------------------


def dmf_run_command() -> list[str]:
    """The installed console script, or the module when the script is not on this venv's bin."""
    script = Path(sys.executable).with_name("dmf-run")
    if script.exists():
        return [str(script)]
    found = shutil.which("dmf-run")
    return [found] if found else [sys.executable, "-m", "dmf_deploy.runtime.app"]


def write_video(path: Path, frames: list[np.ndarray], fps: float = 15.0) -> Path:
    """mp4v .mp4, or MJPG .avi where this OpenCV build cannot write mp4."""
    h, w = frames[0].shape[:2]
    for target, codec in ((path.with_suffix(".mp4"), "mp4v"), (path.with_suffix(".avi"), "MJPG")):
        writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*codec), fps, (w, h))
        if writer.isOpened():
            for frame in frames:
                writer.write(frame)
            writer.release()
            if target.stat().st_size > 0:
                return target
        writer.release()
    pytest.skip("this OpenCV build can write neither mp4v nor MJPG video")


def parse_lines(stdout: str) -> tuple[list[dict], list[dict]]:
    """(predictions, events) from dmf-run's JSON lines; every line must be JSON."""
    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return [r for r in records if "event" not in r], [r for r in records if "event" in r]


def read_video(path: Path) -> list[np.ndarray]:
    """Every frame of a video file, decoded by OpenCV."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


# The clip dmf-run's tests play (conftest.py's `clip`): CLIP_SEGMENT jittered frames of each glyph class.
CLIP_CLASSES = ("c0", "c1", "c2")
CLIP_SEGMENT = 20  # frames per class in the clip
CLIP_FRAME = 96  # pixels a side


def clip_frames() -> list[np.ndarray]:
    from dmf_deploy.train.glyphs import GlyphSet

    glyphs = GlyphSet(len(CLIP_CLASSES), seed=11, image_size=CLIP_FRAME, jitter=0.3)
    return [glyphs.render(c, i) for c in range(len(CLIP_CLASSES)) for i in range(CLIP_SEGMENT)]


# ----- the frame loop driven directly -------------------------------------------------------------------


def ring() -> np.ndarray:
    return cv2.circle(np.full((105, 105, 3), 255, np.uint8), (52, 52), 30, (0, 0, 0), 6)


def cross() -> np.ndarray:
    paper = np.full((105, 105, 3), 255, np.uint8)
    return cv2.line(cv2.line(paper, (20, 20), (85, 85), 0, 6), (85, 20), (20, 85), 0, 6)


def on_card(drawing: np.ndarray, margin: float = 1.0) -> np.ndarray:
    """A drawing that fills its image, centred on paper `margin` times its side wide on every side: a
    card as a webcam sees it, the drawing well inside the frame. The demo model's frame rule looks for
    pen strokes much narrower than the frame; a thick-stroked drawing filling a small frame edge to edge
    can be blank to it, and enrolment refuses a frame the model sees as blank."""
    side = round(margin * max(drawing.shape[:2]))
    paper = [int(v) for v in np.median(drawing.reshape(-1, drawing.shape[2]), axis=0)]
    return cv2.copyMakeBorder(drawing, side, side, side, side, cv2.BORDER_CONSTANT, value=paper)


def pen_frame(seed: int) -> np.ndarray:
    """Three pen strokes on grey paper, 160x120: a frame the demo model takes for a drawing, one class
    a seed."""
    rng = np.random.default_rng(seed)
    frame = np.full((120, 160, 3), 200, np.uint8)
    for a, b in rng.integers(15, 105, (3, 2, 2)):
        cv2.line(frame, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), (30, 30, 30), 3)
    return frame


class Recorder:
    """An Output that keeps what it is shown; as the window does, it can hold the last frame."""

    def __init__(self, holds_last_frame: bool, on_show=None, max_shows: int = 100) -> None:
        self.holds_last_frame = holds_last_frame
        self.paused = False  # the window pauses on `p`; this recorder never does
        self.events: list[dict] = []
        self.shown: list[str | None] = []
        self.on_show, self.max_shows = on_show, max_shows

    def emit(self, event: dict) -> None:
        self.events.append(event)

    def show(self, frame, prediction, session, stats) -> bool:
        self.shown.append(prediction.label if prediction is not None else "(enrolled)")
        if self.on_show is not None:
            self.on_show(len(self.shown), session)
        return len(self.shown) < self.max_shows

    def close(self) -> None:
        pass

    def report(self, result) -> None:
        pass


def session_for(rec, output, tmp_path, script: str | None) -> Session:
    from dmf_deploy.runtime.app.commands import CommandFeed, Session

    feed = None
    if script is not None:
        stdin = tmp_path / "commands.txt"
        stdin.write_text(script)
        feed = CommandFeed(stdin.open("rb"), on_demand=True)  # read as the loop runs: kept open
    return Session(rec, tmp_path / "g.dmfg", output.emit, 5, feed)


# ----- a tiny real bundle (ONNX graphs, no model) --------------------------------------------------------


def tiny_bundle(root: Path, config: ModelConfig | None = None, opset: int = 18) -> Path:
    """A real (if numerically trivial) bundle: three ONNX graphs with the manifest's I/O names/shapes.

    Until the exporter lands this stands in for `export_bundle`: backbone = a stride-8 conv, support =
    1x1 convs + a spatial mean, head = <mean query feature, class weight> plus a small bank term so that
    every class-bank input is used.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    config = config or conv4_config(image_size=16, width=8)
    io = graph_io(config)
    c, s, gk = config.channels, config.feature_size, config.filter_channels
    tap_shape, offset_shape = [-1, 9, s, s, gk], [-1, 2, s, s, 9]
    size = config.preprocess.image_size
    rng = np.random.default_rng(0)
    stride = size // s
    bundle = root / "bundle"
    bundle.mkdir(parents=True)

    def value_info(shape_spec: dict[str, list]) -> list:
        return [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in shape_spec.items()]

    def init(name: str, array: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(np.asarray(array), name)

    def save(name: str, nodes: list, inits: list) -> None:
        graph = helper.make_graph(
            nodes, name, value_info(io[name]["inputs"]), value_info(io[name]["outputs"]), initializer=inits
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, bundle / f"{name}.onnx")

    w = rng.normal(0, 0.2, (c, 3, stride, stride)).astype(np.float32)
    save(
        "backbone",
        [
            helper.make_node("Conv", ["images", "w"], ["conv"], strides=[stride, stride]),
            helper.make_node("Relu", ["conv"], ["features"]),
        ],
        [init("w", w)],
    )
    save(
        "support",
        [
            helper.make_node("Conv", ["prototypes", "w_off"], ["offsets"]),
            helper.make_node("Reshape", ["offsets", "offset_shape"], ["support_offset"]),
            helper.make_node("Conv", ["prototypes", "w_tap"], ["taps"]),
            helper.make_node("Reshape", ["taps", "tap_shape"], ["tap_projections"]),
            helper.make_node("ReduceMean", ["prototypes", "hw"], ["class_weight"], keepdims=0),
        ],
        [
            init("w_off", rng.normal(0, 0.2, (18, c, 1, 1)).astype(np.float32)),
            init("w_tap", rng.normal(0, 0.2, (9 * gk, c, 1, 1)).astype(np.float32)),
            init("tap_shape", np.array(tap_shape, dtype=np.int64)),
            init("offset_shape", np.array(offset_shape, dtype=np.int64)),
            init("hw", np.array([2, 3], dtype=np.int64)),
        ],
    )
    save(
        "head",
        [
            helper.make_node("ReduceMean", ["query_features", "hw"], ["q"], keepdims=0),
            helper.make_node("Transpose", ["class_weight"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["q", "wt"], ["dot"]),
            helper.make_node("ReduceMean", ["support_offset", "chw"], ["b1"], keepdims=0),
            helper.make_node("ReduceMean", ["tap_projections", "tchw"], ["b2"], keepdims=0),
            helper.make_node("Add", ["b1", "b2"], ["b"]),
            helper.make_node("Mul", ["b", "small"], ["bias"]),
            helper.make_node("Add", ["dot", "bias"], ["scores"]),
        ],
        [
            init("hw", np.array([2, 3], dtype=np.int64)),
            init("chw", np.array(list(range(1, len(offset_shape))), dtype=np.int64)),
            init("tchw", np.array([1, 2, 3, 4], dtype=np.int64)),
            init("small", np.array(0.01, dtype=np.float32)),
        ],
    )
    graphs = {g: bundle / f"{g}.onnx" for g in GRAPH_NAMES}
    weights = "0" * 64  # no checkpoint: the graphs' weights are the seeded arrays above
    Manifest.build(
        config, graphs, solver="exact", steps=1, opset=opset, checkpoint_sha256="", weights_sha256=weights
    ).write(bundle)
    return bundle


def fake_engines(bundle: Path, **overrides: str) -> dict[str, EngineSpec]:
    """Manifest entries for engines built elsewhere: dummy plan bytes (data only) with true sha256s."""
    io = graph_io(read_manifest(bundle).model)
    engines = {}
    for graph in GRAPH_NAMES:
        name = f"{graph}.trt10.0.0.sm80.A100.fp32.plan"
        (bundle / name).write_bytes(b"not a real engine: " + graph.encode())
        shapes = profiles.profile_shapes(io, graph, 4, 16)
        fields = {
            "file": name,
            "sha256": sha256_file(bundle / name),
            "tensorrt_version": "10.0.0.6",
            "gpu": "NVIDIA A100-SXM4-40GB",
            "compute_capability": "8.0",
            "precision": "fp32",
            "profiles": {
                n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in shapes.items()
            },
        }
        engines[graph] = EngineSpec(**{**fields, **overrides})
    return engines


def cpu_session(path: Path) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the CPU, quiet about nodes that have no CPU kernel."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # fp16 nodes without CPU kernels are reported at warning level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- fuzzing file readers


def byte_edits():
    """Hypothesis strategy: 1-4 edits (set, cut or insert a few bytes at a relative place) of a file."""
    from hypothesis import strategies as st

    edit = st.tuples(
        st.sampled_from(["set", "cut", "insert"]), st.floats(0, 1), st.binary(min_size=1, max_size=8)
    )
    return st.lists(edit, min_size=1, max_size=4)


def apply_edits(original: bytes, edits: list[tuple[str, float, bytes]]) -> bytes:
    data = bytearray(original)
    for kind, where, payload in edits:
        at = int(where * (len(data) - 1)) if data else 0
        if kind == "set":
            data[at : at + len(payload)] = payload[: len(data) - at]
        elif kind == "cut":
            del data[at:]
        else:
            data[at:at] = payload
    return bytes(data)


def json_values(allow_nan: bool = True):
    """Hypothesis strategy: any JSON-like value (integers past int64, nested lists and mappings)."""
    from hypothesis import strategies as st

    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=allow_nan)
        | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=20,
    )
