"""The TensorRT path's failure handling, checked here through the seams it has (no TensorRT installed).

- the rebuild transaction, with our own `PlanBuilder` (the orchestration's injection point) that
  returns plan bytes or fails at a chosen graph: what is tested is our staging and commit, not TensorRT;
- `backend="auto"` falling back when TensorRT cannot load matching engines (`tensorrt_or_fallback`);
- the pure helpers that turn TensorRT's failure signals (None, -1, False) into named errors;
- grow-only buffer pools and host views on real host memory (pinned memory itself needs a GPU);
- the FP16 cast of the demo bundle's real support graph, run in ONNX Runtime;
- the Triton repository's plan checks and README.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import logging
import re
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from bundles import cpu_session, fake_engines, tiny_bundle  # tests/bundles.py
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

from dmf_deploy.export import tensorrt_build as tb
from dmf_deploy.export.cli import main as dmf_export
from dmf_deploy.export.fp16 import cast_onnx_to_fp16
from dmf_deploy.export.profiles import DEFAULT_OPT_BATCH, choose_opt_batch
from dmf_deploy.export.triton import write_triton_repository
from dmf_deploy.manifest import GRAPH_NAMES, BundleError, read_manifest, sha256_file
from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.runtime import tensorrt_backend as rt
from dmf_deploy.runtime.backends import OnnxRuntimeBackend, tensorrt_or_fallback
from dmf_deploy.tensorrt_support import process_shared

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return tiny_bundle(tmp_path)


class PlanWriter:
    """A `PlanBuilder` for the orchestration: plan bytes tagged by run, or a build error at `fail_at`."""

    tensorrt_version = "10.8.0.43"
    gpu_name = "NVIDIA Jetson AGX Orin"
    compute_capability = "8.7"

    def __init__(self, tag: str, fail_at: str | None = None) -> None:
        self.tag, self.fail_at = tag, fail_at
        self.shapes: dict[str, dict] = {}
        self.finished = False

    def build(self, graph: str, onnx_path: Path, shapes: dict) -> bytes:
        assert onnx_path.is_file()
        if graph == self.fail_at:
            raise tb.EngineBuildError(f"TensorRT failed to build the {graph} engine (test)")
        self.shapes[graph] = shapes
        return f"{self.tag}: plan of {graph}".encode()

    def finish(self) -> None:
        self.finished = True


def _bundle_state(bundle: Path) -> dict[str, bytes]:
    """Every plan and the manifest, by name: what a failed rebuild must leave as it was."""
    files = [*bundle.glob("*.plan"), bundle / "manifest.json"]
    return {path.name: path.read_bytes() for path in files}


def _usable_here(bundle: Path) -> list[str | None]:
    """Staleness of each recorded engine on PlanWriter's machine, sha256 included (None: usable)."""
    manifest, here = read_manifest(bundle), PlanWriter("")
    identity = (here.tensorrt_version, here.gpu_name, here.compute_capability)
    return [rt.engine_staleness(manifest.engines[g], *identity, bundle=bundle) for g in GRAPH_NAMES]


# ----- 1. a failed rebuild leaves the working engines and the manifest as they were ----------------------


def test_failed_rebuild_leaves_plans_and_manifest_unchanged(bundle: Path) -> None:
    first = PlanWriter("v1")
    engines = tb.build_trt_for_bundle(bundle, max_batch=4, max_classes=16, builder=first)
    assert first.finished and read_manifest(bundle).engines == engines
    assert _usable_here(bundle) == [None, None, None]
    before = _bundle_state(bundle)
    assert len(before) == 4 and before[engines["backbone"].file] == b"v1: plan of backbone"

    # Same TensorRT, GPU and precision: the same file names. The support build fails after the
    # backbone's plan was built.
    failing = PlanWriter("v2", fail_at="support")
    with pytest.raises(tb.EngineBuildError, match="support engine"):
        tb.build_trt_for_bundle(bundle, max_batch=4, max_classes=16, builder=failing)
    assert "backbone" in failing.shapes and not failing.finished
    assert _bundle_state(bundle) == before
    assert _usable_here(bundle) == [None, None, None]  # sha256s still match: no fallback at run time
    assert not [p.name for p in bundle.iterdir() if p.name.startswith(tb.STAGING_PREFIX)]

    # A rebuild that succeeds replaces all three together.
    tb.build_trt_for_bundle(bundle, max_batch=4, max_classes=16, builder=PlanWriter("v3"))
    after = _bundle_state(bundle)
    assert sorted(after) == sorted(before)
    assert after[engines["head"].file] == b"v3: plan of head"
    assert _usable_here(bundle) == [None, None, None]


