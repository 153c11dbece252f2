"""The INT8 gate: does the INT8 backbone make the float32 backbone's decisions on the user's images?

Quantized features cannot hold 1e-4 of PyTorch, so an INT8 export is held to what users see: the
top-1 class. It is measured on the user's domain (`AgreementImages`): images held out from `--calib`
(every `HOLDOUT_EVERY`-th by name, never calibrated on), plus the `--cohort` folder when one is given;
the demo model, calibrated on images it renders, is measured on more of them rendered with another seed.

No labels are needed. The images are dealt into episodes of `N_WAY` classes, each class one image (one
shot), and the queries are `VIEWS` changed views of each class's image (shifted and zoomed, rotated,
in flatter light, blurred): the same thing seen again. The INT8 bundle and the same bundle with its float32
backbone each score every query (backbone, support, head on ONNX Runtime). A query counts only when
the float32 decision is clear, its best class ahead of the second by `CLEAR_MARGIN` of the query's
score range: two similar images give near-tied scores, and a tie flips on rounding whatever the
precision. The report gives the agreement over the counted queries with its 95% (Wilson) interval,
how many queries were counted and why some were not, and the relative error of features and scores
(max|int8 - fp32| / max|fp32|, as fp32 parity defines it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass  # this module imports no torch: dmf-export's options read it
from pathlib import Path
from typing import Any

import numpy as np

from dmf_deploy.manifest import BACKBONE, HEAD, SUPPORT, Manifest

N_WAY = 20  # classes an episode (fewer when fewer images are held out)
VIEWS = 4  # queries per image: shifted and zoomed, rotated, in flatter light, blurred
HOLDOUT_EVERY = 4  # every 4th --calib image (by name) is held out of calibration for this check
MAX_IMAGES = 400  # images measured (x VIEWS queries): about 1,000 queries resolve 99% agreement
# A query on which INT8 and fp32 disagree can change accuracy by at most one query, so 99% agreement
# bounds the accuracy change at 1 point: the most the INT8 backbone may cost (held-out one-shot error).
MIN_AGREEMENT = 0.99
# A query is clear when its best float32 score leads the second by 5% of its score range (best minus
# worst class): a tie flips on rounding, and 5% is over ten times the score error of a well calibrated
# INT8 backbone (8.6e-4 relative for ResNet-12, benchmarks/README.md) yet well under the margin of a
# real match among distinct images.
CLEAR_MARGIN = 0.05
WANTED_QUERIES = 1000  # below this the interval is wide, and the report says how to measure more
BATCH = 32


@dataclass(frozen=True)
class AgreementImages:
    """Preprocessed images [M, 3, S, S] of the user's domain, and where they came from (for people)."""

    images: np.ndarray
    domain: str


def check_int8(
    fp32_backbone: Path,
    bundle: Path,
    manifest: Manifest,
    measured: AgreementImages,
    min_agreement: float = MIN_AGREEMENT,
) -> dict[str, Any]:
    """Top-1 agreement of the INT8 bundle with its float32 backbone on `measured` (see the docstring)."""
    import onnxruntime as ort

    from dmf_deploy.export.parity import OrtGraphs, relative_error

    backend = OrtGraphs(bundle, manifest)
    fp32 = ort.InferenceSession(str(fp32_backbone), providers=["CPUExecutionProvider"])
    images = measured.images
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    n_way = min(N_WAY, len(images))
    agree, clear, feature_error, score_error = [], [], 0.0, 0.0
    episodes = [order[i : i + n_way] for i in range(0, len(order), n_way)]
    if len(episodes) > 1 and len(episodes[-1]) < 2:  # a one-class episode decides nothing
        episodes[-2] = np.concatenate(episodes[-2:])
        episodes.pop()
    for members in episodes:
        support = images[members]
        queries = np.stack([v for image in support for v in changed_views(image, rng)])
        batch = np.concatenate([support, queries])
        feats32 = _batched(lambda x: fp32.run(["features"], {"images": x})[0], batch)
        feats8 = _batched(lambda x: backend.run(BACKBONE, {"images": x})["features"], batch)
        n = len(members)
        scores32, scores8 = (_scores(backend, f[:n], f[n:]) for f in (feats32, feats8))
        agree.append(scores8.argmax(1) == scores32.argmax(1))
        clear.append(clear_margin(scores32))
        feature_error = max(feature_error, relative_error(feats8, feats32))
        score_error = max(score_error, relative_error(scores8, scores32))
    agree_all, clear_all = np.concatenate(agree), np.concatenate(clear)
    counted = int(clear_all.sum())
    agreed = int(agree_all[clear_all].sum())
    agreement = agreed / counted if counted else 0.0
    low, high = wilson_interval(agreed, counted)
    return {
        "precision": "int8",
        "domain": measured.domain,
        "images": len(images),
        "views": VIEWS,
        "n_way": n_way,
        "queries": counted,
        "near_ties": int(len(clear_all) - counted),
        "top1_agreement": agreement,
        "interval95": [low, high],
        "agreement_all_queries": float(agree_all.mean()),
        "min_agreement": min_agreement,
        "feature_relative": feature_error,
        "score_relative": score_error,
        "passed": counted > 0 and agreement >= min_agreement,
    }


