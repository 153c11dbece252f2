"""`dmf-bench` (runtime/bench.py) and the exactness claim of benchmarks/head_formulations.py: the
head that bundles export (dmf_deploy/bundle_head.py, a Gather sampler) computes what grid_sample (the
reference) and torchvision's deformable conv compute."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dmf_deploy.manifest import read_manifest
from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.runtime import bench

needs_demo = pytest.mark.skipif(not (DEMO_BUNDLE / "manifest.json").is_file(), reason="no demo bundle")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----- dmf-bench ------------------------------------------------------------------------------------------
@needs_demo
def test_dmf_bench_compares_bundles_in_one_json_and_one_png(tmp_path):
    pytest.importorskip("matplotlib")
    copy = tmp_path / "copy" / "demo_bundle"  # a second bundle: the same graphs in another folder
    shutil.copytree(DEMO_BUNDLE, copy)
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--bundle", "demo", "--bundle", str(copy), "--classes", "1,5", "--repeats", "2"]
    args += ["--shortlist", "2", "--threads", "1", "--json", str(out_json), "--plot", str(out_png), "--quiet"]
    result = CliRunner().invoke(bench.main, args)
    assert result.exit_code == 0, result.output
    assert "classify shortlist K=2, N = 5" in result.output
    assert "side by side" in result.output and "classify exact, N = 5" in result.output
    assert "one more enrolment shot" in result.output  # the target, with its verdict

    runs = json.loads(out_json.read_text())["bundles"]
    assert [Path(r["bundle"]) for r in runs] == [DEMO_BUNDLE, copy]  # "demo": the packaged bundle
    assert runs[0]["label"] != runs[1]["label"]  # told apart although both folders are "demo_bundle"
    for data in runs:
        assert set(data["backbone"]) == {"1", "8"}
        assert set(data["by_classes"]) == {"1", "5"}
        for n, entry in data["by_classes"].items():
            for stage in ("backbone", "head", "classify", "classify_shortlist"):
                assert entry[stage]["calls"] == 2
                assert 0 < entry[stage]["median_ms"] <= entry[stage]["p90_ms"]
            bank = int(n) * sum(data["bank_bytes_per_class"].values())
            assert entry["memory_floor"]["exact_bytes"] == bank
            assert entry["peak_rss_mb"] > 0
        enroll = data["enroll"]
        assert enroll["one_class_one_frame"]["median_ms"] > 0
        ratio = enroll["one_shot_existing_class"]["median_ms"] / enroll["classify_n1"]["median_ms"]
        assert enroll["shot_ratio_to_classify"] == pytest.approx(ratio)
        assert "pytorch" not in data  # the PyTorch forms are benchmarks/pytorch_head.py's

    png = out_png.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


@needs_demo
def test_memory_floor_counts_the_class_bank():
    manifest = read_manifest(DEMO_BUNDLE)
    cfg = manifest.model
    hw = cfg.feature_size**2
    per = bench.bank_bytes_per_class(manifest)
    assert per == {
        "support_offset": 4 * 18 * hw,
        "tap_projections": 4 * 9 * cfg.filter_channels * hw,
        "class_weight": 4 * cfg.channels,
    }
    total = sum(per.values())
    assert bench.memory_floor(manifest, 10, None) == {"exact_bytes": 10 * total}
    floor = bench.memory_floor(manifest, 10, 4)
    assert floor["shortlist_bytes"] == 10 * per["class_weight"] + 4 * total
    assert bench.memory_floor(manifest, 3, 4)["shortlist_bytes"] == 3 * total  # N <= K: exact


def test_parse_classes():
    assert bench.parse_classes("100,1, 10") == [1, 10, 100]
    runner = CliRunner()
    for bad in ("0,5", "a", ""):
        result = runner.invoke(bench.main, ["--classes", bad])
        assert result.exit_code == 2, bad
        assert "positive integers" in result.output


def test_dmf_bench_refuses_a_folder_that_is_no_bundle(tmp_path):
    result = CliRunner().invoke(bench.main, ["--bundle", str(tmp_path)])
    assert result.exit_code == 1
    assert "not a dmf bundle" in result.output


@needs_demo
def test_dmf_bench_runs_without_torch(tmp_path):
    """dmf-bench is a runtime tool: with torch blocked, from a folder outside the repository, every
    figure is there, the memory ones included."""
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(
        'raise ImportError("torch is not installed (blocked by the test)")\n'
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(blocker.parent), env.get("PYTHONPATH")) if p)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "dmf_deploy.runtime.bench", "--classes", "2", "--repeats", "1"]
    cmd += ["--threads", "1", "--rss-iters", "20", "--import-cost", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    (run,) = figures["bundles"]
    assert Path(run["bundle"]) == DEMO_BUNDLE
    assert run["rss"]["iterations"] == 20 and run["rss"]["end_mb"] > 0
    assert figures["import"]["torch_imported"] is False and figures["import"]["import_ms"] > 0
    assert "torch imported: False" in proc.stdout


@needs_demo
def test_pytorch_head_benchmark_times_both_forms_beside_the_bundle(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "torch.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pytorch_head.py"
    cmd = [sys.executable, str(script), "--classes", "1,3", "--repeats", "1", "--literal-max", "1"]
    cmd += ["--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    assert Path(figures["checkpoint"]).name == "demo.pt"  # the demo bundle's own checkpoint
    by = figures["by_classes"]
    assert by["1"]["literal"]["median_ms"] > 0 and by["1"]["factored"]["median_ms"] > 0
    assert by["3"]["literal"] == {"skipped": "N > --literal-max 1"}
    assert "literal/factored" in proc.stdout


def test_bundle_labels_tell_bundles_apart():
    assert bench.bundle_labels([Path("a/fp32"), Path("a/fp16")]) == ["fp32", "fp16"]
    assert bench.bundle_labels([Path("/x/a/b"), Path("/x/c/b")]) == ["a/b", "c/b"]
    assert bench.bundle_labels([Path("/x/b"), Path("/x/b")]) == ["1: b", "2: b"]


# ----- the bundle's head (dmf_deploy/bundle_head.py, head formulations) ----------------------------------
def _head(channels: int, groups: int, kernel: int, offset_px: float, seed: int):
    import torch

    from dmf_deploy.head import DMFHead

    gen = torch.Generator().manual_seed(seed)
    head = DMFHead(channels, groups, kernel).double().eval()
    with torch.no_grad():
        w = torch.randn(head.off_conv.weight.shape, generator=gen, dtype=torch.float64)
        head.off_conv.weight.copy_(w * offset_px / math.sqrt(2 * channels * 25))
        w = torch.randn(head.kernel_conv.weight.shape, generator=gen, dtype=torch.float64)
        head.kernel_conv.weight.copy_(w * 2.0 / math.sqrt(9 * channels))
    return head, gen


@pytest.mark.parametrize(
    ("kernel", "groups", "size", "offset_px"),
    [(1, 4, (6, 6), 2.5), (1, 8, (5, 7), 1.0), (3, 2, (7, 5), 2.5), (1, 4, (1, 4), 1.5), (1, 4, (4, 1), 1.5)],
    ids=["k1-square", "k1-nonsquare", "k3", "one-row", "one-column"],
)
def test_bundle_head_equals_the_grid_sample_reference(kernel, groups, size, offset_px):
    """float64, offsets of pixels so that samples fall inside, across the border and outside the map:
    the gather sampler on the bundle's bank layout gives grid_sample's filters and scores."""
    torch = pytest.importorskip("torch")
    from dmf_deploy import bundle_head

    h, w = size
    head, gen = _head(8, groups, kernel, offset_px, seed=h * 10 + w)
    query = torch.randn(3, 8, h, w, generator=gen, dtype=torch.float64)
    protos = torch.randn(4, 8, h, w, generator=gen, dtype=torch.float64)
    with torch.inference_mode():
        bank = head.class_bank(protos)
        py, px = head.sampling_positions(query, bank)
        outside = (py <= -1) | (py >= h) | (px <= -1) | (px >= w)
        straddle = ~outside & ((py < 0) | (py > h - 1) | (px < 0) | (px > w - 1))
        assert outside.any() and straddle.any()
        assert min(h, w) == 1 or (~outside & ~straddle).any()
        stored = bundle_head.bundle_bank(bank)
        positions = bundle_head.sampling_positions(head, query, stored)  # [Q, N, 2, hw, 9]
        for axis, ref in enumerate((py, px)):  # the same sums in another order: rounding apart
            assert (positions[:, :, axis] - ref.flatten(3).transpose(2, 3)).abs().max() < 1e-12
        filters = bundle_head.filters(head, query, stored)
        scores = bundle_head.head_scores(head, query, stored, "dopri5", 3)
        # grid_sample's align_corners=True divides by (h - 1): the reference needs h, w >= 2
        if min(h, w) > 1:
            assert (filters - head.filters(query, bank)).abs().max() < 1e-12
            ref = head.score_map(query, bank, "dopri5", 3).mean(dim=(2, 3))
            assert scores.shape == ref.shape == (3, 4)
            assert (scores - ref).abs().max() < 1e-12 * ref.abs().max()
    if kernel == 1:
        _check_against_deform_conv(head, query, protos, filters)


def _check_against_deform_conv(head, query, protos, filters):
    import torch
    from torchvision.ops import deform_conv2d

    q, n = len(query), len(protos)
    qs, ss = query.repeat_interleave(n, dim=0), protos.repeat(q, 1, 1, 1)
    with torch.inference_mode():
        offset = head.off_conv(torch.cat([qs, ss], dim=1))
        ref = torch.sigmoid(deform_conv2d(ss, offset, head.kernel_conv.weight, padding=(1, 1)))
    assert (filters - ref.reshape(filters.shape)).abs().max() < 1e-12


def test_exported_head_uses_gather_and_passes_the_lint(tmp_path_factory):
    """A bundle's head has no GridSample, passes the TensorRT-readiness lint, and on ONNX Runtime equals
    the PyTorch grid_sample reference (N = 1, 3, 7: the class axis stays dynamic). The bundle is the
    small one the Recognizer tests share (tests/bundles.py)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    import onnx
    import onnxruntime as ort
    from bundles import checkpoint_of, export_small_bundle  # tests/bundles.py

    from dmf_deploy.bundle_head import bundle_bank
    from dmf_deploy.checkpoint import load_checkpoint
    from dmf_deploy.export.lint import lint_file
    from dmf_deploy.manifest import HEAD, graph_io

    bundle = export_small_bundle(tmp_path_factory, seed=1)
    path = bundle / "head.onnx"
    model = load_checkpoint(checkpoint_of(bundle))
    config = model.config
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "GridSample" not in ops and {"Gather", "Floor"} <= ops
    report = lint_file(path, HEAD, graph_io(config)[HEAD])
    assert report.ok, report.errors

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    manifest = read_manifest(bundle)
    gen = torch.Generator().manual_seed(1)
    s = config.feature_size
    # Offsets are linear in the features: large features move samples across the border and out.
    scale = 25.0
    query = scale * torch.randn(2, config.channels, s, s, generator=gen)
    for n in (1, 3, 7):
        protos = scale * torch.randn(n, config.channels, s, s, generator=gen)
        with torch.inference_mode():
            bank = model.class_bank(protos)
            ref = model.head_scores(query, bank, manifest.solver, manifest.steps).numpy()
            py, px = model.head.sampling_positions(query, bank)
        assert ((py <= -1) | (py >= s) | (px <= -1) | (px >= s)).any()
        stored = bundle_bank(bank)  # the bundle's layout
        feeds = {"query_features": query.numpy(), **{k: v.numpy() for k, v in stored._asdict().items()}}
        got = session.run(["scores"], feeds)[0]
        assert got.shape == (2, n)
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


def test_fp16_head_gathers_the_right_rows_on_a_large_map(tmp_path_factory, tmp_path):
    """A 21x21 map has 9 * 21 * 21 = 3969 table rows per class, more than the integers float16 holds
    exactly (2048). The FP16 cast of head.onnx (what `dmf-export --trt --fp16` builds) must still
    compute its Gather rows exactly: then its scores stay within float16's rounding of float32's (5e-3
    relative, the bound test_tensorrt.py derives for FP16 casts; measured 5e-4). With the row
    arithmetic in float16, half the rows are off by one and the error is 3e-2."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort
    from bundles import export_small_bundle  # tests/bundles.py

    from dmf_deploy.export.tensorrt_build import cast_onnx_to_fp16

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
    assert np.abs(half - ref).max() / np.abs(ref).max() < 5e-3