def test_stale_staging_folders_are_removed(bundle: Path) -> None:
    import os

    old = bundle / f"{tb.STAGING_PREFIX}killed_build"
    old.mkdir()
    (old / "backbone.plan").write_bytes(b"half a build")
    day_ago = time.time() - tb.STALE_STAGING_SECONDS - 60
    os.utime(old, (day_ago, day_ago))
    recent = bundle / f"{tb.STAGING_PREFIX}running_build"
    recent.mkdir()  # another build may still be using it
    tb.build_trt_for_bundle(bundle, builder=PlanWriter("v1"))
    assert not old.exists() and recent.is_dir()


# ----- 2. backend="auto" falls back when TensorRT cannot load matching engines ---------------------------


def test_auto_falls_back_when_tensorrt_cannot_load_the_engines(bundle: Path, caplog) -> None:
    manifest = read_manifest(bundle)
    reason = "TensorRT could not deserialize backbone.plan (a plan built on another OS)"

    def open_tensorrt():
        # What TensorRTBackend raises when deserialize_cuda_engine returns None.
        return rt.require_loaded(None, reason)

    def open_onnxruntime():
        return OnnxRuntimeBackend(bundle, manifest)

    with caplog.at_level(logging.WARNING, logger="dmf_deploy.runtime"):
        chosen = tensorrt_or_fallback("auto", open_tensorrt, open_onnxruntime)
    assert isinstance(chosen, OnnxRuntimeBackend)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(reason in w and "falling back to onnxruntime" in w for w in warnings), warnings
    features = chosen.run("backbone", {"images": np.ones((1, 3, 16, 16), np.float32)})["features"]
    assert features.shape == (1, 8, 2, 2)

    with pytest.raises(rt.EngineLoadError, match="another OS"):
        tensorrt_or_fallback("tensorrt", open_tensorrt, open_onnxruntime)
    assert issubclass(rt.EngineLoadError, BundleError)


# ----- 3, 5. TensorRT's failure signals become named errors ------------------------------------------------


class TensorRT10Flags(enum.IntEnum):  # the members trt.NetworkDefinitionCreationFlag had in 10.x
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class FlagsWithoutStrongTyping(enum.IntEnum):  # a release that has dropped the deprecated flag
    PREFER_AOT_PYTHON_PLUGINS = 2


def test_strongly_typed_flag_is_read_where_it_exists() -> None:
    assert tb.network_creation_flags(TensorRT10Flags) == 1 << 1
    assert tb.network_creation_flags(FlagsWithoutStrongTyping) == 0


def test_failure_return_values_raise_named_errors() -> None:
    shapes = {"images": ((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))}
    assert tb.check_profile_index(0, "backbone", shapes) == 0
    with pytest.raises(tb.EngineBuildError, match=r"backbone graph \(images min \(1, 3, 16, 16\)"):
        tb.check_profile_index(-1, "backbone", shapes)
    rt.require_accepted(True, "unused")
    with pytest.raises(rt.EngineRunError, match="address of head.scores"):
        rt.require_accepted(False, "TensorRT rejected the device address of head.scores")
    assert rt.require_loaded("engine", "unused") == "engine"
    with pytest.raises(rt.EngineLoadError, match="execution context"):
        rt.require_loaded(None, "no execution context")


# ----- 4. one trt.Logger per process ---------------------------------------------------------------------


