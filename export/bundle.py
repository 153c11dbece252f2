"""export_bundle: checkpoint -> a verified bundle folder (three ONNX graphs + manifest.json).

The bundle is assembled in a temporary folder beside the destination and moved into place only when
complete, so a failed export never leaves a partial bundle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dmf_deploy.atomic import (
    atomic_write_bytes,
    check_writable,
    current_umask,
    exchange_folders,
    remove_stale,
)
from dmf_deploy.bundle_head import BANK_DTYPES, HEAD_FORMS
from dmf_deploy.checkpoint import load_checkpoint_with_metadata, resolve_checkpoint
from dmf_deploy.config import DEFAULT_STEPS, PreprocessConfig, Solver
from dmf_deploy.export.cohort import Cohort, CohortError, bundle_rule, read_cohort, write_rule
from dmf_deploy.export.explain import check_explain, export_explain, with_explain_parity
from dmf_deploy.export.graphs import export_all
from dmf_deploy.export.int8_parity import HOLDOUT_EVERY, MIN_AGREEMENT, AgreementImages, manifest_record
from dmf_deploy.export.int8_parity import MAX_IMAGES as MAX_AGREEMENT_IMAGES
from dmf_deploy.export.lint import lint_file
from dmf_deploy.manifest import (
    BACKBONE,
    DEFAULT_OPSET,
    EXPLAIN,
    FORMAT,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PRECISIONS,
    Calibration,
    Manifest,
    explain_io,
    graph_io,
    opset_problem,
    sha256_file,
)
from dmf_deploy.packaged import is_demo_name
from dmf_deploy.preprocess import preprocess_frames

# A killed export leaves its staging (.partial) or swapped-out (.old) folder; one untouched this long is
# stale. Longer than a gallery's temp files: a large export can write nothing for minutes while it checks.
STALE_EXPORT_SECONDS = 3600.0
# Files a bundle holds besides those its manifest names: the parity report, TensorRT engines, and
# TensorRT's timing caches (export/tensorrt_build.py writes them beside the engines).
_BUNDLE_EXTRAS = re.compile(r"(parity\.json|.+\.plan|timing\..+\.cache)\Z")
Progress = Callable[[str], None]


class ExportError(ValueError):
    """An export that cannot proceed; nothing was written."""


class ParityError(RuntimeError):
    """The bundle was written but broke a parity tolerance; `report` is the parity report."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def validate_export_args(solver: str, steps: int, opset: int, kernel: int) -> Solver:
    """The export's solver for a model of `kernel`, checked once; ExportError says what is wrong."""
    try:
        checked = Solver.checked(solver, steps, kernel)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if checked.adaptive:
        raise ExportError(
            f"{solver} cannot be exported: its step count depends on the data. Use the fixed-step "
            "'dopri5' with --steps (8 reaches ~1e-6 of exact), or 'exact' for k = 1"
        )
    problem = opset_problem(opset)
    if problem:
        raise ExportError(problem)
    return checked


def validate_precision_args(precision: str, target: str, bank_dtype: str) -> None:
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if target not in HEAD_FORMS:
        raise ExportError(f"unknown target {target!r}; choose one of {', '.join(HEAD_FORMS)}")
    if bank_dtype not in BANK_DTYPES:
        raise ExportError(f"unknown bank dtype {bank_dtype!r}; choose one of {', '.join(BANK_DTYPES)}")


def require_calibration(ckpt: str | os.PathLike[str], calibration: str | os.PathLike[str] | None) -> None:
    if calibration is None and not is_demo_name(ckpt):
        raise ExportError(
            "--precision int8 needs calibration images: pass --calib DIR (calibration=DIR), a folder of a "
            "few hundred images like those the model will see"
        )


def load_calibration(
    calibration: str | os.PathLike[str] | None, preprocess: PreprocessConfig
) -> tuple[np.ndarray, Calibration, AgreementImages]:
    """The preprocessed calibration images of an INT8 export, their record, and the images held out
    for the INT8 gate: the folder's, or without one (the demo model) the package's own rendered sets."""
    from dmf_deploy.export.quantize import (
        DEMO_HELDOUT_IMAGES,
        CalibrationError,
        demo_calibration_frames,
        read_calibration_folder,
    )

    if calibration is None:
        frames, record = demo_calibration_frames()
        held_out = preprocess_frames(demo_calibration_frames(DEMO_HELDOUT_IMAGES, seed=8)[0], preprocess)
        domain = f"{len(held_out)} rendered demo images (the calibration set's mix, another seed)"
        return preprocess_frames(frames, preprocess), record, AgreementImages(held_out, domain)
    try:
        images, record, held_out = read_calibration_folder(calibration, preprocess)
    except CalibrationError as exc:
        raise ExportError(str(exc)) from exc
    domain = f"{len(held_out)} images held out from --calib {calibration}"
    return images, record, AgreementImages(held_out, domain)