def changed_views(image: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """`VIEWS` changed views of one preprocessed image [3, S, S]: the same thing seen again."""
    import cv2

    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
    size = hwc.shape[0]
    centre = (size / 2 - 0.5, size / 2 - 0.5)

    def warp(angle: float, scale: float, shift: float) -> np.ndarray:
        matrix = cv2.getRotationMatrix2D(centre, angle, scale)
        matrix[:, 2] += rng.uniform(-shift, shift, 2)
        return cv2.warpAffine(
            hwc, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )

    views = [
        warp(0.0, rng.uniform(0.92, 1.08), size / 12),  # shifted and zoomed
        warp(rng.uniform(-10, 10), 1.0, size / 24),  # rotated
        # Flatter light: contrast lowered towards the image's mean, so every value stays within the
        # image's own range (a brighter or higher-contrast copy leaves the calibrated range, a test of
        # the calibration set rather than of the quantized backbone on the user's images).
        hwc.mean() + rng.uniform(0.75, 0.95) * (hwc - hwc.mean()),
        cv2.GaussianBlur(warp(0.0, 1.0, size / 24), (0, 0), rng.uniform(0.6, 1.0)),  # blurred
    ]
    return [np.ascontiguousarray(v.transpose(2, 0, 1), dtype=np.float32) for v in views]


def clear_margin(scores: np.ndarray) -> np.ndarray:
    """[Q] bool: the best class leads the second by at least CLEAR_MARGIN of the row's score range."""
    ranked = np.sort(scores, axis=1)
    spread = ranked[:, -1] - ranked[:, 0]
    return (spread > 0) & (ranked[:, -1] - ranked[:, -2] >= CLEAR_MARGIN * spread)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (sound near 100%, where the normal one is not)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = p + z * z / (2 * trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    denominator = 1 + z * z / trials
    return max(0.0, (centre - half) / denominator), min(1.0, (centre + half) / denominator)


def _batched(run, images: np.ndarray) -> np.ndarray:
    return np.concatenate([run(images[i : i + BATCH]) for i in range(0, len(images), BATCH)])


def _scores(backend, prototypes: np.ndarray, query: np.ndarray) -> np.ndarray:
    bank = backend.run(SUPPORT, {"prototypes": prototypes})
    return backend.run(HEAD, {"query_features": query, **bank})["scores"]


def manifest_record(report: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of the check: the figure, its interval and size, and its domain."""
    keys = ("top1_agreement", "interval95", "queries", "near_ties", "images", "min_agreement", "domain")
    return {key: report[key] for key in keys}


def format_int8_report(report: dict[str, Any]) -> str:
    """What was measured, on what, the verdict, and how to proceed when it is not enough."""
    if "domain" not in report:  # parity.json of 0.2: rendered glyphs
        return (
            f"INT8 against the float32 backbone, {report['queries']} glyph queries: top-1 agreement "
            f"{report['top1_agreement']:.1%}: {'PASSED' if report['passed'] else 'FAILED'}"
        )
    low, high = report["interval95"]
    lines = [
        f"INT8 against the float32 backbone on {report['domain']}: {report['queries']} queries with a clear "
        f"margin ({report['views']} changed views of each of {report['images']} images, {report['n_way']} "
        f"classes an episode; {report['near_ties']} near-tied queries not counted): top-1 agreement "
        f"{report['top1_agreement']:.1%} (95% interval {low:.1%} to {high:.1%}; needs "
        f"{report['min_agreement']:.1%}), relative error features {report['feature_relative']:.2e}, scores "
        f"{report['score_relative']:.2e}: {'PASSED' if report['passed'] else 'FAILED'}"
    ]
    if report["queries"] < WANTED_QUERIES:
        lines.append(
            f"  only {report['queries']} queries (about {WANTED_QUERIES} resolve 99%): to measure more, add "
            f"images to --calib (every {HOLDOUT_EVERY}th is held out for this check) or pass --cohort DIR"
        )
    if not report["passed"]:
        floor = math.floor(report["top1_agreement"] * 1000) / 1000
        lines.append(
            "  to proceed: calibrate on more images like those the model will see (--calib), keep the "
            "float32 backbone (--precision fp32), or accept this agreement with --int8-min-agreement "
            f"{floor:g}"
        )
    return "\n".join(lines)
