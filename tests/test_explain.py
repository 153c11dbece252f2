"""Recognizer.explain, explain.onnx and dmf-explain: what the model aligned, against PyTorch.

Bundles: a random-weight small bundle exported with explain.onnx, and the packaged demo bundle (a
trained model; its explain.onnx was added to the shipped graphs). Queries and supports are rendered
glyphs. References come from the grid_sample head (`DMFHead`), fed the runtime's own features and
prototypes so that backbone rounding does not enter the comparison.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from bundles import (  # tests/bundles.py
    checkpoint_of,
    export_small_bundle,
    make_model,
    on_card,
    relative_error,
)
from click.testing import CliRunner

from dmf_deploy.glyphs import GlyphSet
from dmf_deploy.manifest import EXPLAIN, BundleError, Manifest
from dmf_deploy.packaged import DEMO_BUNDLE, DEMO_CHECKPOINT
from dmf_deploy.preprocess import InvalidFrame
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.explain import (
    FIGURE_HEIGHT,
    FIGURE_WIDTH,
    PANEL,
    PANEL_LEFT,
    PANEL_TOP,
    ExplanationUnavailable,
    UnknownClassError,
)
from dmf_deploy.runtime.tools.explain_cli import main as explain_main

GLYPHS = GlyphSet(7, seed=21, image_size=64, jitter=0.3)


def glyph(class_id: int, index: int) -> np.ndarray:
    """A drawing of GLYPHS on a card, as a webcam sees it (the demo model finds the drawing in it)."""
    return on_card(GLYPHS.render(class_id, index))


# Contract (README, docs): the contributions' mean is the score to 1e-5 relative. Both come from float32
# graphs summing the same terms in another order (<= 49 positions): measured ~1e-7.
SCORE_TOL = 1e-5
# Sampled points against PyTorch's positions, in pixels: the offsets are float32 convs on both sides
# (~1e-6 of a cell apart), so 1e-3 px is loose for rounding yet catches any wrong cell, tap or scale.
POINT_TOL_PX = 1e-3
TEST_DATA = Path(__file__).parent / "data"
DEMO_0_1_0 = TEST_DATA / "demo-0.1.0"  # 0.1.0's demo model: checkpoint and graphs


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory) -> Path:
    return export_small_bundle(tmp_path_factory, seed=0, explain=True)


def bundle_and_checkpoint(which: str, random_bundle: Path) -> tuple[Path, Path]:
    if which == "random":
        return random_bundle, checkpoint_of(random_bundle)
    return DEMO_BUNDLE, DEMO_CHECKPOINT


def enrolled(bundle: Path, n: int, shots: int = 1) -> Recognizer:
    rec = Recognizer.open(bundle)
    for c in range(n):
        rec.enroll(f"glyph {c}", [glyph(c, i) for i in range(shots)])
    return rec


# ----- the invariant and the positions ----------------------------------------------------------


@pytest.mark.parametrize("which", ["random", "demo"])
@pytest.mark.parametrize("n", [1, 7])
def test_contributions_average_to_the_score(random_bundle, which, n):
    bundle, _ = bundle_and_checkpoint(which, random_bundle)
    rec = enrolled(bundle, n, shots=2)
    queries = [glyph(c % 7, 300 + c) for c in range(3)]
    scores = rec.scores(queries)
    means = np.array([[rec.explain(q, c).score for c in rec.classes] for q in queries])  # float64 means
    assert relative_error(means, scores) <= SCORE_TOL
    ex = rec.explain(queries[0], rec.classes[-1])
    h, w = rec.manifest.feature_shape[1:]
    assert ex.contributions.shape == ex.aligned.shape == (h, w)
    assert ex.query_points.shape == (h * w, 2) and ex.sampled_points.shape == (h * w, 9, 2)
    assert ex.contributions.dtype == ex.sampled_points.dtype == np.float32
    assert (ex.aligned > 0).all()  # a norm, and no feature map of a real frame is zero everywhere
    assert ex.contributions.std() > 0  # positions contribute differently: a real map, not a constant


@pytest.mark.parametrize("which", ["random", "demo"])
def test_sampled_points_are_pytorchs_sampling_positions(random_bundle, which, one_torch_thread):
    import torch

    from dmf_deploy.checkpoint import load_checkpoint

    bundle, ckpt = bundle_and_checkpoint(which, random_bundle)
    rec = enrolled(bundle, 3, shots=2)
    model = load_checkpoint(ckpt)
    size = rec.config.preprocess.image_size
    query = glyph(1, 400)
    feats = torch.from_numpy(rec.features([query]))
    protos = torch.from_numpy(rec.gallery.prototypes())
    with torch.no_grad():
        py, px = model.head.sampling_positions(feats, model.class_bank(protos))  # [1, N, 9, h, w] cells
    h, w = feats.shape[-2:]
    for n, name in enumerate(rec.classes):
        ex = rec.explain(query, name)
        # The documented convention, written out: x = (j + 0.5) * S / w - 0.5 for column j.
        ref_x = (px[0, n].numpy().astype(np.float64) + 0.5) * size / w - 0.5
        ref_y = (py[0, n].numpy().astype(np.float64) + 0.5) * size / h - 0.5
        ref = np.stack([ref_x, ref_y], axis=-1).reshape(9, h * w, 2).transpose(1, 0, 2)  # [hw, 9, 2]
        assert np.abs(ex.sampled_points - ref).max() <= POINT_TOL_PX
    # The offsets really move the points: the sampling is not the plain 3x3 grid.
    assert np.abs(ex.sampled_points - undeformed(ex.query_points, size, h, w)).max() > 0.1


@pytest.mark.parametrize("config", [{}, {"kernel": 3}, {"official_score_scale": True}])
def test_explain_head_matches_the_grid_sample_head(config, one_torch_thread):
    """The traced function against the reference head, for both ODE spaces (k = 1 in group space,
    k = 3 in channel space) and the official score scale; no export, so every form is cheap to cover."""
    import torch

    from dmf_deploy.bundle_head import bundle_bank
    from dmf_deploy.explain_head import explain_outputs
    from dmf_deploy.export.explain import reference_outputs

    model = make_model(seed=2, **config)
    gen = torch.Generator().manual_seed(0)
    query, protos = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(3, 16, 4, 4, generator=gen)
    solver, steps = model.resolve_solver(None, None)
    with torch.no_grad():
        bank = model.class_bank(protos)
        got = explain_outputs(model, query, bundle_bank(bank), solver, steps)
        scores = model.head_scores(query, bank, solver, steps).numpy()
    ref = reference_outputs(model, query, bank, solver, steps)
    for name, value in zip(("sampling_positions", "contributions", "aligned"), got):
        # Both float32, the same terms summed in other orders: ~1e-7 relative (parity's 1e-4 is the bar).
        assert relative_error(value.numpy(), ref[name]) < 1e-5, name
    assert relative_error(got[1].numpy().mean(axis=(2, 3)), scores) < 1e-5


def undeformed(query_points: np.ndarray, size: int, h: int, w: int) -> np.ndarray:
    """[hw, 9, 2]: each query point plus {-1, 0, 1} feature cells in x and y, tap t = 3(dy+1) + (dx+1)."""
    shifts = np.array([(dx * size / w, dy * size / h) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return query_points.astype(np.float64)[:, None, :] + shifts[None]


@pytest.mark.slow  # exports a bundle
def test_zero_offset_weights_sample_the_undeformed_neighbourhood(tmp_path, one_torch_thread):
    import torch

    from dmf_deploy.checkpoint import save_checkpoint
    from dmf_deploy.export.bundle import export_bundle

    model = make_model(seed=4)
    with torch.no_grad():
        model.head.off_conv.weight.zero_()
    ckpt = save_checkpoint(model, tmp_path / "no_offsets.pt", note="offset conv zeroed")
    bundle = export_bundle(ckpt, tmp_path / "bundle", check=False)
    rec = enrolled(bundle, 2)
    ex = rec.explain(glyph(0, 9), "glyph 1")
    size, (h, w) = rec.config.preprocess.image_size, ex.contributions.shape
    rows, cols = np.divmod(np.arange(h * w), w)
    np.testing.assert_allclose(ex.query_points[:, 0], (cols + 0.5) * size / w - 0.5, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ex.query_points[:, 1], (rows + 0.5) * size / h - 0.5, rtol=0, atol=1e-5)
    # float32 pixel values below S = 32: 1e-5 px is a few ulps, far below any offset (a cell is 8 px).
    expected = undeformed(ex.query_points, size, h, w)
    np.testing.assert_allclose(ex.sampled_points, expected, rtol=0, atol=1e-5)
    assert np.array_equal(ex.sampled_points[:, 4], ex.query_points)  # the centre tap is the position


# ----- the figure -------------------------------------------------------------------------------


def test_render_has_the_documented_size_and_marks_the_points(random_bundle):
    rec = enrolled(random_bundle, 2)
    query = glyph(0, 50)
    ex = rec.explain(query, "glyph 0")
    figure = ex.render(query)
    assert figure.shape == (FIGURE_HEIGHT, FIGURE_WIDTH, 3) == (384, 640, 3) and figure.dtype == np.uint8
    size = rec.config.preprocess.image_size

    def at(panel: int, point: np.ndarray) -> np.ndarray:
        x, y = ((point + 0.5) * PANEL / size - 0.5).round().astype(int)
        return figure[PANEL_TOP + y, PANEL_LEFT[panel] + x].astype(int)

    b, g, r = at(0, ex.query_points[ex.best_position])
    assert g > 180 and r < 60 and b < 60  # the green query dot at the best position
    inside = [p for p in ex.sampled_points[ex.best_position] if (p > 2).all() and (p < size - 3).all()]
    assert inside, "no sampled point of the best position inside the support panel"
    for point in inside:
        b, g, r = at(1, point)
        assert r > 180 and g < 60 and b < 60  # red sampled points
    other = ex.render(query, support=glyph(1, 0), position=0)
    assert other.shape == figure.shape
    assert not np.array_equal(other, figure)
    with pytest.raises(ValueError, match="position"):
        ex.render(query, position=10_000)


# ----- bundles without the graph, and hostile inputs --------------------------------------------


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory) -> Path:
    """0.1.0's demo graphs with its manifest: a real bundle exported before explain.onnx existed."""
    root = tmp_path_factory.mktemp("old") / "bundle"
    root.mkdir()
    for name in ("backbone.onnx", "support.onnx", "head.onnx"):
        shutil.copy(DEMO_0_1_0 / name, root / name)
    shutil.copy(TEST_DATA / "demo_manifest_v1.json", root / "manifest.json")
    return root


