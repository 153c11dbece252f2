"""Parity: the exported graphs on ONNX Runtime against the PyTorch model run with the SAME solver.

"relative" = max|got - ref| / max|ref| over a whole output. The comparison itself is
Polygraphy's (`SimpleCompareFunc` with atol = tolerance * max|ref| and rtol = 0, which is that definition).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmf_deploy.bundle_head import BANK_DTYPES, stored_bank
from dmf_deploy.glyphs import GlyphSet
from dmf_deploy.head import ClassBank
from dmf_deploy.manifest import BACKBONE, CLASS_BANK, GRAPH_NAMES, HEAD, SUPPORT, Manifest, verify_graph
from dmf_deploy.model import DMFNet
from dmf_deploy.preprocess import preprocess_frames

# ORT and PyTorch pick different conv algorithms; their float32 sums differ by ~1e-6 relative per
# layer. 1e-4 leaves two orders of magnitude for depth (ResNet-12 is 12 convs deep) while still
# catching any real discrepancy (a wrong tap, sign or solver weight moves scores by >1e-2).
RELATIVE_TOLERANCE = 1e-4
# A float16 bank tensor: ORT and PyTorch may round a value that sits on a float16 rounding boundary
# to neighbouring float16 values, one unit in the last place: at most 2^-10 of max|ref|.
FLOAT16_TOLERANCE = 1e-3
CLASS_COUNTS = (1, 3, 7)


@dataclass
class Comparison:
    case: str
    output: str
    max_abs: float
    mean_abs: float
    relative: float
    passed: bool


class OrtGraphs:
    """The bundle's graphs (default: the three) in ONNX Runtime sessions (CPU), run by graph name."""

    def __init__(self, bundle: Path, manifest: Manifest, graphs: tuple[str, ...] = GRAPH_NAMES) -> None:
        import onnxruntime as ort

        self._sessions = {
            graph: ort.InferenceSession(
                str(verify_graph(bundle, manifest, graph)), providers=["CPUExecutionProvider"]
            )
            for graph in graphs
        }

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._sessions[graph]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs)))


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.abs(ref).max())
    return float(np.abs(got - ref).max()) / scale if scale > 0 else float(np.abs(got - ref).max())


def _compare(
    case: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: float
) -> list[Comparison]:
    from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # we print our own table
    atol = {name: tol * max(float(np.abs(v).max()), 1e-30) for name, v in ref.items()}
    runs = RunResults(
        [
            ("pytorch", [IterationResult(ref, runner_name="pytorch")]),
            ("onnxruntime", [IterationResult(got, runner_name="onnxruntime")]),
        ]
    )
    result = Comparator.compare_accuracy(
        runs, compare_func=SimpleCompareFunc(rtol={"": 0.0}, atol=atol, check_error_stat={"": "max"})
    )
    per_output = next(iter(result[0].values()))[0]  # the one runner pair, first iteration
    return [
        Comparison(
            case,
            name,
            float(r.max_absdiff),
            float(r.mean_absdiff),
            relative_error(got[name], ref[name]),
            bool(r),
        )
        for name, r in per_output.items()
    ]


def _episode_images(source: str, n_way: int, shots: int, queries: int, model: DMFNet, seed: int) -> tuple:
    """Support and query images for one episode: random tensors, or real rendered glyph images."""
    size = model.config.preprocess.image_size
    gen = np.random.default_rng(seed)
    if source == "random":
        support = gen.standard_normal((n_way * shots, 3, size, size)).astype(np.float32)
        query = gen.standard_normal((queries, 3, size, size)).astype(np.float32)
    else:
        glyphs = GlyphSet(num_classes=n_way, seed=seed, image_size=max(size, 64))
        frames = [glyphs.render(c, i) for c in range(n_way) for i in range(shots)]
        support = preprocess_frames(frames, model.config.preprocess)
        query_frames = [glyphs.render(i % n_way, 1000 + i) for i in range(queries)]
        query = preprocess_frames(query_frames, model.config.preprocess)
    labels = np.repeat(np.arange(n_way), shots)
    return support, labels, query


