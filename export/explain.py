"""explain.onnx, the bundle's optional graph of what the head aligned: its export, its parity check
against PyTorch, and `add_explain_graph`, which adds it to a bundle exported without it.

The graph takes the head's inputs and returns `dmf_deploy.explain_head.explain_outputs`. Parity holds it
against the grid_sample head (`DMFHead`), not against the function it was traced from: sampling
positions from `DMFHead.sampling_positions`, contributions from `DMFNet.score_map`, and the aligned
norms from the ODE solved in channel space.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from dmf_deploy.atomic import atomic_write_bytes
from dmf_deploy.bundle_head import bundle_bank
from dmf_deploy.checkpoint import load_checkpoint_with_metadata, resolve_checkpoint
from dmf_deploy.explain_head import explain_outputs
from dmf_deploy.export.graphs import example_inputs, export_graph
from dmf_deploy.export.parity import (
    CLASS_COUNTS,
    RELATIVE_TOLERANCE,
    Comparison,
    OrtGraphs,
    _compare,
    _episode_images,
)
from dmf_deploy.head import ClassBank, integrate_channels
from dmf_deploy.manifest import (
    CLASS_BANK,
    EXPLAIN,
    HEAD,
    BundleError,
    Manifest,
    explain_io,
    graph_io,
    graph_spec,
)
from dmf_deploy.model import DMFNet


class ExplainGraph(nn.Module):
    def __init__(self, model: DMFNet, solver: str, steps: int) -> None:
        super().__init__()
        self.model, self.solver, self.steps = model, solver, steps

    def forward(
        self,
        query_features: torch.Tensor,
        support_offset: torch.Tensor,
        tap_projections: torch.Tensor,
        class_weight: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bank = ClassBank(support_offset, tap_projections, class_weight)
        return explain_outputs(self.model, query_features, bank, self.solver, self.steps)


def export_explain(model: DMFNet, solver: str, steps: int, out_dir: Path, opset: int) -> Path:
    """Write explain.onnx into out_dir (checked by onnx.checker and strict shape inference)."""
    path = Path(out_dir) / f"{EXPLAIN}.onnx"
    module = ExplainGraph(model, solver, steps).eval()
    examples = example_inputs(model, graph_io(model.config))[HEAD]  # explain.onnx takes the head's inputs
    export_graph(module, examples, explain_io(model.config), path, opset)
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True)
    return path


def reference_outputs(
    model: DMFNet, query: torch.Tensor, bank: ClassBank, solver: str, steps: int
) -> dict[str, np.ndarray]:
    """What explain.onnx must return, from the grid_sample head (`bank` in the reference layout)."""
    config, head = model.config, model.head
    q, c, h, w = query.shape
    n = bank.class_weight.shape[0]
    with torch.no_grad():
        py, px = head.sampling_positions(query, bank)  # [Q, N, 9, h, w] each
        points = torch.stack((px, py), dim=-1).reshape(q, n, 9, h * w, 2).transpose(2, 3)
        contributions = model.score_map(query, bank, solver, steps) * config.score_scale((h, w))
        x0 = query.unsqueeze(1).expand(q, n, c, h, w).reshape(q * n, c, h, w)
        filt = head.filters(query, bank).reshape(q * n, -1, h, w)
        x1 = integrate_channels(x0, filt, head, solver, steps, config.rtol, config.atol)
        aligned = x1.reshape(q, n, c, h, w).square().sum(dim=2).sqrt()
    arrays = {"sampling_positions": points, "contributions": contributions, "aligned": aligned}
    return {k: np.ascontiguousarray(v.numpy()) for k, v in arrays.items()}


def check_explain(
    model: DMFNet,
    bundle: Path,
    manifest: Manifest,
    solver: str,
    steps: int,
    tol: float = RELATIVE_TOLERANCE,
    sources: tuple[str, ...] = ("random", "glyphs"),
    class_counts: tuple[int, ...] = CLASS_COUNTS,
) -> list[Comparison]:
    """explain.onnx on ONNX Runtime against the PyTorch reference, for the parity report's episodes."""
    backend = OrtGraphs(bundle, manifest, graphs=(EXPLAIN,))
    comparisons = []
    model = model.eval()
    for source in sources:
        for n_way in class_counts:
            support, labels, query = _episode_images(source, n_way, 2, 5, model, seed=n_way)
            with torch.no_grad():
                feats = model.features(torch.from_numpy(np.concatenate([support, query])))
                protos = model.prototypes(feats[: len(support)], torch.from_numpy(labels), n_way)
                bank = model.class_bank(protos)
                q_feats = feats[len(support) :]
                stored = {k: v.numpy() for k, v in zip(CLASS_BANK, bundle_bank(bank))}
            ref = reference_outputs(model, q_feats, bank, solver, steps)
            got = backend.run(EXPLAIN, {"query_features": q_feats.numpy(), **stored})
            comparisons += _compare(f"{source} N={n_way}", ref, got, tol)
    return comparisons


def with_explain_parity(report: dict[str, Any], comparisons: list[Comparison]) -> dict[str, Any]:
    """A parity report (`check_bundle`'s) with explain.onnx's comparisons added."""
    return {
        **report,
        "passed": bool(report["passed"]) and all(c.passed for c in comparisons),
        "comparisons": [*report["comparisons"], *(asdict(c) for c in comparisons)],
    }


def add_explain_graph(ckpt: str | os.PathLike[str], bundle: str | os.PathLike[str]) -> Manifest:
    """Add explain.onnx to a bundle exported without it, leaving its other graphs untouched (a bundle
    that has one already is refused: nothing is replaced that the user did not ask to replace).

    The checkpoint must be the one the bundle was exported from (its weights' sha256 is checked); the
    graph is exported with the bundle's solver, steps and opset and parity-checked before the manifest
    (and parity.json, when there is one) is rewritten to declare it. Returns the new manifest.
    """
    root = Path(bundle)
    manifest = Manifest.read(root)
    if EXPLAIN in manifest.graphs or (root / f"{EXPLAIN}.onnx").exists():
        raise BundleError(f"{root} already has {EXPLAIN}.onnx; re-export the bundle to replace it")
    model, metadata = load_checkpoint_with_metadata(resolve_checkpoint(ckpt))
    if metadata["weights_sha256"] != manifest.weights_sha256:
        raise BundleError(f"{ckpt} is not the checkpoint {root} was exported from (other weights)")
    staging = root / f".{EXPLAIN}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        path = export_explain(model, manifest.solver, manifest.steps, staging, manifest.opset)
        graph = graph_spec(path, explain_io(model.config))
        updated = replace(manifest, graphs={**manifest.graphs, EXPLAIN: graph})
        comparisons = check_explain(model, staging, updated, manifest.solver, manifest.steps)
        if not all(c.passed for c in comparisons):
            worst = max(comparisons, key=lambda c: c.relative)
            raise BundleError(
                f"explain.onnx broke parity ({worst.output}, {worst.case}: relative {worst.relative:.2e})"
            )
        os.replace(path, root / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report_path = root / "parity.json"
    if report_path.is_file():
        report = with_explain_parity(json.loads(report_path.read_text()), comparisons)
        atomic_write_bytes(report_path, json.dumps(report, indent=2).encode())
    updated.write(root)
    return updated