def agreement_images(
    held_out: AgreementImages,
    cohort: Cohort | None,
    preprocess: PreprocessConfig,
    calibration: str | os.PathLike[str] | None,
) -> AgreementImages:
    """The INT8 gate's images: those held out of calibration, and the cohort's when there is one."""
    parts, domains = [held_out.images], [held_out.domain] if len(held_out.images) else []
    if cohort is not None:
        parts.append(preprocess_frames(cohort.frames, preprocess))
        domains.append(f"{len(cohort.frames)} images of --cohort {cohort.name}")
    images = np.concatenate(parts)
    if len(images) < 2:
        raise ExportError(
            f"--precision int8 measures its agreement with float32 on images held out from --calib (every "
            f"{HOLDOUT_EVERY}th), and {calibration} holds too few to hold any out; add images (8 or more), "
            "pass --cohort DIR, or skip the check with --no-check"
        )
    if len(images) > MAX_AGREEMENT_IMAGES:  # evenly spaced, so every source keeps its share
        images = images[np.linspace(0, len(images) - 1, MAX_AGREEMENT_IMAGES).round().astype(int)]
        domains.append(f"{MAX_AGREEMENT_IMAGES} of them measured")
    return AgreementImages(images, ", ".join(domains))


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise ExportError(f"{out} already exists; pass --force to replace it")
        _check_replaceable(out)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create the output folder {parent}: {exc}") from exc
    try:  # what the export does first: a staging folder beside `out`
        check_writable(parent, folder=True)
    except OSError as exc:
        raise ExportError(f"the output folder {parent} is not writable: {exc}") from None


def export_bundle(
    ckpt: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] = "bundle",
    solver: str = "dopri5",
    steps: int = DEFAULT_STEPS,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    check: bool = True,
    progress: Progress | None = None,
    on_parity: Callable[[dict[str, Any]], None] | None = None,
    precision: str = "fp32",
    calibration: str | os.PathLike[str] | None = None,
    target: str = "onnxruntime",
    bank_dtype: str = "float32",
    cohort: str | os.PathLike[str] | None = None,
    explain: bool = True,
    int8_min_agreement: float = MIN_AGREEMENT,
) -> Path:
    """Export a checkpoint (path or "demo") to a bundle folder and return its path.

    `precision="int8"` quantizes the backbone for `target` ("onnxruntime" or "tensorrt"), calibrated
    on the images in the `calibration` folder (the demo model has a default set); `target` also picks
    the head form (`dmf_deploy.bundle_head.HEAD_FORMS`); `bank_dtype="float16"` halves the class bank.
    `cohort`: a folder of classes the model never trained on (one sub-folder of images per class),
    to fit the open-set rule on (dmf_deploy.export.cohort); None copies the demo model's rule.
    With `check`, the parity report is saved as the bundle's parity.json and handed to `on_parity`.
    `explain`: also write the optional explain.onnx (what `Recognizer.explain` runs).
    `int8_min_agreement`: the INT8 gate's threshold, top-1 agreement with the float32 backbone on images
    held out from `calibration` (and the cohort's), checked with `check` (export/int8_parity.py).
    """
    if not 0.0 <= int8_min_agreement <= 1.0:
        raise ExportError(f"--int8-min-agreement {int8_min_agreement} is not a fraction between 0 and 1")
    say = progress or (lambda _msg: None)
    validate_precision_args(precision, target, bank_dtype)
    try:
        images = None if cohort is None else read_cohort(cohort)
    except CohortError as exc:
        raise ExportError(f"--cohort: {exc}") from exc
    out = Path(out_dir).absolute()
    # Inputs before outputs: a wrong --ckpt or --calib is the mistake to name, not an existing --out.
    if precision == "int8":
        require_calibration(ckpt, calibration)
    ckpt_path = resolve_checkpoint(ckpt)
    model, metadata = load_checkpoint_with_metadata(ckpt_path)
    validate_export_args(solver, steps, opset, model.config.kernel)
    calib_images, calib, measured = None, None, None
    if precision == "int8":
        calib_images, calib, held_out = load_calibration(calibration, model.config.preprocess)
        if check:
            measured = agreement_images(held_out, images, model.config.preprocess, calibration)
    _check_destination(out, force)

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the finished bundle follows the umask
    try:
        form = HEAD_FORMS[target]
        io_spec = graph_io(model.config, form, bank_dtype)
        paths = export_all(
            model,
            solver,
            steps,
            staging,
            opset,
            on_graph=lambda g: say(f"exported {g}.onnx"),
            form=form,
            bank_dtype=bank_dtype,
            io_spec=io_spec,
        )
        for name, path in paths.items():
            _check_graph(path, name, io_spec[name], target)
        say("checked graphs (onnx.checker full check, shape inference, TensorRT-readiness lint)")
        if explain:
            paths[EXPLAIN] = export_explain(model, solver, steps, staging, opset)
            io_spec = {**io_spec, EXPLAIN: explain_io(model.config)}
            say("exported explain.onnx")
        build = {
            "solver": solver,
            "steps": steps,
            "opset": opset,
            "checkpoint_sha256": sha256_file(ckpt_path),
            "weights_sha256": metadata["weights_sha256"],
            "target": form,
            "io": io_spec,
        }
        manifest = Manifest.build(model.config, paths, **build)
        manifest.write(staging)
        parity = None
        if check:
            from dmf_deploy.export.parity import check_bundle

            say("checking parity against PyTorch (same solver, N = 1, 3, 7)")
            parity = check_bundle(model, staging, manifest, solver, steps)
            if explain:
                parity = with_explain_parity(parity, check_explain(model, staging, manifest, solver, steps))
        if precision == "int8":
            quantized = (calib_images, calib, target, measured, int8_min_agreement)
            parity = _quantize(model, staging, paths, io_spec[BACKBONE], quantized, build, parity)
            say(f"quantized the backbone to INT8 for {target} ({calib.images} calibration images)")
        # Last, on the graphs as shipped (INT8 included): the open-set rule's constants follow them.
        manifest = Manifest.read(staging)
        rule = bundle_rule(staging, manifest, images)
        replace(manifest, open_set=write_rule(staging, rule)).write(staging)
        say(f"open-set rule: {rule.fitted_on}")
        if parity is not None:
            atomic_write_bytes(staging / "parity.json", json.dumps(parity, indent=2).encode())
        _install(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if parity is not None and on_parity is not None:
        on_parity(parity)
    if parity is not None and not parity["passed"]:
        raise ParityError(f"bundle written to {out}, but parity failed; see {out / 'parity.json'}", parity)
    return out


def _check_graph(path: Path, name: str, io: dict, target: str) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True)
    report = lint_file(path, name, io, target=target)
    if not report.ok:
        raise ExportError(f"{name}.onnx is not ready for {target}: " + "; ".join(report.errors))