def test_process_shared_makes_one_object_under_threads() -> None:
    made = []

    def factory() -> object:
        time.sleep(0.01)  # widen the window in which a second thread could also make one
        made.append(object())
        return made[-1]

    got: list[object] = []
    threads = [
        threading.Thread(target=lambda: got.append(process_shared("test.shared-once", factory)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and all(item is made[0] for item in got) and len(got) == 8


def test_only_tensorrt_support_creates_a_logger() -> None:
    creators = [
        path.relative_to(ROOT).as_posix()
        for folder in ("dmf_deploy", "export", "runtime")
        for path in (ROOT / folder).rglob("*.py")
        if re.search(r"\btrt\.Logger\(", path.read_text())
    ]
    assert creators == ["dmf_deploy/tensorrt_support.py"]


# ----- 6. buffers: grow-only pools and host views -----------------------------------------------------------


def test_grow_only_pool_reuses_and_frees_on_real_memory() -> None:
    blocks: dict[int, ctypes.Array] = {}

    def allocate(nbytes: int) -> int:
        block = ctypes.create_string_buffer(nbytes)
        blocks[ctypes.addressof(block)] = block
        return ctypes.addressof(block)

    def free(pointer: int) -> None:
        del blocks[pointer]

    pool = rt.GrowOnlyPool(allocate, free)
    first = pool.get("x", 100)
    assert pool.capacity("x") == rt.GrowOnlyPool.MIN_BYTES and len(blocks) == 1
    assert pool.get("x", 200) == first and len(blocks) == 1  # fits: nothing allocated
    view = rt.host_array(pool.get("y", 4000), (10, 100), np.float32)
    view[...] = np.arange(1000, dtype=np.float32).reshape(10, 100)
    again = rt.host_array(pool.get("y", 4000), (1000,), np.float32)  # same memory, another shape
    np.testing.assert_array_equal(again, np.arange(1000, dtype=np.float32))
    grown = pool.get("x", 10_000)
    assert first not in blocks and pool.capacity("x") == 10_000 and len(blocks) == 2
    assert rt.host_array(grown, (0, 5), np.float32).shape == (0, 5)
    pool.free_all()
    assert not blocks and pool.capacity("x") == 0


# ----- 7. the backbone profile's opt batch follows the use -------------------------------------------------


def test_opt_batch_follows_triton_or_the_flag(bundle: Path, tmp_path: Path) -> None:
    assert choose_opt_batch(8) == DEFAULT_OPT_BATCH == 1  # the live loop: one frame at a time
    assert choose_opt_batch(8, triton=True) == 8  # Triton batches dynamically up to --max-batch
    assert choose_opt_batch(8, 4, triton=True) == 4  # --opt-batch wins

    writer = PlanWriter("v1")
    tb.build_trt_for_bundle(bundle, max_batch=8, max_classes=16, opt_batch=4, builder=writer)
    profiles = {g: e.profiles for g, e in read_manifest(bundle).engines.items()}
    assert profiles["backbone"]["images"] == {
        "min": [1, 3, 16, 16],
        "opt": [4, 3, 16, 16],
        "max": [8, 3, 16, 16],
    }
    assert profiles["head"]["query_features"]["opt"][0] == 4
    assert writer.shapes["backbone"]["images"][1][0] == 4  # what the builder was given

    before = _bundle_state(bundle)
    with pytest.raises(ValueError, match="opt_batch must be between 1 and max_batch 8"):
        tb.build_trt_for_bundle(bundle, max_batch=8, opt_batch=9, builder=PlanWriter("v2"))
    assert _bundle_state(bundle) == before

    out = tmp_path / "never_exported"
    result = CliRunner().invoke(
        dmf_export, ["--ckpt", "demo", "--out", str(out), "--max-batch", "8", "--opt-batch", "9"]
    )
    assert result.exit_code == 2 and "--opt-batch 9 exceeds --max-batch 8" in result.output
    assert not out.exists()


# ----- 8. FP16: the support graph's normalisation stays float32 ---------------------------------------------


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = next(n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name)
    return numpy_helper.to_array(node.attribute[0].t)


def test_fp16_support_graph_keeps_the_normalisation_in_fp32(tmp_path: Path) -> None:
    src, dst = DEMO_BUNDLE / "support.onnx", tmp_path / "support.fp16.onnx"
    stats = cast_onnx_to_fp16(src, dst)
    cast = onnx.load(str(dst))
    inferred = onnx.shape_inference.infer_shapes(cast, strict_mode=True).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*inferred.value_info, *inferred.input)}
    types.update({init.name: init.data_type for init in cast.graph.initializer})
    ops = {n.op_type: n for n in cast.graph.node}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    assert {"ReduceL2", "Clip", "Expand", "Div"} <= set(ops)  # F.normalize, as the exporter writes it
    for op in ("ReduceL2", "Clip", "Expand", "Div"):
        node = ops[op]
        float_io = [t for t in (*node.input, *node.output) if types.get(t) in floats]
        assert float_io and all(types[t] == TensorProto.FLOAT for t in float_io), (op, float_io)
        assert stats["kept_fp32"][op] == 1
    epsilon = _constant(cast, ops["Clip"].input[1])
    assert epsilon.dtype == np.float32 and epsilon.item() == np.float32(1e-12)  # not 2^-24 in float16
    convs = [types[n.input[0]] for n in cast.graph.node if n.op_type == "Conv"]
    assert convs and set(convs) == {TensorProto.FLOAT16}  # the rest of the graph is still float16

    prototypes = np.zeros((3, 64, 7, 7), np.float32)
    prototypes[1] = np.random.default_rng(0).normal(size=(64, 7, 7))
    names = [o.name for o in cast.graph.output]
    got = dict(zip(names, cpu_session(dst).run(None, {"prototypes": prototypes})))
    ref = dict(zip(names, cpu_session(src).run(None, {"prototypes": prototypes})))
    for name in names:
        assert got[name].dtype == np.float32 and np.isfinite(got[name]).all(), name
        # float16 rounding (2^-11 relative) of the weights and of the few stages after the division.
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-2, atol=1e-2)
    assert not got["class_weight"][0].any()  # all-zero prototype: normalised to zeros, not 0/0