def test_bundle_without_explain_says_so(old_bundle):
    assert EXPLAIN not in Manifest.read(old_bundle).graphs
    rec = enrolled(old_bundle, 1)
    with pytest.raises(ExplanationUnavailable, match="exported without explanation support.*dmf-export"):
        rec.explain(glyph(0, 1), "glyph 0")
    assert rec.classify(glyph(0, 1)).label == "glyph 0"  # the bundle itself still works


def test_unknown_class_and_bad_frame_are_named(random_bundle):
    rec = enrolled(random_bundle, 1)
    with pytest.raises(UnknownClassError, match="no class named 'mug'.*'glyph 0'"):
        rec.explain(glyph(0, 1), "mug")
    with pytest.raises(InvalidFrame):
        rec.explain(np.zeros((4, 4, 4), np.uint8), "glyph 0")


def test_corrupt_explain_graph_fails_at_open(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, bundle)
    (bundle / "explain.onnx").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match="sha256"):
        Recognizer.open(bundle)


# ----- dmf-explain --------------------------------------------------------------------------------


def write(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), image)
    return path


def run_cli(*args: str):
    return CliRunner().invoke(explain_main, list(args), catch_exceptions=False)


def test_cli_writes_the_figure_and_the_arrays(tmp_path):
    query = write(tmp_path / "q.png", glyph(3, 7))
    support = write(tmp_path / "s.png", glyph(3, 0))
    out, arrays = tmp_path / "fig.png", tmp_path / "fig.json"
    args = ["--support", str(support), "--frame", str(query), "--out", str(out), "--json", str(arrays)]
    result = run_cli("--bundle", "demo", *args)
    assert result.exit_code == 0, result.output
    figure = cv2.imread(str(out))
    assert figure.shape == (FIGURE_HEIGHT, FIGURE_WIDTH, 3)
    data = json.loads(arrays.read_text())
    h, w = Manifest.read(DEMO_BUNDLE).feature_shape[1:]
    assert np.asarray(data["sampled_points"]).shape == (h * w, 9, 2)
    assert np.asarray(data["query_points"]).shape == (h * w, 2)
    assert np.asarray(data["contributions"]).shape == np.asarray(data["aligned"]).shape == (h, w)
    assert data["class"] == "support"
    assert abs(np.mean(data["contributions"]) - data["score"]) <= SCORE_TOL * abs(data["score"])

    # The same class from a gallery file.
    rec = Recognizer.open("demo")
    rec.enroll("three", [glyph(3, 0)])
    gallery = rec.save(tmp_path / "g.dmfg")
    out2 = tmp_path / "fig2.png"
    result = run_cli("--gallery", str(gallery), "--class", "three", "--frame", str(query), "--out", str(out2))
    assert result.exit_code == 0, result.output
    assert cv2.imread(str(out2)).shape == figure.shape
    assert f"score {data['score']:.4f}" in result.output  # the same support and query: the same score


