"""`dmf-export`: checkpoint -> parity-checked ONNX bundle (optionally TensorRT engines, Triton repo)."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import click

from dmf_deploy.cli_support import CliError, DmfCommand, require_extra, version_option
from dmf_deploy.config import DEFAULT_STEPS, EXPORTABLE_SOLVERS
from dmf_deploy.export.int8_parity import HOLDOUT_EVERY, MIN_AGREEMENT
from dmf_deploy.manifest import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, opset_problem


def checked_opset(opset: int) -> int:
    problem = opset_problem(opset)
    if problem:
        raise click.BadParameter(problem, param_hint="--opset")
    return opset


@click.command("dmf-export", cls=DmfCommand, context_settings={"help_option_names": ["-h", "--help"]})
@version_option("dmf-export")
@click.option("--ckpt", required=True, help='Checkpoint path (ours or an official .pth.tar), or "demo".')
@click.option(
    "--out",
    "out_dir",
    default="bundle",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Bundle folder to write.",
)
@click.option(
    "--solver",
    default="dopri5",
    show_default=True,
    type=click.Choice(EXPORTABLE_SOLVERS),
    help="Fixed-step ODE solver unrolled into head.onnx (exact: the closed form, kernel 1 only).",
)
@click.option(
    "--steps", default=DEFAULT_STEPS, show_default=True, type=click.IntRange(min=1), help="Solver steps."
)
@click.option(
    "--opset",
    default=DEFAULT_OPSET,
    show_default=True,
    type=int,
    callback=lambda _ctx, _param, opset: checked_opset(opset),  # while parsing: before the checkpoint loads
    help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (20+ renamed GridSample's modes; TensorRT misreads them).",
)
@click.option(
    "--force", is_flag=True, help="Replace an existing bundle or empty folder (never anything else)."
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "int8"]),
    default="fp32",
    show_default=True,
    help="Backbone precision: int8 quantizes it (QDQ), calibrated on --calib images.",
)
@click.option(
    "--calib",
    "calibration",
    default=None,
    type=click.Path(path_type=Path),
    help="Folder of calibration images for --precision int8 (--ckpt demo has a default set); every "
    f"{HOLDOUT_EVERY}th is held out to measure INT8's agreement with float32.",
)
@click.option(
    "--int8-min-agreement",
    type=click.FloatRange(0.0, 1.0),
    default=MIN_AGREEMENT,
    show_default=True,
    help="--precision int8: the top-1 agreement with the float32 backbone the export needs, measured on "
    "images held out from --calib (and --cohort's).",
)
@click.option(
    "--target",
    type=click.Choice(["onnxruntime", "tensorrt"]),
    default=None,
    help="Engine the graphs are made for: head form and INT8 form. [default: tensorrt with --trt, "
    "else onnxruntime]",
)
@click.option(
    "--bank-dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Class-bank storage: float16 halves galleries (scores within 1e-3).",
)
@click.option(
    "--cohort",
    default=None,
    type=click.Path(path_type=Path, file_okay=False),
    help="Fit the open-set ('unknown') rule on this folder: one sub-folder of images per class the "
    "model never trained on (default: copy the demo model's rule).",
)
@click.option("--check/--no-check", default=True, show_default=True, help="Parity-check against PyTorch.")
@click.option(
    "--explain/--no-explain",
    default=True,
    show_default=True,
    help="Also write explain.onnx (Recognizer.explain, dmf-explain, dmf-run's e key).",
)
@click.option("--trt", is_flag=True, help="Also build TensorRT engines (needs tensorrt).")
@click.option("--fp16", is_flag=True, help="TensorRT: FP16-cast graphs built as strongly typed networks.")
@click.option(
    "--max-batch", default=8, show_default=True, type=int, help="TensorRT profile: max frames (B, Q)."
)
@click.option(
    "--max-classes", default=256, show_default=True, type=int, help="TensorRT profile: max classes N."
)
@click.option(
    "--opt-batch",
    default=None,
    type=click.IntRange(min=1),
    help="TensorRT profile: the batch kernels are tuned for [default: --max-batch with --triton, else 1].",
)
@click.option("--workspace", default=1024, show_default=True, type=int, help="TensorRT workspace, MB.")
@click.option(
    "--triton",
    "triton_dir",
    default=None,
    type=click.Path(path_type=Path),
    help="Also write a Triton model repository here.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr (errors and the report stay).")
def main(
    ckpt: str,
    out_dir: Path,
    solver: str,
    steps: int,
    opset: int,
    force: bool,
    precision: str,
    calibration: Path | None,
    int8_min_agreement: float,
    target: str | None,
    bank_dtype: str,
    cohort: Path | None,
    check: bool,
    explain: bool,
    trt: bool,
    fp16: bool,
    max_batch: int,
    max_classes: int,
    opt_batch: int | None,
    workspace: int,
    triton_dir: Path | None,
    quiet: bool,
) -> None:
    """Export a DMF checkpoint to a bundle: backbone.onnx, support.onnx, head.onnx, manifest.json."""
    require_extra("export", "rich", "torch", "onnx", "onnxruntime")
    from rich.console import Console

    from dmf_deploy.checkpoint import CheckpointError
    from dmf_deploy.export.bundle import ExportError, ParityError, export_bundle
    from dmf_deploy.export.parity import format_report

    console = Console(stderr=True)
    started = time.perf_counter()

    def progress(message: str) -> None:
        if quiet:
            return
        console.print(f"[dim]{time.perf_counter() - started:6.1f}s[/dim] {message}")

    def fail(message: str) -> None:
        raise CliError(message, exit_code=2)  # one line: dmf-export: error: MESSAGE

    if trt:  # checked first: a missing TensorRT must not cost a whole export before failing
        from dmf_deploy.tensorrt_support import tensorrt_import_reason

        reason = tensorrt_import_reason()
        if reason:
            fail(f"--trt: {reason}")
    if opt_batch is not None and opt_batch > max_batch:
        fail(f"--opt-batch {opt_batch} exceeds --max-batch {max_batch}")
    if triton_dir is not None:  # found now, not after the whole export
        from dmf_deploy.atomic import check_writable

        try:
            check_writable(triton_dir, folder=True)
        except OSError as exc:
            fail(f"--triton: {exc}")
    reports: list[dict] = []  # the parity report, printed once the spinner is gone
    try:
        with console.status("exporting...") if not quiet else contextlib.nullcontext():
            path = export_bundle(
                ckpt,
                out_dir,
                solver=solver,
                steps=steps,
                opset=opset,
                force=force,
                cohort=cohort,
                check=check,
                progress=progress,
                on_parity=reports.append,
                precision=precision,
                calibration=calibration,
                target=target or ("tensorrt" if trt else "onnxruntime"),  # --trt implies --target tensorrt
                bank_dtype=bank_dtype,
                explain=explain,
                int8_min_agreement=int8_min_agreement,
            )
    except (ExportError, CheckpointError) as exc:
        fail(str(exc))
    except ParityError as exc:
        print_parity(exc.report, format_report)
        console.print(f"[red]parity failed:[/red] {exc}")
        sys.exit(1)
    for report in reports:
        print_parity(report, format_report)
    if trt:
        from dmf_deploy.export.profiles import choose_opt_batch
        from dmf_deploy.export.tensorrt_build import EngineBuildError, build_trt_for_bundle

        try:
            build_trt_for_bundle(
                path,
                fp16=fp16,
                max_batch=max_batch,
                max_classes=max_classes,
                opt_batch=choose_opt_batch(max_batch, opt_batch, triton=triton_dir is not None),
                workspace_mb=workspace,
            )
        except EngineBuildError as exc:  # the bundle and its earlier engines are unchanged (one transaction)
            fail(f"--trt: {exc}")
        progress("built TensorRT engines")
    if triton_dir is not None:
        from dmf_deploy.export.triton import write_triton_repository
        from dmf_deploy.manifest import read_manifest

        write_triton_repository(path, read_manifest(path), triton_dir, use_plans=trt)
        progress(f"wrote Triton model repository {triton_dir}")
    progress(f"bundle ready: {path}")


def print_parity(report: dict, format_report) -> None:
    click.echo(format_report(report))
    if "int8" in report:
        from dmf_deploy.export.int8_parity import format_int8_report

        click.echo(format_int8_report(report["int8"]))


if __name__ == "__main__":
    main()
