"""`dmf-bench` (runtime/tools/bench.py): figures side by side, in one JSON and one PNG, with or without
torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from optional_imports import torchvision_or_skip

from dmf_deploy.manifest import read_manifest
from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.runtime.tools import bench

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
    cmd = [sys.executable, "-m", "dmf_deploy.runtime.tools.bench", "--classes", "2", "--repeats", "1"]
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
    torchvision_or_skip()  # the literal form runs torchvision's deform_conv2d
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
