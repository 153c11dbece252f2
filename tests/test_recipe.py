"""The demo recipe's parts: handwriting augmentation, the no-dynamic-sampling switch (training, export
and runtime), starting from a checkpoint, bf16 on the CPU, and the prototypical-network baseline."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from bundles import checkpoint_of, export_small_bundle, make_model, relative_error
from click.testing import CliRunner
from optional_imports import torchvision_or_skip

torch = pytest.importorskip("torch")

from dmf_deploy import load_checkpoint  # noqa: E402
from dmf_deploy.config import ModelConfig, conv4_config  # noqa: E402
from dmf_deploy.glyphs import GlyphSet  # noqa: E402
from dmf_deploy.head import TAP_SHIFTS  # noqa: E402
from dmf_deploy.manifest import model_fingerprint, read_manifest  # noqa: E402
from dmf_deploy.runtime import Recognizer  # noqa: E402
from dmf_deploy.train.augment import AugmentConfig, handwriting, make_example  # noqa: E402
from dmf_deploy.train.cli import main as train_cli  # noqa: E402
from dmf_deploy.train.loop import Trainer, cpu_has_bf16  # noqa: E402
from dmf_deploy.train.presets import PRESETS  # noqa: E402
from dmf_deploy.train.torchdata import episode_loader  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
GLYPHS = GlyphSet(5, seed=3, image_size=64, jitter=0.2)
TINY = PRESETS["glyphs-smoke"].replace(width=16, epochs=1, episodes_per_epoch=4, val_episodes=4)
# Scores of one float32 model computed two ways (factored and literal, or PyTorch and ONNX Runtime):
# float32 rounding in other summation orders, ~1e-7; the export's own parity bar is 1e-4.
REL_TOL = 1e-4


def page() -> np.ndarray:
    """A dark stroke on a white page, as Omniglot draws characters."""
    img = np.full((105, 105, 3), 255, np.uint8)
    cv2.line(img, (20, 30), (85, 70), (0, 0, 0), 3)
    cv2.circle(img, (50, 50), 18, (0, 0, 0), 2)
    return img


# ----- handwriting augmentation ------------------------------------------------------------------
def test_handwriting_is_off_by_default_and_seeded():
    img = page()
    assert handwriting(img, AugmentConfig(), np.random.default_rng(0)) is img
    cfg = AugmentConfig(affine=0.7, elastic=0.02, stroke=1.0)
    a = handwriting(img, cfg, np.random.default_rng(5))
    b = handwriting(img, cfg, np.random.default_rng(5))
    c = handwriting(img, cfg, np.random.default_rng(6))
    assert (a == b).all() and not (a == c).all() and a.shape == img.shape and a.dtype == np.uint8


def test_stroke_width_changes_the_ink_and_warps_keep_the_page_white():
    img = page()
    ink = int((img[:, :, 0] < 128).sum())
    inks = set()
    for seed in range(12):
        thick_or_thin = handwriting(img, AugmentConfig(stroke=1.0), np.random.default_rng(seed))
        inks.add(int((thick_or_thin[:, :, 0] < 128).sum()))
    # Thicker (min filter) and thinner (max filter) strokes both occur: ink grows and shrinks.
    assert min(inks) < ink < max(inks)
    warped = handwriting(img, AugmentConfig(affine=1.0, elastic=0.03), np.random.default_rng(1))
    # The page pulled in from outside repeats the white border, never black corners.
    assert (warped[[0, -1]][:, [0, -1]] == 255).all()
    # A warp, not an erasure: per-axis scales of 0.8-1.2 change the area by 0.64-1.44x (the line's
    # width does not scale with it, so less), and the elastic warp keeps it about the same.
    assert (warped != img).any() and 0.6 * ink < (warped[:, :, 0] < 128).sum() < 1.5 * ink


def test_the_affine_warp_moves_a_point_where_its_matrix_says():
    img = np.full((105, 105, 3), 255, np.uint8)
    cv2.circle(img, (75, 30), 3, (0, 0, 0), -1)
    out = handwriting(img, AugmentConfig(affine=1.0), np.random.default_rng(9))
    # The same draws, in the same order, as `handwriting`: angle, shear, then the two axis scales.
    rng = np.random.default_rng(9)
    angle = np.radians(rng.uniform(-15, 15))
    shear = rng.uniform(-0.3, 0.3)
    sy, sx = rng.uniform(0.8, 1.2, size=2)
    rotate = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = rotate @ np.array([[1, shear], [0, 1]]) @ np.diag([sx, sy])
    centre = np.array([52.0, 52.0])
    expected = forward @ (np.array([75.0, 30.0]) - centre) + centre  # (x, y)
    ys, xs = np.nonzero(out[:, :, 0] < 128)
    # Within a pixel: the dot is a few pixels wide, and bilinear resampling shifts its edge pixels.
    assert np.hypot(xs.mean() - expected[0], ys.mean() - expected[1]) < 1.0
    assert np.hypot(expected[0] - 75, expected[1] - 30) > 2.0  # this draw really moves it


@pytest.mark.parametrize("bad", [{"stroke": 1.5}, {"affine": -0.1}, {"affine": 2.5}, {"affine": float("nan")},
                                 {"elastic": float("nan")}, {"elastic": 0.5}])  # fmt: skip
def test_bad_strengths_are_refused(bad):
    with pytest.raises(ValueError, match="affine must lie in"):
        AugmentConfig(**bad)


def test_without_switches_handwriting_off():
    cfg = AugmentConfig(affine=0.7, elastic=0.02, stroke=0.3).without("handwriting")
    assert (cfg.affine, cfg.elastic, cfg.stroke) == (0.0, 0.0, 0.0)
    pre = conv4_config(32).preprocess
    example = make_example(
        page(), pre, np.random.default_rng(0), train=True, augment=replace(cfg, affine=0.7)
    )
    assert example.shape == (3, 32, 32) and example.dtype == np.float32


# ----- dynamic_sampling=False ------------------------------------------------------------------
def test_the_switch_leaves_existing_models_fingerprints_alone():
    default = conv4_config(32, 16, groups=8)
    static = replace(default, dynamic_sampling=False)
    assert "dynamic_sampling" not in default.to_dict()  # 0.1.0 manifests and galleries stay valid
    assert static.to_dict()["dynamic_sampling"] is False
    assert ModelConfig.from_dict(static.to_dict()) == static
    assert model_fingerprint("0" * 64, default) != model_fingerprint("0" * 64, static)


def test_without_dynamic_sampling_the_filter_is_the_plain_3x3_conv_of_the_prototype():
    torchvision_or_skip()  # the literal reference runs torchvision's deform_conv2d
    model = make_model(seed=4, dynamic_sampling=False)
    assert model.head.off_conv is None and not any("off_conv" in k for k in model.state_dict())
    gen = torch.Generator().manual_seed(0)
    query, protos = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(3, 16, 4, 4, generator=gen)
    with torch.no_grad():
        bank = model.class_bank(protos)
        py, px = model.head.sampling_positions(query, bank)
        filters = model.head.filters(query, bank)  # [Q, N, G, h, w]
        plain = torch.sigmoid(torch.nn.functional.conv2d(protos, model.head.kernel_conv.weight, padding=1))
        literal = model.head.literal_score_map(query, protos, "dopri5", 8)
        factored = model.head.score_map(query, bank, "dopri5", 8)
    rows, cols = torch.arange(4.0).reshape(4, 1), torch.arange(4.0).reshape(1, 4)
    for t, (dy, dx) in enumerate(TAP_SHIFTS):
        assert torch.equal(py[:, :, t], (rows + dy).expand(2, 3, 4, 4))
        assert torch.equal(px[:, :, t], (cols + dx).expand(2, 3, 4, 4))
    assert relative_error(filters, plain.unsqueeze(0).expand_as(filters)) < 1e-6  # float32 rounding
    assert relative_error(factored, literal) < REL_TOL


@pytest.mark.slow  # an export: 20 to 75 s on two cores
def test_a_static_bundle_exports_and_runs_what_pytorch_computes(tmp_path_factory, one_torch_thread):
    bundle = export_small_bundle(tmp_path_factory, seed=6, explain=True, dynamic_sampling=False)
    manifest = read_manifest(bundle)
    assert manifest.model.dynamic_sampling is False
    model = load_checkpoint(checkpoint_of(bundle))
    rec = Recognizer.open(bundle)
    for c in range(3):
        rec.enroll(f"glyph {c}", [GLYPHS.render(c, 0)])
    queries = [GLYPHS.render(c, 1) for c in range(3)]
    got = rec.scores(queries)
    with torch.no_grad():
        feats = torch.from_numpy(rec.features(queries))
        bank = model.class_bank(torch.from_numpy(rec.gallery.prototypes()))
        ref = model.head_scores(feats, bank, manifest.solver, manifest.steps)
    assert relative_error(got, ref.numpy()) < REL_TOL
    ex = rec.explain(queries[0], "glyph 0")
    size, h = rec.config.preprocess.image_size, feats.shape[-1]
    shifts = np.array([(dx * size / h, dy * size / h) for dy, dx in TAP_SHIFTS])
    undeformed = ex.query_points.astype(np.float64)[:, None, :] + shifts[None]
    assert np.abs(ex.sampled_points - undeformed).max() < 1e-3  # pixels; float32 positions


def test_training_honours_the_switch(tmp_path):
    result = CliRunner().invoke(
        train_cli,
        ["--preset", "glyphs-smoke", "--width", "16", "--epochs", "1", "--episodes-per-epoch", "4",
         "--val-episodes", "4", "--no-dynamic-sampling", "--no-progress", "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model = load_checkpoint(tmp_path / "last.pt")
    assert model.config.dynamic_sampling is False and model.head.off_conv is None


# ----- --init, bf16 on the CPU ------------------------------------------------------------------
def test_init_starts_from_the_checkpoints_weights_and_refuses_another_network(tmp_path):
    source = Trainer(TINY.replace(seed=1), tmp_path / "a", CPU)
    source._save("source.pt", 0, None, with_state=False)
    started = Trainer(TINY.replace(seed=2, init=str(tmp_path / "a" / "source.pt")), tmp_path / "b", CPU)
    fresh = Trainer(TINY.replace(seed=2), tmp_path / "c", CPU)
    for key, value in source.model.state_dict().items():
        assert torch.equal(started.model.state_dict()[key], value), key
    first = next(iter(source.model.base.state_dict()))
    assert not torch.equal(fresh.model.base.state_dict()[first], source.model.base.state_dict()[first])
    result = CliRunner().invoke(
        train_cli,
        ["--preset", "glyphs-smoke", "--width", "24", "--init", str(tmp_path / "a" / "source.pt"),
         "--out", str(tmp_path / "d")],
    )  # fmt: skip
    assert result.exit_code == 2 and "--init" in result.output
    assert "not the network these settings build (widths: [16, 16, 16, 16] there, [24, 24, 24, 24] here" in (
        result.output
    )
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init", "no-such.pt"], "--init no-such.pt:"),
        (["--init", "x.pt", "--resume", "y.pt"], "--init starts a new run and --resume continues one"),
        (["--warmup-epochs", "-1"], "-1 is not in the range x>=0"),
        (["--affine", "nan"], "affine must lie in [0, 2]"),
        (["--elastic", "0.5"], "not in the range 0<=x<=0.1"),
    ],
)
def test_bad_recipe_options_are_named_before_training(tmp_path, args, message):
    result = CliRunner().invoke(train_cli, ["--preset", "glyphs-smoke", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions")
def test_amp_runs_the_backbone_in_bfloat16_on_the_cpu(tmp_path):
    trainer = Trainer(TINY.replace(amp=True), tmp_path, CPU)
    seen = []
    trainer.model.base.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    batch = next(iter(episode_loader(trainer.data, trainer.batches, 0, pin=False)))
    out = trainer.step_module(batch)
    out["loss"].backward()
    assert seen == [torch.bfloat16] and torch.isfinite(out["loss"])
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainer.model.parameters())


# ----- the prototypical-network baseline ----------------------------------------------------------
def baselines_module():
    spec = importlib.util.spec_from_file_location("baselines", REPO / "benchmarks" / "baselines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_protonet_scores_are_negative_squared_distances_of_flattened_maps():
    baselines = baselines_module()
    net = baselines.ProtoNet(conv4_config(32, 16, groups=8))
    gen = torch.Generator().manual_seed(0)
    # 40 queries: as many as real episodes have, past the 25 rows where a cdist would change method.
    support, query = torch.randn(4, 16, 4, 4, generator=gen), torch.randn(40, 16, 4, 4, generator=gen)
    labels, query_labels = torch.tensor([0, 1, 1, 2]), torch.arange(40) % 3
    scores = net.fewshot_scores(support, labels, query)
    protos = torch.stack([support[0], support[1:3].mean(0), support[3]]).double()
    by_hand = -((query.double()[:, None] - protos[None]) ** 2).sum(dim=(2, 3, 4))
    # float32 against float64 sums of 256 squares: ~1e-7 relative; a wrong prototype or a missing
    # square moves the scores by more than 1e-2.
    assert relative_error(scores, by_hand) < 1e-5
    ce, accuracy = net.fewshot_loss(support, labels, query, query_labels)
    reference = torch.nn.functional.cross_entropy(by_hand, query_labels)
    # The same float32 scores' rounding (above) carried through a softmax: 1e-5 relative is ample.
    assert abs(float(ce) - float(reference)) <= 1e-5 * float(reference)
    assert float(accuracy) == float((by_hand.argmax(1) == query_labels).float().mean())
    # Validation during training scores the same way, from images, never through the DMF head.
    images = torch.randn(7, 3, 32, 32, generator=gen)
    net.eval()
    with torch.no_grad():
        feats = net.features(images)
        assert torch.equal(
            net.episode_scores(images[:4], labels, images[4:]),
            net.fewshot_scores(feats[:4], labels, feats[4:]),
        )


def test_the_models_differ_only_in_what_they_ablate(tmp_path):
    baselines = baselines_module()
    base = baselines.recipe(tmp_path, epochs=2, episodes_per_epoch=8)
    settings = {name: baselines.model_settings(name, base) for name in baselines.MODELS}
    assert settings["dmf"] == (base, baselines.DMFNet)
    assert settings["protonet"] == (base, baselines.ProtoNet)
    assert settings["static"][0] == base.replace(dynamic_sampling=False)
    assert settings["euler1"][0] == base.replace(solver="euler", steps=1)
    hand = baselines.HANDWRITING
    assert settings["dmf+handwriting"][0] == base.replace(**hand) and min(hand.values()) > 0
    # Trained from scratch on the demo preset's episodes, shortened; no checkpoint to start from.
    assert base.init is None and base.data_root == str(tmp_path) and base.epochs == 2
    assert (base.affine, base.elastic, base.stroke) == (0.0, 0.0, 0.0)
