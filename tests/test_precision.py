"""Edge precision and per-target graphs: INT8 backbones, the float16 class bank, the GridSample head.

Every bundle here is a real export run on ONNX Runtime; parity against PyTorch keeps its 1e-4
(export.parity) for both head forms, and INT8 is held to top-1 agreement with its float32 backbone.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from bundles import make_checkpoint, on_card, relative_error
from onnx import numpy_helper

from dmf_deploy.export.bundle import ExportError, ParityError, export_bundle
from dmf_deploy.export.int8_parity import clear_margin, format_int8_report, wilson_interval
from dmf_deploy.export.lint import lint_file
from dmf_deploy.export.triton import write_triton_repository
from dmf_deploy.manifest import BACKBONE, CLASS_BANK, HEAD, SUPPORT, Manifest, graph_io
from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.runtime.backends import OnnxRuntimeBackend
from dmf_deploy.runtime.gallery import GalleryError
from dmf_deploy.runtime.recognizer import Recognizer
from dmf_deploy.train.glyphs import GlyphSet


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("precision") / "conv4.pt", seed=5)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """A folder of 40 rendered glyph images, as a user's --calib folder."""
    folder = tmp_path_factory.mktemp("calib")
    glyphs = GlyphSet(num_classes=10, seed=3, image_size=48)
    for i in range(40):
        cv2.imwrite(str(folder / f"{i:03d}.png"), glyphs.render(i % 10, i))
    return folder


def _zero_points(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [
        constants[n.input[2]]
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
    ]


@pytest.fixture(scope="module")
def demo_int8(tmp_path_factory) -> Path:
    return export_bundle("demo", tmp_path_factory.mktemp("demo8") / "bundle", precision="int8")


def test_int8_demo_bundle_agrees_with_fp32(demo_int8: Path) -> None:
    manifest = Manifest.read(demo_int8)
    fp32 = Manifest.read(DEMO_BUNDLE)
    assert manifest.precision == "int8" and manifest.calibration is not None
    assert manifest.calibration.images == 256 and len(manifest.calibration.sha256) == 64
    # The fingerprint covers precision and calibration: fp32 galleries are not silently reused.
    assert manifest.fingerprint != fp32.fingerprint
    report = json.loads((demo_int8 / "parity.json").read_text())
    assert report["passed"] and report["int8"]["queries"] >= 1000 and report["int8"]["n_way"] == 20
    assert report["int8"]["top1_agreement"] >= 0.99
    # The figure and its domain are in the manifest: the demo's held-out rendered images, not glyphs alone.
    assert manifest.int8_check == {key: report["int8"][key] for key in manifest.int8_check}
    assert manifest.int8_check["domain"].startswith("400 rendered demo images")
    # The onnxruntime form: uint8 activations with zero points, int8 weights (int32: ORT's biases).
    dtypes = {z.dtype for z in _zero_points(demo_int8 / manifest.graphs[BACKBONE].file)}
    assert dtypes == {np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.int32)}
    spec = graph_io(manifest.model)
    assert lint_file(demo_int8 / "backbone.onnx", BACKBONE, spec[BACKBONE]).ok
    # ... which is not TensorRT's symmetric form.
    errors = lint_file(demo_int8 / "backbone.onnx", BACKBONE, spec[BACKBONE], target="tensorrt").errors
    assert any("zero point uint8" in e for e in errors)


def test_fp32_gallery_is_refused_by_the_int8_bundle(demo_int8: Path) -> None:
    enrolled = Recognizer.open("demo", backend="onnxruntime")
    frame = on_card(GlyphSet(num_classes=2, seed=1, image_size=64).render(0, 0))  # not blank to the model
    enrolled.enroll("a", [frame])
    with pytest.raises(GalleryError, match="another model"):
        Recognizer.open(demo_int8, backend="onnxruntime", gallery=enrolled.gallery)


def test_int8_needs_calibration_images(tmp_path: Path, ckpt: Path) -> None:
    with pytest.raises(ExportError, match="--calib DIR"):
        export_bundle(ckpt, tmp_path / "b", precision="int8")
    with pytest.raises(ExportError, match="holds no images"):
        export_bundle(ckpt, tmp_path / "b", precision="int8", calibration=tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ExportError, match="not an image"):
        export_bundle(ckpt, tmp_path / "b", precision="int8", calibration=tmp_path)
    (tmp_path / "broken.png").write_bytes(b"")  # cv2.imdecode raises on no bytes at all
    with pytest.raises(ExportError, match="is empty"):
        export_bundle(ckpt, tmp_path / "b", precision="int8", calibration=tmp_path)
    assert not (tmp_path / "b").exists()