# ----- 9. Triton: what the plans need, and a check of what is copied ---------------------------------------


def test_triton_readme_states_what_the_plans_need(bundle: Path, tmp_path: Path) -> None:
    engines = fake_engines(bundle)  # TensorRT 10.0.0.6, A100, max batch 4, max classes 16
    read_manifest(bundle).with_engines(engines).write(bundle)
    out = tmp_path / "repo"
    write_triton_repository(bundle, read_manifest(bundle), out, use_plans=True)
    readme = (out / "README.md").read_text()
    assert "TensorRT is exactly **10.0.0**" in readme and "**NVIDIA A100-SXM4-40GB**" in readme
    head = "`dmf_head`: Q <= 4 queries per request (`--max-batch`), N <= 16 classes (`--max-classes`)"
    assert head in readme
    assert "`dmf_backbone`: B <= 4 images per request" in readme

    write_triton_repository(bundle, read_manifest(bundle), tmp_path / "onnx_repo")
    assert "## TensorRT plans" not in (tmp_path / "onnx_repo" / "README.md").read_text()


def test_triton_writer_checks_the_plans_it_copies(bundle: Path, tmp_path: Path) -> None:
    engines = fake_engines(bundle)
    mixed = {**engines, "support": dataclasses.replace(engines["support"], tensorrt_version="10.1.0.27")}
    read_manifest(bundle).with_engines(mixed).write(bundle)
    with pytest.raises(BundleError, match="different TensorRT versions.*support: TensorRT 10.1.0.27"):
        write_triton_repository(bundle, read_manifest(bundle), tmp_path / "mixed", use_plans=True)
    assert not (tmp_path / "mixed").exists()

    read_manifest(bundle).with_engines(engines).write(bundle)
    (bundle / engines["head"].file).write_bytes(b"replaced after the build")
    assert sha256_file(bundle / engines["head"].file) != engines["head"].sha256
    with pytest.raises(BundleError, match="head plan .* does not match the sha256"):
        write_triton_repository(bundle, read_manifest(bundle), tmp_path / "tampered", use_plans=True)
