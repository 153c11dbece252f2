"""Bundles whose manifest lies, and any bytes as a manifest: a BundleError at open, never a crash later.

Regressions of issue "Hardening" item 9, on copies of the packaged demo bundle: graphs swapped (each
with its own, matching sha256) opened and crashed at the first frame with a raw ONNX Runtime error; an
image_size of 12000 cost 690 MB per frame before ONNX Runtime refused it; weights kept in an external-data
file beside a graph were covered by no sha256. The manifest reader is fuzzed with Hypothesis in a child
process with a memory limit (`bounded_reader`). Real files and real ONNX Runtime sessions throughout.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bounded_reader import BoundedReader
from bundles import apply_edits, byte_edits, json_values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmf_deploy.config import ModelConfig
from dmf_deploy.manifest import MANIFEST_NAME, BundleError, Manifest, model_fingerprint, sha256_file
from dmf_deploy.packaged import DEMO_BUNDLE, demo_bundle_installed
from dmf_deploy.runtime import Recognizer

pytestmark = pytest.mark.skipif(not demo_bundle_installed(), reason="the demo bundle is not installed")
CPU_BOUND_S = 1.0  # the bound per file; CPU time, so a busy 2-core CI machine does not inflate it
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def bundle_copy(tmp_path: Path, change: Callable[[dict], None] | None = None) -> Path:
    """A copy of the demo bundle whose manifest `change` edits (the fingerprint is then recomputed, so
    that only the lie under test is left)."""
    root = Path(shutil.copytree(DEMO_BUNDLE, tmp_path / "bundle"))
    if change is not None:
        path = root / MANIFEST_NAME
        raw = json.loads(path.read_text())
        change(raw)
        model = ModelConfig.from_dict(raw["model"])
        raw["fingerprint"] = model_fingerprint(raw["weights_sha256"], model, raw.get("precision", "fp32"))
        path.write_text(json.dumps(raw, indent=2))
    return root


def test_swapped_graphs_are_refused_at_open(tmp_path: Path) -> None:
    def swap(raw: dict) -> None:
        graphs = raw["graphs"]
        for key in ("file", "sha256"):
            graphs["backbone"][key], graphs["support"][key] = graphs["support"][key], graphs["backbone"][key]

    root = bundle_copy(tmp_path, swap)
    Manifest.read(root)  # every sha256 matches: only the sessions can tell
    with pytest.raises(BundleError, match=r"graph backbone \(support\.onnx\) has inputs \['prototypes'\]"):
        Recognizer.open(root, backend="onnxruntime")


def test_a_tensor_shape_the_graph_does_not_have_is_refused(tmp_path: Path) -> None:
    """image_size 55 gives the same 7x7 features as the graph's 56, so the manifest is self-consistent;
    the backbone session's input shape is what gives it away."""

    def resize(raw: dict) -> None:
        raw["model"]["preprocess"]["image_size"] = raw["preprocess"]["image_size"] = 55
        raw["graphs"]["backbone"]["inputs"]["images"] = ["B", 3, 55, 55]

    root = bundle_copy(tmp_path, resize)
    Manifest.read(root)
    with pytest.raises(BundleError, match=r"graph backbone \(backbone\.onnx\) input 'images' has shape"):
        Recognizer.open(root, backend="onnxruntime")


@pytest.mark.parametrize("size", [12000, 55])
def test_an_image_size_the_backbone_does_not_take_is_refused_by_the_manifest(tmp_path: Path, size) -> None:
    """image_size alone changed: refused when the manifest is read, before any frame is resized to it."""

    def resize(raw: dict) -> None:
        raw["model"]["preprocess"]["image_size"] = raw["preprocess"]["image_size"] = size

    root = bundle_copy(tmp_path, resize)
    with pytest.raises(BundleError, match="graphs.backbone.inputs.images"):
        Manifest.read(root)


def test_a_feature_shape_that_is_not_the_models_is_refused(tmp_path: Path) -> None:
    def reshape(raw: dict) -> None:
        raw["feature_shape"] = [64, 8, 8]

    with pytest.raises(BundleError, match="feature_shape"):
        Manifest.read(bundle_copy(tmp_path, reshape))


def test_weights_in_an_external_data_file_are_refused(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import convert_model_to_external_data

    root = bundle_copy(tmp_path)
    graph = root / "backbone.onnx"
    model = onnx.load(graph)
    convert_model_to_external_data(model, location="backbone.weights", size_threshold=0)
    onnx.save_model(model, graph)
    assert (root / "backbone.weights").stat().st_size > 0

    manifest = json.loads((root / MANIFEST_NAME).read_text())
    manifest["graphs"]["backbone"]["sha256"] = sha256_file(graph)  # the manifest covers the .onnx only
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    refused = r"backbone\.onnx keeps tensors outside itself \(external data"
    with pytest.raises(BundleError, match=refused) as info:
        Recognizer.open(root, backend="onnxruntime")
    assert "no sha256 covers" in str(info.value)


def test_the_demo_bundle_still_opens() -> None:
    """The checks refuse lies, not the bundles dmf-export writes."""
    rec = Recognizer.open(DEMO_BUNDLE, backend="onnxruntime")
    assert rec.manifest.model.preprocess.image_size == 56


# ------------------------------------------------------------------------------------------ fuzzing


@pytest.fixture(scope="module")
def reader() -> Iterator[BoundedReader]:
    child = BoundedReader(memory_mb=256, kind="manifest")
    yield child
    child.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("manifest-fuzz")


def check(reader: BoundedReader, folder: Path, data: bytes) -> None:
    folder.mkdir(exist_ok=True)
    (folder / MANIFEST_NAME).write_bytes(data)
    answer = reader.load(folder)
    assert answer["outcome"] in ("ok", "BundleError"), answer["message"]
    assert answer["cpu_s"] < CPU_BOUND_S, answer


DEMO_MANIFEST = (DEMO_BUNDLE / MANIFEST_NAME).read_bytes() if demo_bundle_installed() else b"{}"


@FUZZ
@given(data=st.binary(max_size=4096) | st.text(alphabet='{}[]":,0123456789eE.-truefalsn ').map(str.encode))
def test_any_bytes_give_a_manifest_or_a_bundle_error(reader, workdir, data: bytes) -> None:
    check(reader, workdir / "bytes", data)


@FUZZ
@given(edits=byte_edits())
def test_a_mutated_manifest_gives_a_manifest_or_a_bundle_error(reader, workdir, edits) -> None:
    check(reader, workdir / "mutated", apply_edits(DEMO_MANIFEST, edits))


json_value = json_values()


def field_paths(raw: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path of the demo manifest (mappings only), to put arbitrary values at."""
    if not isinstance(raw, dict):
        return []
    paths = []
    for key, value in raw.items():
        paths.append((*prefix, key))
        paths += field_paths(value, (*prefix, key))
    return paths


DEMO_PATHS = field_paths(json.loads(DEMO_MANIFEST))


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(DEMO_PATHS), json_value), min_size=1, max_size=3))
def test_arbitrary_field_values_give_a_manifest_or_a_bundle_error(reader, workdir, changes) -> None:
    raw = json.loads(DEMO_MANIFEST)
    for path, value in changes:
        node = raw
        for key in path[:-1]:
            if not isinstance(node, dict) or not isinstance(node.get(key), dict):
                break
            node = node[key]
        else:
            node[path[-1]] = value
    check(reader, workdir / "fields", json.dumps(raw).encode())