def test_tensorrt_target_int8_is_symmetric_with_a_gridsample_head(
    tmp_path: Path, ckpt: Path, calib: Path
) -> None:
    bundle = export_bundle(
        ckpt,
        tmp_path / "b",
        precision="int8",
        calibration=calib,
        target="tensorrt",
        bank_dtype="float16",
        check=False,
    )
    manifest = Manifest.read(bundle)
    assert manifest.target == "gridsample" and manifest.calibration.images == 30  # 10 held out
    assert manifest.int8_check is None  # check=False: no figure, and none claimed
    # The Triton repository follows the target: TensorRT accelerates the ONNX models, the half bank's
    # tap_projections travel as FP16.
    write_triton_repository(bundle, manifest, tmp_path / "triton")
    head = (tmp_path / "triton" / "dmf_head" / "config.pbtxt").read_text()
    assert 'gpu_execution_accelerator : [ { name : "tensorrt" } ]' in head
    assert re.search(r'name: "tap_projections"\s+data_type: TYPE_FP16', head)
    assert re.search(r'name: "class_weight"\s+data_type: TYPE_FP32', head)
    zero_points = _zero_points(bundle / "backbone.onnx")
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    spec = graph_io(manifest.model, "gridsample")
    for name in (BACKBONE, SUPPORT, HEAD):
        assert lint_file(bundle / f"{name}.onnx", name, spec[name], target="tensorrt").ok
    # The GridSample head is the wrong form for ONNX Runtime.
    errors = lint_file(bundle / "head.onnx", HEAD, spec[HEAD], target="onnxruntime").errors
    assert any("samples with Gather" in e for e in errors)


def test_gridsample_head_holds_parity_with_pytorch(tmp_path: Path, ckpt: Path) -> None:
    bundle = export_bundle(ckpt, tmp_path / "b", target="tensorrt")
    report = json.loads((bundle / "parity.json").read_text())
    # 1e-4: the same tolerance as the Gather head (export.parity).
    assert report["passed"] and max(c["relative"] for c in report["comparisons"]) < 1e-4
    head = onnx.load(str(bundle / "head.onnx"))
    grid = [n for n in head.graph.node if n.op_type == "GridSample"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in grid]
    assert grid and all(a.get("align_corners") == 1 for a in attrs)
    assert not [n for n in head.graph.node if n.op_type == "Gather" and "tap" in n.input[0]]
    manifest = Manifest.read(bundle)
    assert manifest.target == "gridsample"
    assert manifest.bank_shapes["tap_projections"] == (9, manifest.model.filter_channels, 4, 4)


def test_half_bank_scores_within_1e3_of_the_float32_bank(tmp_path: Path, ckpt: Path) -> None:
    fp32 = export_bundle(ckpt, tmp_path / "fp32", check=False)
    half = export_bundle(ckpt, tmp_path / "half", bank_dtype="float16")
    assert json.loads((half / "parity.json").read_text())["passed"]
    m32, m16 = Manifest.read(fp32), Manifest.read(half)
    assert m16.bank_dtypes["tap_projections"] == "float16" and m16.fingerprint == m32.fingerprint
    rng = np.random.default_rng(0)
    protos = np.abs(rng.standard_normal((20, *m32.feature_shape))).astype(np.float32)
    query = rng.standard_normal((5, *m32.feature_shape)).astype(np.float32)
    scores = {}
    for name, bundle, manifest in (("fp32", fp32, m32), ("half", half, m16)):
        backend = OnnxRuntimeBackend(bundle, manifest)
        bank = backend.run(SUPPORT, {"prototypes": protos})
        assert bank["tap_projections"].dtype == np.dtype(manifest.bank_dtypes["tap_projections"])
        scores[name] = backend.run(HEAD, {"query_features": query, **bank})["scores"]
    # 1e-3: the bound; float16 keeps 11 significant bits (4.9e-4 relative rounding per value),
    # and a score averages thousands of such products, so its error stays well inside it.
    assert relative_error(scores["half"], scores["fp32"]) < 1e-3
    # A gallery enrolled through the float32 bundle serves the half bundle: banks are recomputed.
    rec = Recognizer.open(fp32, backend="onnxruntime")
    frame = GlyphSet(num_classes=2, seed=1, image_size=48).render(0, 0)
    rec.enroll("a", [frame])
    fp32_bytes = rec.gallery.bank_arrays()["tap_projections"].nbytes
    again = Recognizer.open(half, backend="onnxruntime", gallery=rec.gallery)
    arrays = again.gallery.bank_arrays()
    assert arrays["tap_projections"].dtype == np.float16
    assert arrays["tap_projections"].nbytes * 2 == fp32_bytes
    assert set(arrays) == set(CLASS_BANK)


