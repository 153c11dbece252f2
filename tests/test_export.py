"""dmf-export: parity against PyTorch with the same solver, TensorRT-readiness, and clean failures.

Parity tolerance 1e-4 relative (max|got - ref| / max|ref| over the score matrix): ORT and
PyTorch pick different float32 conv kernels (~1e-6 relative per layer); a real export error (wrong tap,
solver weight or scale) moves scores by 1e-2 or more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from bundles import add_official_head, make_checkpoint, official_base_state, save_official
from click.testing import CliRunner
from onnx import TensorProto, helper

from dmf_deploy.export.bundle import ExportError, export_bundle, validate_export_args
from dmf_deploy.export.cli import main as export_cli
from dmf_deploy.export.lint import lint_model
from dmf_deploy.manifest import EXPLAIN, GRAPH_NAMES, read_manifest


def _check_parity(bundle: Path, solver: str, steps: int) -> dict:
    report = json.loads((bundle / "parity.json").read_text())
    assert report["passed"], report
    assert report["solver"] == solver and report["steps"] == steps
    assert max(c["relative"] for c in report["comparisons"]) < 1e-4
    # N = 1, 3 and 7 all ran through the same graphs: the class axis is really dynamic.
    assert {c["case"].split()[1] for c in report["comparisons"]} == {"N=1", "N=3", "N=7"}
    assert report["top1_agreement"] == 1.0
    outputs = {c["output"] for c in report["comparisons"]}
    assert {"sampling_positions", "contributions", "aligned"} <= outputs  # explain.onnx is checked too
    return report


@pytest.mark.slow  # an export: 20 to 75 s on two cores
@pytest.mark.parametrize(("solver", "steps"), [("dopri5", 8), ("rk4-38", 1), ("exact", 1)])
def test_conv4_bundle_matches_pytorch(tmp_path: Path, solver: str, steps: int) -> None:
    ckpt = make_checkpoint(tmp_path / "conv4.pt", "conv4", image_size=32, width=16, groups=8, seed=1)
    handed: list[dict] = []
    bundle = export_bundle(ckpt, tmp_path / "bundle", solver=solver, steps=steps, on_parity=handed.append)
    report = _check_parity(bundle, solver, steps)
    assert handed == [report]  # the CLI prints the report it is handed, the same one parity.json holds
    if solver == "dopri5":  # 8 fixed steps sit within float32 rounding of the exact solution
        assert report["solver_distance"]["vs exact (exact/1)"] < 1e-5
    manifest = read_manifest(bundle)
    assert manifest.solver == solver and manifest.steps == steps and manifest.opset == 18
    for name in (*GRAPH_NAMES, EXPLAIN):
        graph = onnx.load(str(bundle / manifest.graphs[name].file))
        dims = {d.dim_param for i in graph.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
        assert dims == set(manifest.graphs[name].dynamic_axes)  # symbolic, never specialised to 2
        assert not [n for n in graph.graph.node if n.op_type in ("Loop", "If", "Scan")]


@pytest.mark.slow  # an export: 20 to 75 s on two cores
def test_resnet12_bundle_matches_pytorch(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "r12.pt", "resnet12", image_size=32, groups=64, seed=2)
    _check_parity(export_bundle(ckpt, tmp_path / "bundle", solver="dopri5", steps=8), "dopri5", 8)


@pytest.mark.slow  # an export: 20 to 75 s on two cores
def test_official_checkpoint_bundle_matches_pytorch(tmp_path: Path) -> None:
    state = add_official_head(official_base_state(seed=5), groups=64, kernel=1, feature_rms=1.0, seed=6)
    ckpt = save_official(tmp_path / "official.pth.tar", state)
    bundle = export_bundle(ckpt, tmp_path / "bundle", solver="rk4-38", steps=1)
    _check_parity(bundle, "rk4-38", 1)
    assert read_manifest(bundle).model.official_score_scale is True


# ----- failures: a clear message, exit code 2, and nothing left behind ------------------------------


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.pt", "conv4", 32, 16, 8, seed=3)


def _run_export(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmf_deploy.export.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or p.name.endswith(".tmp"))


@pytest.mark.parametrize(
    ("solver", "steps", "opset", "kernel", "message"),
    [
        ("dopri5", 0, 18, 1, "steps must be a positive integer"),
        ("heun", 8, 18, 1, "unknown solver 'heun'"),
        ("dopri5-adaptive", 8, 18, 1, "dopri5-adaptive cannot be exported"),
        ("exact", 1, 18, 3, "exists only for kernel 1; this model has k = 3"),
        ("dopri5", 8, 20, 1, "opset 20 is refused"),
        ("dopri5", 8, 16, 1, "opset 16 is too old"),
    ],
)
def test_bad_export_arguments_are_named(
    solver: str, steps: int, opset: int, kernel: int, message: str
) -> None:
    with pytest.raises(ExportError, match=message):
        validate_export_args(solver, steps, opset, kernel)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "'--steps': 0 is not in the range x>=1"),
        (["--solver", "heun"], "'heun' is not one of"),
    ],
)
def test_cli_refuses_values_outside_its_choices(small_ckpt: Path, extra: list[str], message: str) -> None:
    result = CliRunner().invoke(export_cli, ["--ckpt", str(small_ckpt), *extra])
    assert result.exit_code == 2 and message in result.output, result.output


def test_bad_arguments_exit_2_and_leave_nothing(tmp_path: Path, small_ckpt: Path) -> None:
    """The one subprocess run: the exit code and stderr a shell script sees."""
    result = _run_export("--ckpt", str(small_ckpt), "--out", "bundle", "--opset", "20", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "opset 20 is refused" in " ".join(result.stderr.split())
    assert not (tmp_path / "bundle").exists() and not _leftovers(tmp_path)


def test_missing_and_corrupt_checkpoints_fail_cleanly(tmp_path: Path, small_ckpt: Path) -> None:
    result = _run_export("--ckpt", "nope.pt", cwd=tmp_path)
    assert result.returncode == 2 and "nope.pt does not exist" in " ".join(result.stderr.split())
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(small_ckpt.read_bytes()[: small_ckpt.stat().st_size // 2])
    result = _run_export("--ckpt", str(corrupt), "--out", "bundle", cwd=tmp_path)
    assert result.returncode == 2 and "not a readable checkpoint" in " ".join(result.stderr.split())
    assert not (tmp_path / "bundle").exists() and not _leftovers(tmp_path)


def test_unwritable_output_folder_fails_cleanly(tmp_path: Path, small_ckpt: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # A regular file where the parent folder should be: unwritable even for root (CI runs as root).
    with pytest.raises(ExportError, match="cannot create the output folder"):
        export_bundle(small_ckpt, blocker / "bundle", check=False)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ExportError, match="not writable"):
            export_bundle(small_ckpt, locked / "bundle", check=False)


@pytest.mark.slow  # an export: 20 to 75 s on two cores
def test_existing_bundle_needs_force_and_failed_export_keeps_it(tmp_path: Path, small_ckpt: Path) -> None:
    bundle = export_bundle(small_ckpt, tmp_path / "bundle", check=False)
    before = (bundle / "manifest.json").read_bytes()
    result = _run_export("--ckpt", str(small_ckpt), "--out", "bundle", "--no-check", cwd=tmp_path)
    assert result.returncode == 2 and "already exists; pass --force" in " ".join(result.stderr.split())
    # A failing export with --force (k = 1 checkpoint, valid; bad steps) must not touch the old bundle.
    with pytest.raises(ExportError):
        export_bundle(small_ckpt, bundle, steps=0, force=True)
    assert (bundle / "manifest.json").read_bytes() == before and not _leftovers(tmp_path)
    replaced = export_bundle(small_ckpt, bundle, solver="exact", force=True, check=False)
    assert read_manifest(replaced).solver == "exact" and not _leftovers(tmp_path)


# ----- the TensorRT-readiness lint on graphs made to fail it -----------------------------------------


def _graph(nodes, inputs, outputs, opset=18, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _io(name: str, *dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def test_lint_flags_what_tensorrt_cannot_take() -> None:
    x, g, y = _io("x", "N", 4, 5, 5), _io("grid", "N", 5, 5, 2), _io("y", "N", 4, 5, 5)
    declared = {"x": {0: "N"}, "grid": {0: "N"}, "y": {0: "N"}}
    good = _graph(
        [helper.make_node("GridSample", ["x", "grid"], ["y"], mode="bilinear", align_corners=1)], [x, g], [y]
    )
    assert lint_model(good, "good", declared).ok

    nearest = _graph(
        [helper.make_node("GridSample", ["x", "grid"], ["y"], mode="linear", align_corners=1)],
        [x, g],
        [y],
        opset=20,
    )
    errors = " ".join(lint_model(nearest, "g20", declared).errors)
    assert "opset 20" in errors and "mode b'linear'" in errors

    custom = _graph(
        [helper.make_node("DeformConv2d", ["x", "grid"], ["y"], domain="com.example")],
        [x, g],
        [y],
        extra_opsets=[helper.make_opsetid("com.example", 1)],
    )
    assert "custom domain" in " ".join(lint_model(custom, "custom", declared).errors)

    undeclared = _graph([helper.make_node("Relu", ["x"], ["y"])], [_io("x", "N", "C", 5, 5)], [y])
    assert "not declared" in " ".join(lint_model(undeclared, "dyn", {"x": {0: "N"}, "y": {0: "N"}}).errors)

    einsum = _graph([helper.make_node("Einsum", ["x"], ["y"], equation="nchw->nchw")], [x], [y])
    report = lint_model(einsum, "einsum", declared)
    assert report.ok and "prefer MatMul" in " ".join(report.warnings)


def test_shipped_demo_bundle_passes_the_lint() -> None:
    from dmf_deploy.export.lint import lint_file
    from dmf_deploy.manifest import graph_io

    bundle = Path(__file__).resolve().parents[1] / "dmf_deploy" / "assets" / "demo_bundle"
    manifest = read_manifest(bundle)
    spec = graph_io(manifest.model)
    for name in GRAPH_NAMES:
        report = lint_file(bundle / manifest.graphs[name].file, name, spec[name])
        assert report.ok, report.errors


@pytest.mark.slow  # an export: 20 to 75 s on two cores
def test_scores_are_finite_on_real_frames(tmp_path: Path, small_ckpt: Path) -> None:
    """A smoke check on the runtime side of an exported bundle (full parity lives in test_recognizer)."""
    from dmf_deploy.runtime import Recognizer

    bundle = export_bundle(small_ckpt, tmp_path / "b", check=False)
    rec = Recognizer.open(bundle, backend="onnxruntime")
    import cv2

    frames = [np.full((40, 50, 3), v, np.uint8) for v in (0, 128, 255)]
    # Shots need an edge (a uniform frame is refused as one): a pen line on two of them. All are scored.
    rec.enroll("a", [cv2.line(frames[0].copy(), (5, 5), (40, 30), (255, 255, 255), 2)])
    rec.enroll("b", [cv2.line(frames[1].copy(), (5, 30), (40, 5), (0, 0, 0), 2)])
    assert np.isfinite(rec.scores(frames)).all()