def _quantize(model, staging: Path, paths, io, quantized: tuple, build: dict, parity):
    """Replace the staged float32 backbone by its INT8 form and write the INT8 manifest; with a parity
    report, add the INT8 agreement against the float32 backbone (`export.int8_parity`) to it."""
    from dmf_deploy.export.quantize import quantize_backbone

    images, calib, target, measured, min_agreement = quantized
    with tempfile.TemporaryDirectory(prefix=".fp32-backbone.", dir=staging.parent) as scratch:
        fp32_backbone = Path(scratch) / "backbone.onnx"
        os.replace(paths[BACKBONE], fp32_backbone)
        quantize_backbone(fp32_backbone, paths[BACKBONE], images, target)
        _check_graph(paths[BACKBONE], BACKBONE, io, target)
        manifest = Manifest.build(model.config, paths, precision="int8", calibration=calib, **build)
        manifest.write(staging)
        if parity is None:
            return None
        from dmf_deploy.export.int8_parity import check_int8

        int8 = check_int8(fp32_backbone, staging, manifest, measured, min_agreement)
        replace(manifest, int8_check=manifest_record(int8)).write(staging)  # the figure and its domain
    return {**parity, "passed": parity["passed"] and int8["passed"], "int8": int8}


def _bundle_files(folder: Path) -> set[str] | None:
    """The file names a bundle's manifest names (any format version); None if it has no readable one."""
    manifest_path = folder / MANIFEST_NAME
    try:
        if manifest_path.is_symlink() or manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    files = {MANIFEST_NAME}
    for section in ("graphs", "engines"):
        entries = manifest.get(section)
        for entry in entries.values() if isinstance(entries, dict) else ():
            if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                files.add(entry["file"])
    open_set = manifest.get("open_set")  # the open-set record (version 2)
    if isinstance(open_set, dict) and isinstance(open_set.get("file"), str):
        files.add(open_set["file"])
    return files


def _check_replaceable(out: Path) -> None:
    """--force replaces only an empty folder or a bundle; refuse anything else, saying why."""
    refuse = f"--force replaces only an empty folder or a dmf bundle; {out} "
    if out.is_symlink():
        raise ExportError(refuse + "is a symbolic link: give the folder it points to")
    if not out.is_dir():
        raise ExportError(refuse + "is not a folder")
    try:
        entries = list(os.scandir(out))
    except OSError as exc:
        raise ExportError(refuse + f"cannot be listed: {exc}") from exc
    if not entries:
        return
    named = _bundle_files(out)
    if named is None:
        raise ExportError(refuse + f"is not empty and has no {FORMAT} {MANIFEST_NAME}; nothing was deleted")
    foreign = sorted(
        e.name
        for e in entries
        if not e.is_file(follow_symlinks=False) or not (e.name in named or _BUNDLE_EXTRAS.match(e.name))
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ExportError(
            refuse + f"is a bundle that also holds what its manifest does not name ({shown}); "
            "nothing was deleted"
        )


def _install(staging: Path, out: Path) -> None:
    """Put the finished bundle in place of `out`; what was there goes only once the new bundle is in.

    Where the OS allows, one atomic exchange: `out` always holds a complete bundle. Elsewhere two renames,
    with a moment between them when `out` does not exist.
    """
    leftovers = re.compile(re.escape(f".{out.name}.") + r"(.+\.partial|old-\d+)\Z")
    remove_stale(out.parent, leftovers, STALE_EXPORT_SECONDS, folders=True)
    if not (out.exists() or out.is_symlink()):
        os.replace(staging, out)
        return
    _check_replaceable(out)  # again: the folder may have changed during the export
    if exchange_folders(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now the old content
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