def test_cli_hostile_inputs_are_named_errors(tmp_path, old_bundle):
    query = write(tmp_path / "q.png", glyph(0, 1))
    out = tmp_path / "fig.png"
    missing = run_cli("--support", str(query), "--frame", str(tmp_path / "nope.png"), "--out", str(out))
    assert missing.exit_code == 2 and "query image" in missing.output and "does not exist" in missing.output
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG but not really")
    bad = run_cli("--support", str(query), "--frame", str(junk), "--out", str(out))
    assert bad.exit_code == 2 and "not an image" in bad.output
    rec = Recognizer.open("demo")
    rec.enroll("zero", [glyph(0, 0)])
    gallery = rec.save(tmp_path / "g.dmfg")
    unknown = run_cli("--gallery", str(gallery), "--class", "mug", "--frame", str(query), "--out", str(out))
    assert unknown.exit_code == 2 and "no class named 'mug'" in unknown.output
    args = ["--support", str(query), "--frame", str(query), "--out", str(out)]
    old = run_cli("--bundle", str(old_bundle), *args)
    assert old.exit_code == 2 and "exported without explanation support" in old.output
    assert "Traceback" not in missing.output + bad.output + unknown.output + old.output
    assert not out.exists()  # no figure from a failed run


@pytest.mark.parametrize("roi", [None, (0.1, 0.2, 0.5, 0.7)])
@pytest.mark.parametrize(
    "rule", [{"resize": "stretch"}, {"resize": "center-crop"}, {"resize": "center-crop", "crop_from": 40}]
)
def test_frame_affine_inverts_the_preprocessing_resize(rule, roi):
    """dmf-run draws the points on the live frame through `frame_affine`. A frame whose pixels hold
    their own x (or y) coordinate, resized by the preprocessing, must hold at each preprocessed pixel
    the frame coordinate that `frame_affine` maps it to (linear and area resampling keep a ramp linear)."""
    from dmf_deploy.config import PreprocessConfig
    from dmf_deploy.preprocess import Roi, resize_frame
    from dmf_deploy.runtime.explain import frame_affine

    config = PreprocessConfig(image_size=32, **rule)
    roi = Roi.of(roi)
    h, w = 90, 160
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    matrix = frame_affine(np.zeros((h, w, 3), np.uint8), config, roi)
    assert matrix[0, 1] == matrix[1, 0] == 0  # no rotation without locate="drawing"
    scale, shift = np.diag(matrix), matrix[:, 2]
    inner = slice(2, 30)  # border pixels read clamped samples
    for axis, ramp in enumerate((xs, ys)):
        frame = np.dstack([ramp] * 3)
        resized = resize_frame(frame if roi is None else roi.crop(frame), config)[:, :, 0]
        grid = np.mgrid[0:32, 0:32].astype(np.float64)[1 - axis]  # the preprocessed x (or y)
        expected = scale[axis] * grid + shift[axis]
        # cv2's fixed-point interpolation weights: ~1/32 of a frame pixel at most.
        np.testing.assert_allclose(resized[inner, inner], expected[inner, inner], atol=0.05)