def glyph_cohort(folder: Path, classes: int = 12, per_class: int = 3) -> Path:
    """A --cohort folder: one sub-folder of rendered glyph images per class."""
    glyphs = GlyphSet(num_classes=classes, seed=11, image_size=48)
    for c in range(classes):
        (folder / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            cv2.imwrite(str(folder / f"c{c:02d}" / f"{i}.png"), glyphs.render(c, i))
    return folder


def test_int8_below_the_agreement_fails_the_export_and_says_how_to_proceed(
    tmp_path: Path, ckpt: Path
) -> None:
    """Calibrated on blank cards, every glyph's activations clip: measured on the --cohort's glyphs, the
    export must fail, not ship; --int8-min-agreement is the threshold."""
    folder = tmp_path / "blank"
    folder.mkdir()
    for i in range(8):
        cv2.imwrite(str(folder / f"blank{i}.png"), np.full((48, 48, 3), 255, np.uint8))
    cohort = glyph_cohort(tmp_path / "cohort")
    with pytest.raises(ParityError):
        export_bundle(ckpt, tmp_path / "b", precision="int8", calibration=folder, cohort=cohort)
    report = json.loads((tmp_path / "b" / "parity.json").read_text())["int8"]
    assert report["top1_agreement"] < 0.99 and report["images"] == 2 + 36  # held-out blanks + cohort
    assert report["domain"] == f"2 images held out from --calib {folder}, 36 images of --cohort cohort"
    # Views of a blank card are all near-tied: they are not counted, the glyphs' are.
    assert 0 < report["queries"] <= 36 * 4 and report["near_ties"] >= 2 * 4
    low, high = report["interval95"]
    assert low < report["top1_agreement"] < high
    text = format_int8_report(report)
    assert (
        "to proceed:" in text
        and f"--int8-min-agreement {math.floor(report['top1_agreement'] * 1000) / 1000:g}" in text
    )
    assert f"only {report['queries']} queries" in text  # fewer than ~1,000: the report says so
    # The same export passes with a threshold the user sets, and its manifest records the figure.
    path = export_bundle(
        ckpt, tmp_path / "c", precision="int8", calibration=folder, cohort=cohort, int8_min_agreement=0.0
    )
    record = Manifest.read(path).int8_check
    assert record["min_agreement"] == 0.0 and record["top1_agreement"] == report["top1_agreement"]


def test_int8_gate_measures_images_held_out_from_calibration(tmp_path: Path, ckpt: Path, calib: Path) -> None:
    path = export_bundle(ckpt, tmp_path / "b", precision="int8", calibration=calib, explain=False)
    manifest = Manifest.read(path)
    assert manifest.calibration.images == 30  # 40 images: every 4th held out, never calibrated on
    report = json.loads((path / "parity.json").read_text())["int8"]
    assert report["images"] == 10 and report["domain"] == f"10 images held out from --calib {calib}"
    assert report["n_way"] == 10 and report["queries"] + report["near_ties"] == 40  # 4 views each
    assert manifest.int8_check["queries"] == report["queries"] and report["passed"]


def test_too_few_calibration_images_to_hold_out_are_refused_before_exporting(
    tmp_path: Path, ckpt: Path
) -> None:
    folder = tmp_path / "three"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((48, 48, 3), 255, np.uint8))
    with pytest.raises(
        ExportError, match="holds too few to hold any out; add images .*--cohort DIR.*--no-check"
    ):
        export_bundle(ckpt, tmp_path / "b", precision="int8", calibration=folder)
    assert not (tmp_path / "b").exists()
    # Without the check nothing is held out of reach: three images calibrate (none is the 4th).
    path = export_bundle(
        ckpt, tmp_path / "b", precision="int8", calibration=folder, check=False, explain=False
    )
    assert Manifest.read(path).calibration.images == 3


def test_clear_margin_and_interval() -> None:
    scores = np.array([[10.0, 9.99, 0.0], [10.0, 5.0, 0.0], [1.0, 1.0, 1.0]])
    # A lead of 0.1% of the range is a near tie; 50% is clear; equal scores decide nothing.
    assert clear_margin(scores).tolist() == [False, True, False]
    low, high = wilson_interval(990, 1000)
    assert 0.981 < low < 0.99 < high < 0.995  # 99% of 1,000 resolves about +-0.5 points
    assert wilson_interval(10, 10)[0] < 0.75  # 10 of 10 says little
    assert wilson_interval(0, 0) == (0.0, 1.0)
