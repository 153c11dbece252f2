"""The typed bundle manifest: version 1 (0.1.0's) and 2 read, others refused, every field checked.

tests/data/demo-0.1.0 holds 0.1.0's demo graphs (with the version-2 manifest 0.2 gave them), and
tests/data/demo_manifest_v1.json the manifest 0.1.0 shipped with them: a real version-1 bundle is
assembled from the two.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import dmf_deploy
from dmf_deploy.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    BundleError,
    Calibration,
    Manifest,
    model_fingerprint,
)
from dmf_deploy.runtime import GalleryError, Recognizer

DEMO_BUNDLE = Path(dmf_deploy.__file__).resolve().parent / "assets" / "demo_bundle"
V1_MANIFEST = Path(__file__).resolve().parent / "data" / "demo_manifest_v1.json"
# 0.1.0's demo model: its graphs (under V1_MANIFEST) and the version-2 manifest 0.2 gave them.
DEMO_0_1_0 = Path(__file__).resolve().parent / "data" / "demo-0.1.0"
GRAPH_FILES = ("backbone.onnx", "support.onnx", "head.onnx", "explain.onnx")  # the demo bundle's


def bundle_with(root: Path, manifest: dict | str, graphs: Path = DEMO_BUNDLE) -> Path:
    """The graph files of the bundle `graphs` with `manifest` (a dict, or JSON text) as manifest.json."""
    root.mkdir(parents=True, exist_ok=True)
    for name in GRAPH_FILES:
        shutil.copyfile(graphs / name, root / name)
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (root / MANIFEST_NAME).write_text(text)
    return root


def v2_raw() -> dict:
    return json.loads((DEMO_BUNDLE / MANIFEST_NAME).read_text())


def frames(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (60, 60, 3), dtype=np.uint8) for _ in range(count)]


# ----- versions ------------------------------------------------------------------------------------------


def test_version_1_bundle_reads_with_version_2_defaults(tmp_path: Path) -> None:
    v1 = Manifest.read(bundle_with(tmp_path / "v1", V1_MANIFEST.read_text(), DEMO_0_1_0))
    assert v1.format_version == 1
    assert (v1.precision, v1.calibration, v1.target, v1.open_set) == ("fp32", None, "gather", None)
    assert set(v1.bank_dtypes.values()) == {"float32"} and set(v1.graphs) == {"backbone", "support", "head"}
    # 0.2's version-2 manifest of the same graphs: every field but the version and the open-set record
    # (issue [H]'s, which 0.1.0 lacked) agrees, and its one more graph is the optional explain.onnx,
    # added beside the three.
    v2 = Manifest.read(DEMO_0_1_0)
    assert v2.format_version == 2 and v2.open_set is not None
    assert set(v2.graphs) - set(v1.graphs) == {"explain"}
    three = {name: spec for name, spec in v2.graphs.items() if name != "explain"}
    upgraded = dataclasses.replace(v1, format_version=2, open_set=v2.open_set)
    assert upgraded == dataclasses.replace(v2, graphs=three)


def test_fp32_fingerprint_is_the_one_0_1_0_wrote() -> None:
    """0.1.0's galleries carry 0.1.0's fingerprint: fp32 without calibration must hash to it exactly."""
    recorded = json.loads(V1_MANIFEST.read_text())["fingerprint"]
    manifest = Manifest.read(DEMO_0_1_0)
    assert model_fingerprint(manifest.weights_sha256, manifest.model) == recorded == manifest.fingerprint


def test_version_1_bundle_opens_a_gallery_of_the_version_2_bundle(tmp_path: Path) -> None:
    rec = Recognizer.open(DEMO_0_1_0, backend="onnxruntime")
    rec.enroll("a", frames(0, 2))
    rec.enroll("b", frames(1, 1))
    path = rec.save(tmp_path / "g.dmfg")
    old = Recognizer.open(bundle_with(tmp_path / "v1", V1_MANIFEST.read_text(), DEMO_0_1_0), gallery=path)
    assert old.classes == ["a", "b"]
    probe = frames(2, 2)
    np.testing.assert_array_equal(old.scores(probe), rec.scores(probe))  # same graphs, same banks


@pytest.mark.parametrize("version", [0, 3, "2", None, True])
def test_other_versions_are_refused_by_name(tmp_path: Path, version) -> None:
    raw = {**v2_raw(), "format_version": version}
    expected = rf"format version {version!r}; this runtime reads versions 1 and 2"
    with pytest.raises(BundleError, match=expected):
        Manifest.read(bundle_with(tmp_path / "b", raw))


def test_write_then_read_is_the_same_manifest(tmp_path: Path) -> None:
    manifest = Manifest.read(DEMO_BUNDLE)
    fingerprint = model_fingerprint(manifest.weights_sha256, manifest.model, "int8", "c" * 64)
    calibration = Calibration(64, "c" * 64)
    int8 = dataclasses.replace(manifest, precision="int8", calibration=calibration, fingerprint=fingerprint)
    for original in (manifest, int8):
        bundle = bundle_with(tmp_path / original.precision, {})
        original.write(bundle)
        assert Manifest.read(bundle) == original
        assert not list(bundle.glob(".*.tmp"))


# ----- field checks --------------------------------------------------------------------------------------


def _set(raw: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return raw


_DELETE = object()

WRONG_FIELDS = [
    ("graphs", ["backbone"], "graphs", "must be a mapping"),
    ("graphs.head", "head.onnx", "graphs.head", "must be a mapping"),
    ("graphs.head.sha256", 12, "graphs.head.sha256", "must be a string"),
    ("graphs.backbone.file", None, "graphs.backbone.file", "must be a string"),
    ("graphs.support.inputs", [], "graphs.support.inputs", "must be a mapping"),
    ("graphs.support.outputs.class_weight", ["N", -1], "graphs.support.outputs.class_weight", "dimension"),
    ("graphs.head.dynamic_axes", [1], "graphs.head.dynamic_axes", "list of strings"),
    ("graphs.support.dtypes", {"class_weight": "float64"}, "graphs.support.dtypes.class_weight", "one of"),
    ("feature_shape", "64x7x7", "feature_shape", "must be a list"),
    ("feature_shape", [64, 7], "feature_shape", "three positive integers"),
    ("steps", "8", "steps", "must be an integer"),
    ("steps", True, "steps", "must be an integer"),
    ("opset", 18.0, "opset", "must be an integer"),
    ("solver", 5, "solver", "must be a string"),
    ("weights_sha256", None, "weights_sha256", "must be a string"),
    ("model", "conv4", "model", "must be a mapping"),
    ("model.groups", 5, "model", "not a valid model config"),
    ("preprocess", [56], "preprocess", "must be a mapping"),
    ("preprocess.image_size", 84, "preprocess", "differs from model.preprocess"),
    ("precision", "fp16", "precision", "one of fp32, int8"),
    ("target", "bilinear", "target", "one of gather, gridsample"),
    ("calibration", "images/", "calibration", "must be a mapping"),
    ("calibration", {"images": 10}, "calibration.sha256", "missing"),
    ("calibration", {"images": "10", "sha256": "c"}, "calibration.images", "must be an integer"),
    ("open_set", [0.7], "open_set", "must be a mapping"),
    ("engines", [], "engines", "must be a mapping"),
    ("engines", {"head": {"file": "h.plan"}}, "engines.head.profiles", "missing"),
    ("training_solver", {"solver": 3}, "training_solver.solver", "must be a string"),
    ("feature_shape", _DELETE, "feature_shape", "missing"),
    ("graphs.support.outputs", _DELETE, "graphs.support.outputs", "missing"),
    ("graphs.support.outputs.tap_projections", _DELETE, "graphs.support.outputs.tap_projections", "missing"),
    ("graphs.head", _DELETE, "graphs.head", "missing"),
    ("fingerprint", _DELETE, "fingerprint", "missing"),
]


@pytest.mark.parametrize(
    ("field", "value", "named", "problem"), WRONG_FIELDS, ids=[f"{f[0]}={f[1]!r}"[:60] for f in WRONG_FIELDS]
)
def test_each_wrong_field_is_a_bundle_error_naming_it(tmp_path: Path, field, value, named, problem) -> None:
    bundle = bundle_with(tmp_path / "b", _set(v2_raw(), field, value))
    with pytest.raises(BundleError, match=rf"manifest field '{named}'.*{problem}"):
        Manifest.read(bundle)
    with pytest.raises(BundleError, match=rf"manifest field '{named}'"):
        Recognizer.open(bundle, backend="onnxruntime")


def test_a_hand_edited_precision_breaks_the_fingerprint(tmp_path: Path) -> None:
    raw = {**v2_raw(), "precision": "int8", "calibration": {"images": 8, "sha256": "c" * 64}}
    with pytest.raises(BundleError, match="manifest field 'fingerprint' does not match"):
        Manifest.read(bundle_with(tmp_path / "b", raw))


def test_oversized_and_deeply_nested_manifests_are_refused_before_parsing(tmp_path: Path) -> None:
    big = json.dumps({**v2_raw(), "padding": "x" * MAX_MANIFEST_BYTES})
    with pytest.raises(BundleError, match="larger than"):
        Manifest.read(bundle_with(tmp_path / "big", big))
    # 200,000 levels: json.loads would raise RecursionError; the depth check refuses it first.
    deep = '{"format": "dmf-bundle", "open_set": ' + "[" * 200_000 + "]" * 200_000 + "}"
    with pytest.raises(BundleError, match="nests 200001 levels deep"):
        Manifest.read(bundle_with(tmp_path / "deep", deep))
    brackets_in_strings = {**v2_raw(), "created": "[[[[[[[[[[[[[[[[[[[[{{{{{{{{{{"}
    assert Manifest.read(bundle_with(tmp_path / "ok", brackets_in_strings)).created.startswith("[[[")


def test_not_json_or_not_utf8_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not valid JSON"):
        Manifest.read(bundle_with(tmp_path / "a", '{"format": '))
    bundle = bundle_with(tmp_path / "b", "{}")
    (bundle / MANIFEST_NAME).write_bytes(b"\xff\xfe{}")
    with pytest.raises(BundleError, match="UTF-8"):
        Manifest.read(bundle)


# ----- precision and the fingerprint ---------------------------------------------------------------------


def test_fingerprint_covers_precision_and_calibration_not_solver_or_head_form() -> None:
    m = Manifest.read(DEMO_BUNDLE)
    fp32 = model_fingerprint(m.weights_sha256, m.model)
    int8 = model_fingerprint(m.weights_sha256, m.model, "int8", "c" * 64)
    other_calibration = model_fingerprint(m.weights_sha256, m.model, "int8", "d" * 64)
    assert len({fp32, int8, other_calibration}) == 3
    # Solver, steps, opset and head form are manifest fields the fingerprint is not computed from.
    changed = dataclasses.replace(m, solver="rk4", steps=2, opset=17, target="gridsample")
    assert model_fingerprint(changed.weights_sha256, changed.model) == m.fingerprint
    other_preprocess = dataclasses.replace(
        m.model, preprocess=dataclasses.replace(m.model.preprocess, resize="center-crop")
    )
    assert model_fingerprint(m.weights_sha256, other_preprocess) != fp32


def test_an_int8_bundle_of_the_same_weights_refuses_a_gallery_of_the_fp32_bundle(tmp_path: Path) -> None:
    """Until INT8 export exists, the INT8 bundle is the demo's graphs with a hand-made manifest: the
    same weights, precision int8 and a calibration record (what decides is the fingerprint)."""
    fp32 = Manifest.read(DEMO_BUNDLE)
    calibration = Calibration(images=32, sha256="c" * 64)
    int8 = dataclasses.replace(
        fp32,
        precision="int8",
        calibration=calibration,
        fingerprint=model_fingerprint(fp32.weights_sha256, fp32.model, "int8", calibration.sha256),
    )
    int8_bundle = bundle_with(tmp_path / "int8", {})
    int8.write(int8_bundle)
    assert Manifest.read(int8_bundle).weights_sha256 == fp32.weights_sha256

    rec = Recognizer.open(DEMO_BUNDLE, backend="onnxruntime")
    rec.enroll("a", frames(0, 1))
    path = rec.save(tmp_path / "fp32.dmfg")
    with pytest.raises(GalleryError, match="another model") as info:
        Recognizer.open(int8_bundle, backend="onnxruntime", gallery=path)
    assert "int8" in str(info.value) and int8.fingerprint[:12] in str(info.value)
    with pytest.raises(GalleryError, match="another model"):
        Recognizer.open(int8_bundle, backend="onnxruntime", gallery=rec.gallery)
