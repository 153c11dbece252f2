"""Parity of an INT8 bundle: its decisions against the same bundle with the float32 backbone.

Quantized features cannot hold 1e-4 of PyTorch, so an INT8 export is held to what users see: the
top-1 class. Over `EPISODES` episodes of `N_WAY` rendered glyph classes (the images fp32 parity uses),
one shot and one query per class, the INT8 bundle and the float32 one each run their whole pipeline
(backbone, support, head) on ONNX Runtime; the report gives the top-1 agreement and the relative
error of features and scores (max|int8 - fp32| / max|fp32|, as fp32 parity defines it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dmf_deploy.export.parity import _episode_images, relative_error
from dmf_deploy.manifest import BACKBONE, HEAD, SUPPORT, Manifest
from dmf_deploy.model import DMFNet

N_WAY = 20
EPISODES = 50  # x N_WAY queries = 1,000 queries
# A query on which INT8 and fp32 disagree can change accuracy by at most one query, so 99% agreement
# bounds the accuracy change at 1 point: the most the INT8 backbone may cost (held-out one-shot error).
MIN_AGREEMENT = 0.99


def check_int8(model: DMFNet, fp32_backbone: Path, bundle: Path, manifest: Manifest) -> dict[str, Any]:
    """Top-1 agreement and relative errors of the INT8 bundle against its float32 backbone."""
    import onnxruntime as ort

    from dmf_deploy.export.parity import OrtGraphs

    backend = OrtGraphs(bundle, manifest)
    fp32 = ort.InferenceSession(str(fp32_backbone), providers=["CPUExecutionProvider"])
    agree, feature_error, score_error = [], 0.0, 0.0
    for episode in range(EPISODES):
        support, _, query = _episode_images("glyphs", N_WAY, 1, N_WAY, model, seed=10_000 + episode)
        images = np.concatenate([support, query])
        feats32 = fp32.run(["features"], {"images": images})[0]
        feats8 = backend.run(BACKBONE, {"images": images})["features"]
        scores32, scores8 = (_scores(backend, f[:N_WAY], f[N_WAY:]) for f in (feats32, feats8))
        agree.append(scores8.argmax(1) == scores32.argmax(1))
        feature_error = max(feature_error, relative_error(feats8, feats32))
        score_error = max(score_error, relative_error(scores8, scores32))
    agreement = float(np.mean(np.concatenate(agree)))
    return {
        "precision": "int8",
        "queries": EPISODES * N_WAY,
        "n_way": N_WAY,
        "top1_agreement": agreement,
        "min_agreement": MIN_AGREEMENT,
        "feature_relative": feature_error,
        "score_relative": score_error,
        "passed": agreement >= MIN_AGREEMENT,
    }


def _scores(backend, prototypes: np.ndarray, query: np.ndarray) -> np.ndarray:
    bank = backend.run(SUPPORT, {"prototypes": prototypes})
    return backend.run(HEAD, {"query_features": query, **bank})["scores"]


def format_int8_report(report: dict[str, Any]) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    return (
        f"INT8 against the float32 backbone, {report['queries']} glyph queries at N = {report['n_way']}: "
        f"top-1 agreement {report['top1_agreement']:.1%} (needs {report['min_agreement']:.0%}), relative "
        f"error features {report['feature_relative']:.2e}, scores {report['score_relative']:.2e}: {verdict}"
    )