def check_bundle(
    model: DMFNet,
    bundle: Path,
    manifest: Manifest,
    solver: str,
    steps: int,
    tol: float = RELATIVE_TOLERANCE,
    sources: tuple[str, ...] = ("random", "glyphs"),
    class_counts: tuple[int, ...] = CLASS_COUNTS,
) -> dict[str, Any]:
    """Run every graph and the whole pipeline on ORT and PyTorch; return a JSON-able report."""
    backend = OrtGraphs(bundle, manifest)
    bank_dtype = manifest.bank_dtypes["tap_projections"]
    comparisons: list[Comparison] = []
    agreement: list[float] = []
    solver_distance: dict[str, float] = {}
    model = model.eval()
    for source in sources:
        for n_way in class_counts:
            case = f"{source} N={n_way}"
            support, labels, query = _episode_images(source, n_way, 2, 5, model, seed=n_way)
            with torch.no_grad():
                feats = model.features(torch.from_numpy(np.concatenate([support, query])))
                protos = model.prototypes(feats[: len(support)], torch.from_numpy(labels), n_way)
                # The bank as the bundle stores it (layout, float16 tap_projections), and the reference
                # scores computed from those very values.
                bank = model.class_bank(protos)
                bank = bank._replace(tap_projections=bank.tap_projections.to(BANK_DTYPES[bank_dtype]).float())
                laid = stored_bank(bank, manifest.target, bank_dtype)
                q_feats = feats[len(support) :]
                ref_scores = model.head_scores(q_feats, bank, solver, steps).numpy()
                stored = {k: v.numpy() for k, v in zip(CLASS_BANK, laid)}
            # Each graph fed the reference inputs, so errors do not compound across graphs.
            got = backend.run(BACKBONE, {"images": query})
            comparisons += _compare(case, {"features": q_feats.numpy()}, got, tol)
            got = backend.run(SUPPORT, {"prototypes": protos.numpy()})
            for name in CLASS_BANK:
                tensor_tol = FLOAT16_TOLERANCE if got[name].dtype == np.float16 else tol
                wide = {name: stored[name].astype(np.float32)}
                comparisons += _compare(case, wide, {name: got[name].astype(np.float32)}, tensor_tol)
            head_in = {"query_features": q_feats.numpy(), **stored}
            comparisons += _compare(case, {"scores": ref_scores}, backend.run(HEAD, head_in), tol)
            # End to end: ORT all the way, as the runtime runs it.
            e2e = _ort_episode(backend, support, labels, query, n_way)
            comparisons += _compare(case + " end-to-end", {"scores": ref_scores}, {"scores": e2e}, tol)
            agreement.append(float(np.mean(e2e.argmax(1) == ref_scores.argmax(1))))
            if source == sources[-1] and n_way == class_counts[-1]:
                solver_distance = _solver_distances(model, q_feats, bank, ref_scores)
    return {
        "solver": solver,
        "steps": steps,
        "tolerance": tol,
        "passed": all(c.passed for c in comparisons),
        "top1_agreement": float(np.mean(agreement)),
        "comparisons": [asdict(c) for c in comparisons],
        "solver_distance": solver_distance,
    }


def _ort_episode(
    backend: OrtGraphs, support: np.ndarray, labels: np.ndarray, query: np.ndarray, n_way: int
) -> np.ndarray:
    feats = backend.run(BACKBONE, {"images": np.concatenate([support, query])})["features"]
    s_feats, q_feats = feats[: len(support)], feats[len(support) :]
    protos = np.stack([s_feats[labels == c].mean(0) for c in range(n_way)]).astype(np.float32)
    bank = backend.run(SUPPORT, {"prototypes": protos})
    return backend.run(HEAD, {"query_features": q_feats, **bank})["scores"]


def _solver_distances(
    model: DMFNet, q_feats: torch.Tensor, bank: ClassBank, scores: np.ndarray
) -> dict[str, float]:
    """How far the exported solver's scores are from `exact` (k = 1) and from the training solver."""
    out = {}
    refs = {"training solver": (model.config.solver, model.config.steps)}
    if model.config.kernel == 1:
        refs["exact"] = ("exact", 1)
    with torch.no_grad():
        for label, (solver, steps) in refs.items():
            other = model.head_scores(q_feats, bank, solver, steps).numpy()
            out[f"vs {label} ({solver}/{steps})"] = relative_error(scores, other)
    return out


def format_report(report: dict[str, Any]) -> str:
    """One row per output: its worst case over every episode (the full list is in parity.json)."""
    worst: dict[str, dict[str, Any]] = {}
    for c in report["comparisons"]:
        key = c["output"] + (" (end to end)" if c["case"].endswith("end-to-end") else "")
        if key not in worst or c["relative"] > worst[key]["relative"]:
            worst[key] = c
    episodes = len({c["case"].removesuffix(" end-to-end") for c in report["comparisons"]})
    lines = [f"{'output':<30} {'max abs':>10} {'mean abs':>10} {'relative':>10}  worst case{'':<14} ok"]
    for key, c in worst.items():
        lines.append(
            f"{key:<30} {c['max_abs']:>10.2e} {c['mean_abs']:>10.2e} {c['relative']:>10.2e}  "
            f"{c['case']:<24} {'yes' if c['passed'] else 'NO'}"
        )
    lines.append(
        f"{episodes} episodes (random and rendered images, N = 1, 3, 7); top-1 agreement end to end: "
        f"{report['top1_agreement']:.1%}"
    )
    for label, dist in report["solver_distance"].items():
        lines.append(f"{report['solver']}/{report['steps']} {label}: relative {dist:.2e}")
    verdict = "PASSED" if report["passed"] else "FAILED"
    failed = sum(not c["passed"] for c in report["comparisons"])
    lines.append(
        f"parity {verdict} (tolerance {report['tolerance']:.0e} relative; {failed} comparisons failed)"
    )
    return "\n".join(lines)
