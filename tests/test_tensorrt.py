"""TensorRT: profiles, engine names, staleness, fallback, FP16 casting, and (with TensorRT) build + run.

TensorRT cannot be installed in this workplace, so everything that can be checked without it is:
the pure logic of the builder and the backend, the manifest plumbing, `open_backend`'s fallback on a
real bundle, and the FP16 cast measured in onnxruntime. Tests that need TensorRT skip with a reason.
No test fakes the tensorrt module; a dummy .plan file is only data.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from bundles import cpu_session, fake_engines, relative_error, tiny_bundle  # tests/bundles.py
from onnx import TensorProto, helper, numpy_helper

from dmf_deploy.config import ModelConfig
from dmf_deploy.export import engine_names, profiles
from dmf_deploy.export import tensorrt_build as tb
from dmf_deploy.export.fp16 import cast_onnx_to_fp16
from dmf_deploy.manifest import EngineSpec, graph_io, read_manifest, sha256_file
from dmf_deploy.runtime import tensorrt_backend as rt
from dmf_deploy.tensorrt_support import TRT_MISSING, gpu_identity, tensorrt_import_reason

TRT_SKIP = (
    "tensorrt is not installed: engine build/run needs NVIDIA TensorRT 10+ "
    "(not installable in this workplace)"
)


def _tensorrt_installed() -> bool:
    return tensorrt_import_reason() is None


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return tiny_bundle(tmp_path)


# ----- profiles and names ---------------------------------------------------------------------------------


def test_profile_shapes_follow_the_flags() -> None:
    io = graph_io(ModelConfig())  # ResNet-12, 84x84 -> 640x11x11, G=64, k=1
    backbone = profiles.profile_shapes(io, "backbone", max_batch=8, max_classes=256)
    assert backbone == {"images": ((1, 3, 84, 84), (1, 3, 84, 84), (8, 3, 84, 84))}

    support = profiles.profile_shapes(io, "support", max_batch=8, max_classes=256)
    assert support["prototypes"] == ((1, 640, 11, 11), (32, 640, 11, 11), (256, 640, 11, 11))

    head = profiles.profile_shapes(io, "head", max_batch=8, max_classes=512, max_queries=16)
    assert set(head) == {"query_features", "support_offset", "tap_projections", "class_weight"}
    assert head["query_features"] == ((1, 640, 11, 11), (1, 640, 11, 11), (16, 640, 11, 11))
    assert head["tap_projections"][2] == (512, 9, 11, 11, 64)  # channel-last bank
    assert head["class_weight"] == ((1, 640), (32, 640), (512, 640))
    # max_queries defaults to max_batch
    assert profiles.profile_shapes(io, "head", 4, 8)["query_features"][2][0] == 4
    # opt never exceeds max
    assert profiles.profile_shapes(io, "support", 8, 4)["prototypes"][1][0] == 4
    with pytest.raises(ValueError, match="max_classes"):
        profiles.profile_shapes(io, "support", 8, 0)
    with pytest.raises(ValueError, match="unknown graph"):
        profiles.profile_shapes(io, "tail", 8, 8)


def test_engine_names_carry_version_gpu_cc_and_precision() -> None:
    assert (
        engine_names.engine_file_name("head", "10.8.0.43", "NVIDIA GeForce RTX 4090", "8.9", "fp16")
        == "head.trt10.8.0.sm89.RTX4090.fp16.plan"
    )
    assert engine_names.engine_key("backbone", "11.4.0.106", "NVIDIA H100 80GB HBM3", "9.0", "fp32") == (
        "backbone.trt11.4.0.sm90.H10080GBHBM3.fp32"
    )
    assert engine_names.sanitize_gpu_name("Orin (nvgpu)") == "Orinnvgpu"
    assert engine_names.sanitize_gpu_name("../../etc") == "etc"  # never a path
    assert engine_names.trt_version_tag("10") == "10.0.0"
    keys = {
        engine_names.engine_key("head", v, g, cc, p)
        for v in ("10.8.0", "10.9.0")
        for g in ("NVIDIA A100", "NVIDIA L4")
        for cc in ("8.0", "8.9")
        for p in engine_names.PRECISIONS
    }
    assert len(keys) == 16
    with pytest.raises(ValueError, match="precision"):
        engine_names.engine_key("head", "10.8.0", "A100", "8.0", "int8")
    with pytest.raises(ValueError, match="graph"):
        engine_names.engine_key("neck", "10.8.0", "A100", "8.0", "fp16")


# ----- staleness and profile limits -----------------------------------------------------------------------


def _entry(**overrides: object) -> EngineSpec:
    entry = {
        "file": "head.trt10.8.0.sm89.RTX4090.fp16.plan",
        "sha256": "0" * 64,
        "tensorrt_version": "10.8.0.43",
        "gpu": "NVIDIA GeForce RTX 4090",
        "compute_capability": "8.9",
        "precision": "fp16",
        "profiles": {},
    }
    entry.update(overrides)
    return EngineSpec(**entry)


def test_engine_staleness_names_the_field_that_differs(tmp_path: Path) -> None:
    here = ("10.8.0.43", "NVIDIA GeForce RTX 4090", "8.9")
    assert rt.engine_staleness(_entry(), *here) is None
    assert rt.engine_staleness(_entry(tensorrt_version="10.8.0.99"), *here) is None  # build number only

    reason = rt.engine_staleness(_entry(tensorrt_version="10.7.0.23"), *here)
    assert "TensorRT 10.7.0.23" in reason and "10.8.0.43" in reason
    assert "TensorRT 10.8.1" in rt.engine_staleness(_entry(tensorrt_version="10.8.1"), *here)
    assert "TensorRT" in rt.engine_staleness(_entry(), "11.0.0.1", here[1], here[2])

    reason = rt.engine_staleness(_entry(gpu="NVIDIA A100"), *here)
    assert "GPU 'NVIDIA A100'" in reason and "RTX 4090" in reason
    reason = rt.engine_staleness(_entry(compute_capability="8.6"), *here)
    assert "compute capability 8.6" in reason and "8.9" in reason

    # file checks, with the bundle
    reason = rt.engine_staleness(_entry(), *here, bundle=tmp_path)
    assert "missing" in reason
    plan = tmp_path / _entry().file
    plan.write_bytes(b"plan bytes")
    assert "corrupt or was modified" in rt.engine_staleness(_entry(), *here, bundle=tmp_path)
    assert rt.engine_staleness(_entry(sha256=sha256_file(plan)), *here, bundle=tmp_path) is None
    assert "missing" in rt.engine_staleness(_entry(file="../x.plan"), *here, bundle=tmp_path)


def test_profile_limits_give_a_clear_error() -> None:
    io = graph_io(ModelConfig())
    shapes = profiles.profile_shapes(io, "head", 8, 256)
    limits = {n: (lo, hi) for n, (lo, _, hi) in shapes.items()}
    axes = io["head"]["inputs"]
    ok = {n: (3,) + hi[1:] if n == "query_features" else (300,) + hi[1:] for n, (lo, hi) in limits.items()}
    with pytest.raises(rt.ProfileLimitError) as err:
        rt.check_input_shapes("head", ok, limits, axes)
    assert str(err.value) == (
        "N=300 exceeds the engine profile's max 256 classes; rebuild with dmf-export --trt "
        "--max-classes 512 or use backend onnxruntime"
    )
    fits = {n: (2,) + hi[1:] for n, (lo, hi) in limits.items()}
    rt.check_input_shapes("head", fits, limits, axes)
    with pytest.raises(rt.ProfileLimitError, match="expects 640x11x11|axis 1"):
        rt.check_input_shapes("head", {**fits, "query_features": (2, 64, 11, 11)}, limits, axes)
    with pytest.raises(rt.ProfileLimitError, match="N=0 is below"):
        rt.check_input_shapes(
            "head", {n: (0,) + s[1:] if n != "query_features" else s for n, s in fits.items()}, limits, axes
        )
    with pytest.raises(rt.ProfileLimitError, match="takes inputs"):
        rt.check_input_shapes("head", {"query_features": fits["query_features"]}, limits, axes)
    backbone = {n: (lo, hi) for n, (lo, _, hi) in profiles.profile_shapes(io, "backbone", 8, 256).items()}
    with pytest.raises(
        rt.ProfileLimitError, match="B=9 exceeds .* 8 images; rebuild with dmf-export --trt --max-batch 16"
    ):
        rt.check_input_shapes("backbone", {"images": (9, 3, 84, 84)}, backbone, io["backbone"]["inputs"])


def test_numpy_dtypes_of_tensorrt_types() -> None:
    assert rt.numpy_dtype("FLOAT") == np.float32
    assert rt.numpy_dtype("DataType.HALF") == np.float16
    assert rt.numpy_dtype("INT64") == np.int64
    with pytest.raises(TypeError, match="FP8"):
        rt.numpy_dtype("FP8")


# ----- fallback and errors on a real bundle without TensorRT ------------------------------------------------


def test_auto_backend_falls_back_to_onnxruntime_with_the_reason(bundle: Path, caplog) -> None:
    from dmf_deploy.runtime.backends import OnnxRuntimeBackend, open_backend

    read_manifest(bundle).with_engines(fake_engines(bundle)).write(bundle)
    manifest = read_manifest(bundle)
    assert rt.has_engines(manifest)
    reason = rt.unavailable_reason(bundle, manifest)
    assert reason  # no tensorrt here; with tensorrt, the fake engines are stale (version/GPU)
    if not _tensorrt_installed():
        assert reason == TRT_MISSING

    with caplog.at_level(logging.WARNING, logger="dmf_deploy.runtime"):
        backend = open_backend(bundle, manifest, "auto")
    assert isinstance(backend, OnnxRuntimeBackend)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(reason in w and "falling back to onnxruntime" in w for w in warnings), warnings

    features = backend.run("backbone", {"images": np.ones((2, 3, 16, 16), np.float32)})["features"]
    assert features.shape == (2, 8, 2, 2)


def test_auto_backend_without_engines_does_not_warn(bundle: Path, caplog) -> None:
    from dmf_deploy.runtime.backends import open_backend

    manifest = read_manifest(bundle)
    assert not rt.has_engines(manifest)
    assert "dmf-export --trt" in rt.unavailable_reason(bundle, manifest)
    with caplog.at_level(logging.WARNING, logger="dmf_deploy.runtime"):
        open_backend(bundle, manifest, "auto")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.skipif(
    _tensorrt_installed(), reason="tensorrt is installed: the missing-package error cannot occur"
)
def test_tensorrt_backend_names_the_missing_package(bundle: Path) -> None:
    from dmf_deploy.runtime.backends import open_backend

    read_manifest(bundle).with_engines(fake_engines(bundle)).write(bundle)
    with pytest.raises(
        RuntimeError, match="tensorrt Python package is not installed.*dmf-deploy\\[tensorrt\\]"
    ):
        open_backend(bundle, read_manifest(bundle), "tensorrt")
    with pytest.raises(RuntimeError, match="tensorrt Python package is not installed"):
        rt.TensorRTBackend(bundle, read_manifest(bundle))
    with pytest.raises(RuntimeError, match="cannot build TensorRT engines: the tensorrt Python package"):
        tb.build_trt_for_bundle(bundle)


def test_engines_are_recorded_in_the_manifest_atomically(bundle: Path) -> None:
    old = fake_engines(bundle)
    tb.write_engines_to_manifest(bundle, old)
    assert read_manifest(bundle).engines == old
    (bundle / "notes.plan.txt").write_text("not ours")
    new = {}
    for graph, entry in fake_engines(bundle, precision="fp16").items():
        file = entry.file.replace(".fp32.", ".fp16.")
        (bundle / file).write_bytes(b"new")
        new[graph] = dataclasses.replace(entry, file=file, sha256=sha256_file(bundle / file))
    tb.write_engines_to_manifest(bundle, new)
    manifest = read_manifest(bundle)  # still a valid bundle manifest
    assert manifest.engines == new
    assert not any((bundle / e.file).exists() for e in old.values())  # stale plans removed
    assert all((bundle / e.file).exists() for e in new.values())
    assert (bundle / "notes.plan.txt").exists()
    assert not list(bundle.glob(".*.tmp"))


# ----- FP16 cast --------------------------------------------------------------------------------------------


def _dmf_like_onnx(path: Path) -> None:
    """A small torch module with the ops the DMF graphs use, exported like the bundle (opset 18)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)  # folded into the conv by the exporter
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(16)  # after an activation: stays a BatchNormalization node
            self.offset = nn.Conv2d(16, 2, 3, padding=1)
            self.classes = nn.Parameter(torch.randn(10, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.leaky_relu(self.bn(self.conv(x)), 0.1)
            y = self.bn2(F.relu(self.conv2(y)))
            n, c, h, w = y.shape
            rows = torch.arange(h, dtype=x.dtype).reshape(1, h, 1)
            cols = torch.arange(w, dtype=x.dtype).reshape(1, 1, w)
            off = self.offset(y)
            grid = torch.stack(
                ((cols + off[:, 1]) * (2.0 / (w - 1)) - 1.0, (rows + off[:, 0]) * (2.0 / (h - 1)) - 1.0),
                dim=-1,
            )
            sampled = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            growth = torch.exp(torch.sigmoid(sampled))
            x1 = torch.where(y > 0, y * growth, y)
            pooled = x1.reshape(n, 4, c // 4, h * w).transpose(2, 3).mean(dim=2).reshape(n, c)
            weight = F.normalize(self.classes, p=2, dim=1)
            return pooled @ weight.t()

    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        for bn in (model.bn, model.bn2):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
    torch.onnx.export(
        model,
        (torch.randn(2, 3, 12, 12),),
        str(path),
        opset_version=18,
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "B"}, "logits": {0: "B"}},
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_fp16_cast_keeps_top1_and_bounded_error(tmp_path: Path) -> None:
    src, dst = tmp_path / "fp32.onnx", tmp_path / "fp16.onnx"
    _dmf_like_onnx(src)
    ops = {node.op_type for node in onnx.load(str(src)).graph.node}
    assert {
        "Conv",
        "GridSample",
        "Sigmoid",
        "Exp",
        "MatMul",
        "Reshape",
        "Transpose",
        "ReduceMean",
        "LeakyRelu",
        "Relu",
        "BatchNormalization",
        "Where",
    } <= ops

    stats = cast_onnx_to_fp16(src, dst)
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    floats = [i for i in model.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    # `classes` feeds only F.normalize, which stays float32 whole (its epsilon guard and division too)
    assert {i.name for i in floats if i.data_type == TensorProto.FLOAT} == {"classes"}
    assert stats["initializers_converted"] == len(floats) - 1
    # float32 at the boundary, float16 inside (GridSample's input and grid included)
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [
        TensorProto.FLOAT
    ] * 2
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.value_info
    }
    grid_sample = next(n for n in model.graph.node if n.op_type == "GridSample")
    assert [types[name] for name in grid_sample.input] == [TensorProto.FLOAT16] * 2
    # Range has no float16 variant; ReduceL2 (F.normalize) is kept float32 against overflow
    assert stats["kept_fp32"].get("Range") == 2 and stats["kept_fp32"].get("ReduceL2") == 1
    reduce_l2 = next(n for n in model.graph.node if n.op_type == "ReduceL2")
    assert types[reduce_l2.output[0]] == TensorProto.FLOAT

    x = np.random.default_rng(1).normal(size=(1000, 3, 12, 12)).astype(np.float32)
    ref = cpu_session(src).run(None, {"x": x})[0]
    got = cpu_session(dst).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    agreement = float(np.mean(ref.argmax(1) == got.argmax(1)))
    relative = relative_error(got, ref)
    # float16 rounds to 11 significant bits: u = 2^-11 = 4.9e-4 relative per rounding. About ten
    # rounded stages lie between the input and the logits (input cast, weights, conv/BN outputs,
    # offsets, grid, samples, sigmoid, growth, pooled features, normalised weights); even if all their
    # errors added up that is 10u = 4.9e-3. Measured: about 6e-4.
    assert relative < 5e-3, relative
    assert agreement >= 0.99, agreement


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_onnxconverter_common_breaks_the_dmf_graphs(tmp_path: Path) -> None:
    """Why export/fp16.py is our own converter, not onnxconverter-common's (the one Polygraphy uses).

    On the GridSample grid arithmetic (x * 2 / (w - 1) - 1 with w read from the tensor's shape, as the
    TensorRT head form computes it) `convert_float_to_float16` retypes the Cast of w to float16 but
    leaves the Constant 2.0 float32, so the Mul mixes float16 and float32 and the graph is not valid
    ONNX. (On the Gather head form its graph passes the checker but crashes ONNX Runtime with SIGSEGV
    at session creation, which a test cannot show without crashing too.) If this test starts failing,
    the converter is fixed: switch export/fp16.py to it.
    """
    float16 = pytest.importorskip("onnxconverter_common.float16")
    src = tmp_path / "fp32.onnx"
    _dmf_like_onnx(src)
    half = float16.convert_float_to_float16(
        onnx.load(str(src)),
        keep_io_types=True,
        op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, "ReduceL2"],
    )
    with pytest.raises(onnx.shape_inference.InferenceError, match="inconsistent type tensor"):
        onnx.shape_inference.infer_shapes(half, check_type=True, strict_mode=True)


def test_fp16_cast_handles_constants_casts_and_fp32_only_inputs(tmp_path: Path) -> None:
    """Constant (value_float), Cast to float, ConstantOfShape, Resize scales, Shape of a float input,
    and a graph output that is also consumed inside the graph."""
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Mul", ["x", "half"], ["scaled"]),  # graph output, also consumed below
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["ones"], value=helper.make_tensor("v", f32, [1], [1.0])
        ),
        helper.make_node("Add", ["scaled", "ones"], ["plus"]),
        helper.make_node("Cast", ["count"], ["count_f"], to=f32),
        helper.make_node("Mul", ["plus", "count_f"], ["counted"]),
        helper.make_node("Resize", ["counted", "", "scales"], ["big"], mode="nearest"),
        helper.make_node("ReduceMean", ["big", "axes"], ["out"], keepdims=0),
        # F.normalize of an all-zero map: x / max(||x||, 1e-12) must be 0, not 0/0 = NaN in float16
        helper.make_node("Abs", ["x"], ["abs"]),
        helper.make_node("Neg", ["abs"], ["neg"]),
        helper.make_node("Relu", ["neg"], ["zeros"]),
        helper.make_node("ReduceL2", ["zeros", "channel"], ["norm"], keepdims=1),
        helper.make_node("Constant", [], ["eps"], value=helper.make_tensor("e", f32, [], [1e-12])),
        helper.make_node("Clip", ["norm", "eps"], ["guarded"]),
        helper.make_node("Div", ["zeros", "guarded"], ["normalized"]),
    ]
    graph = helper.make_graph(
        nodes,
        "edge",
        [
            helper.make_tensor_value_info("x", f32, ["B", 2, 3, 3]),
            helper.make_tensor_value_info("count", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("scaled", f32, ["B", 2, 3, 3]),
            helper.make_tensor_value_info("out", f32, ["B", 2]),
            helper.make_tensor_value_info("normalized", f32, ["B", 2, 3, 3]),
        ],
        initializer=[
            numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales"),
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "channel"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    src, dst = tmp_path / "edge.onnx", tmp_path / "edge16.onnx"
    onnx.save(model, src)
    cast_onnx_to_fp16(src, dst)
    cast = onnx.load(str(dst))
    inits = {i.name: i.data_type for i in cast.graph.initializer}
    assert inits == {
        "scales": f32,
        "axes": TensorProto.INT64,
        "channel": TensorProto.INT64,
    }  # scales: fp32 only
    casts_to = [a.i for n in cast.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert TensorProto.FLOAT16 in casts_to  # the in-graph Cast to float now casts to float16
    x = np.random.default_rng(0).normal(size=(2, 2, 3, 3)).astype(np.float32)
    feeds = {"x": x, "count": np.array(3, dtype=np.int64)}
    ref, got = cpu_session(src).run(None, feeds), cpu_session(dst).run(None, feeds)
    for a, b in zip(ref, got):
        assert b.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3)
    assert not np.isnan(got[2]).any() and not got[2].any()  # the epsilon guard survived the cast
    # keep_fp32_ops=() converts everything that has a float16 variant
    cast_onnx_to_fp16(src, dst, keep_fp32_ops=())
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)


@pytest.mark.slow  # an export: 20 to 75 s on two cores
def test_fp16_head_gathers_the_right_rows_on_a_large_map(tmp_path_factory, tmp_path):
    """A 21x21 map has 9 * 21 * 21 = 3969 table rows per class, more than the integers float16 holds
    exactly (2048). The FP16 cast of head.onnx (what `dmf-export --trt --fp16` builds) must still
    compute its Gather rows exactly: then its scores stay within float16's rounding of float32's (5e-3
    relative, the bound derived above for FP16 casts). With the row
    arithmetic in float16, half the rows are off by one and the error is 3e-2."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort
    from bundles import export_small_bundle  # tests/bundles.py

    from dmf_deploy.export.fp16 import cast_onnx_to_fp16

    bundle = export_small_bundle(tmp_path_factory, image_size=168, width=8, groups=4)
    manifest = read_manifest(bundle)
    assert manifest.feature_shape[1:] == (21, 21)
    half_path = tmp_path / "head.fp16.onnx"
    cast_onnx_to_fp16(bundle / "head.onnx", half_path)
    rng = np.random.default_rng(0)
    sizes = {"Q": 3, "N": 5}
    feeds = {
        name: rng.normal(0.0, 1.0, [sizes.get(d, d) for d in shape]).astype(np.float32)
        for name, shape in manifest.graphs["head"].inputs.items()
    }
    options = ort.SessionOptions()
    options.log_severity_level = 3  # float16 nodes without CPU kernels log warnings
    ref, half = (
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(["scores"], feeds)[0]
        for path in (bundle / "head.onnx", half_path)
    )
    assert relative_error(half, ref) < 5e-3


# ----- with a GPU (cuda-python) / with TensorRT -----------------------------------------------------------


def _gpu_or_skip() -> tuple[str, str]:
    try:
        return gpu_identity()
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"no usable CUDA GPU through cuda-python: {exc}")


def test_cuda_buffers_round_trip_and_grow_only() -> None:
    name, cc = _gpu_or_skip()
    assert name and "." in cc
    cuda = rt.CudaBuffers()
    try:
        assert isinstance(cuda.handle, int) and cuda.handle != 0
        data = np.arange(1000, dtype=np.float32)
        ptr = cuda.upload("x", data)
        back = cuda.download("y", ptr, data.shape, data.dtype)  # a pinned staging array
        cuda.synchronize()
        np.testing.assert_array_equal(back, data)
        assert cuda.buffer("x", 100) == ptr  # smaller: reused
        assert cuda.capacity("x") == data.nbytes
        bigger = cuda.upload("x", np.tile(data, 4))
        assert cuda.capacity("x") == data.nbytes * 4
        out = cuda.download("y", bigger, (4000,), np.float32)
        cuda.synchronize()
        np.testing.assert_array_equal(out, np.tile(data, 4))
    finally:
        cuda.close()


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_build_and_run_engines_match_onnxruntime(bundle: Path, fp16: bool) -> None:
    pytest.importorskip("tensorrt", reason=TRT_SKIP)
    _gpu_or_skip()
    from dmf_deploy.runtime.backends import OnnxRuntimeBackend, open_backend

    engines = tb.build_trt_for_bundle(bundle, fp16=fp16, max_batch=4, max_classes=16, workspace_mb=256)
    manifest = read_manifest(bundle)
    assert manifest.engines == engines
    assert rt.unavailable_reason(bundle, manifest) is None
    assert list(bundle.glob("timing.*.cache"))
    trt_backend = open_backend(bundle, manifest, "auto")
    assert trt_backend.name == "tensorrt"
    ort_backend = OnnxRuntimeBackend(bundle, manifest)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(10, 3, 16, 16)).astype(np.float32)  # 10 > max_batch 4: run in chunks
    tol = 5e-3 if fp16 else 1e-5
    feats = {b.name: b.run("backbone", {"images": images})["features"] for b in (trt_backend, ort_backend)}
    np.testing.assert_allclose(feats["tensorrt"], feats["onnxruntime"], rtol=tol, atol=tol)
    bank = ort_backend.run("support", {"prototypes": feats["onnxruntime"][:5]})
    trt_bank = trt_backend.run("support", {"prototypes": feats["onnxruntime"][:5]})
    for name, value in bank.items():
        np.testing.assert_allclose(trt_bank[name], value, rtol=tol, atol=tol)
    inputs = {"query_features": feats["onnxruntime"], **bank}
    scores = [b.run("head", inputs)["scores"] for b in (trt_backend, ort_backend)]
    np.testing.assert_allclose(scores[0], scores[1], rtol=tol, atol=tol)
    too_many = {name: np.repeat(value, 4, axis=0) for name, value in bank.items()}  # N = 20 > 16
    with pytest.raises(rt.ProfileLimitError, match="N=20 exceeds the engine profile's max 16 classes"):
        trt_backend.run("head", {"query_features": feats["onnxruntime"][:1], **too_many})
    trt_backend.close()