@pytest.mark.slow  # exports a bundle
def test_add_explain_graph_leaves_the_other_graphs_alone(
    tmp_path, old_bundle, random_bundle, one_torch_thread
):
    from dmf_deploy.export.explain import add_explain_graph

    bundle = tmp_path / "bundle"
    shutil.copytree(old_bundle, bundle)
    before = {p.name: p.read_bytes() for p in bundle.glob("*.onnx")}
    with pytest.raises(BundleError, match="not the checkpoint"):
        add_explain_graph(checkpoint_of(random_bundle), bundle)  # other weights: refused, nothing written
    assert not (bundle / "explain.onnx").exists()
    manifest = add_explain_graph(DEMO_0_1_0 / "demo.pt", bundle)
    assert {p.name: p.read_bytes() for p in bundle.glob("*.onnx") if p.name in before} == before
    assert Manifest.read(bundle).graphs[EXPLAIN] == manifest.graphs[EXPLAIN]
    assert [p.name for p in bundle.iterdir() if p.name.startswith(".")] == []  # no staging left
    explain_bytes = (bundle / "explain.onnx").read_bytes()
    with pytest.raises(BundleError, match="already has explain.onnx"):
        add_explain_graph(DEMO_0_1_0 / "demo.pt", bundle)  # a second call replaces nothing
    assert (bundle / "explain.onnx").read_bytes() == explain_bytes
    rec = enrolled(bundle, 2)
    query = glyph(1, 5)
    means = [rec.explain(query, c).score for c in rec.classes]
    assert relative_error(np.array([means]), rec.scores([query])) <= SCORE_TOL
