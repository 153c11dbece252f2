"""Fit the bundle's open-set rule (dmf_deploy.open_set) from a cohort of labelled images.

The cohort is classes the model never trained on (a validation set: `dmf-export --cohort DIR`, one
sub-folder of images per class; benchmarks/open_set.py --fit reads Omniglot's Greek). The protocol, the
one benchmarks/open_set.py reports on: per draw, pick `PICKED` classes, enrol one shot of N of them, and
query another drawing of each enrolled class (known) and one of `UNKNOWN` never-enrolled classes. The
rule stores the quantiles of the known queries' relative scores at N = FIT_ENROLLED, so that
`sensitivity` is the fraction of known queries refused.

Everything runs on the bundle's own graphs in ONNX Runtime sessions: no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dmf_deploy.atomic import atomic_write_bytes
from dmf_deploy.config import PreprocessConfig
from dmf_deploy.manifest import BACKBONE, CLASS_BANK, HEAD, SUPPORT, Manifest
from dmf_deploy.open_set import (
    DEFAULT_MIN_CONTRAST,
    OPEN_SET_FILE,
    QUANTILE_STEPS,
    GraphRunner,
    OpenSetRule,
    default_open_set,
    gate_contrast,
    own_scores,
)
from dmf_deploy.preprocess import (
    ImageFileError,
    model_views,
    read_image_file,
    stack_inputs,
)

PICKED, UNKNOWN = 20, 10  # classes per draw; never-enrolled ones queried
FIT_ENROLLED = 10  # the N the quantiles are measured at
FIT_DRAWS = 200
BATCH = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MAX_COHORT_CLASSES = 200
MAX_COHORT_IMAGES = 20  # per class: enough for distinct shot and query drawings
MAX_IMAGE_BYTES = 16 << 20
# The least spread (5% to 50% quantile) of the known queries' relative scores that can fit a rule: a
# cohort of copies scores exactly 1 everywhere, and float32 rounding alone is ~1e-7.
SEPARATION_TOLERANCE = 1e-5


class CohortError(ValueError):
    """A cohort folder that cannot be used to fit the open-set rule."""


@dataclass(frozen=True)
class ImageScores:
    """Per image of a cohort: what the protocol needs, computed once."""

    features: np.ndarray  # [n, C, h, w]
    banks: dict[str, np.ndarray]  # each image as a one-shot class
    own: np.ndarray  # [n] each image scored against itself as a class: the relative score's divisor
    contrast: np.ndarray  # [n] the contrast gate's measure (open_set.gate_contrast)


@dataclass(frozen=True)
class Draw:
    enrolled: np.ndarray  # image ids enrolled, one per class
    known: np.ndarray  # image ids: another drawing of each enrolled class, aligned with `enrolled`
    unknown: np.ndarray  # image ids of never-enrolled classes


def score_images(backend: GraphRunner, preprocess: PreprocessConfig, frames: list[np.ndarray]) -> ImageScores:
    feats, banks, own, contrast = [], [], [], []
    for start in range(0, len(frames), BATCH):
        chunk, views = model_views(frames[start : start + BATCH], preprocess)
        f = backend.run(BACKBONE, {"images": stack_inputs(views, preprocess)})["features"]
        bank = backend.run(SUPPORT, {"prototypes": f})
        feats.append(f)
        banks.append(bank)
        own.extend(own_scores(backend, f, bank))
        # The gate Recognizer.classify applies: on the view for a model that finds the drawing.
        contrast.extend(gate_contrast(frame, view, preprocess) for frame, view in zip(chunk, views))
    return ImageScores(
        np.concatenate(feats),
        {k: np.concatenate([b[k] for b in banks]) for k in CLASS_BANK},
        np.asarray(own, np.float32),
        np.asarray(contrast, np.float32),
    )


def head_scores(
    backend: GraphRunner, query_features: np.ndarray, scores: ImageScores, enrolled: np.ndarray
) -> np.ndarray:
    """[Q, N]: queries against one-shot classes of the images `enrolled` of `scores`."""
    bank = {k: scores.banks[k][enrolled] for k in CLASS_BANK}
    return backend.run(HEAD, {"query_features": query_features, **bank})["scores"]


def draw_episodes(labels: np.ndarray, n_enrolled: int, draws: int, seed: int) -> list[Draw]:
    """Seeded draws of the protocol over images labelled `labels` (>= 2 images per class used)."""
    rng = np.random.default_rng(seed)
    classes = np.array([c for c in np.unique(labels) if np.count_nonzero(labels == c) >= 2])
    picked = min(PICKED, len(classes))
    if picked <= n_enrolled:
        raise CohortError(
            f"{len(classes)} classes with two or more images: the protocol needs more than {n_enrolled}"
        )
    out = []
    for _ in range(draws):
        chosen = rng.choice(classes, picked, replace=False)
        enrolled, known = [], []
        for c in chosen[:n_enrolled]:
            shot, query = rng.choice(np.flatnonzero(labels == c), 2, replace=False)
            enrolled.append(shot)
            known.append(query)
        others = rng.choice(chosen[n_enrolled:], min(UNKNOWN, picked - n_enrolled), replace=False)
        unknown = [rng.choice(np.flatnonzero(labels == c)) for c in others]
        out.append(Draw(np.array(enrolled), np.array(known), np.array(unknown)))
    return out


def known_relative_scores(backend: GraphRunner, scores: ImageScores, draws: list[Draw]) -> np.ndarray:
    """The relative score (best / own) of every known query of every draw."""
    out = []
    for d in draws:
        best = head_scores(backend, scores.features[d.known], scores, d.enrolled).max(axis=1)
        out.append(best / scores.own[d.known])
    return np.concatenate(out)


def fit_rule(
    backend: GraphRunner,
    preprocess: PreprocessConfig,
    frames: list[np.ndarray],
    labels: np.ndarray,
    fitted_on: str,
    draws: int = FIT_DRAWS,
    seed: int = 0,
) -> OpenSetRule:
    """The rule whose quantiles are those of the cohort's known queries at N = FIT_ENROLLED."""
    labels = np.asarray(labels)
    n = min(FIT_ENROLLED, len(np.unique(labels)) - 1)
    episodes = draw_episodes(labels, n, draws, seed)
    scores = score_images(backend, preprocess, frames)
    blank = int(np.count_nonzero(scores.contrast < DEFAULT_MIN_CONTRAST))
    if blank:  # the rule never sees such frames: the gate calls them unknown whatever they score
        raise CohortError(
            f"{blank} of {len(frames)} cohort images are blank to the frame gate (contrast below "
            f"{DEFAULT_MIN_CONTRAST:g} grey levels); a cohort is real drawings or photos of its classes"
        )
    if not np.all(scores.own > 0):
        raise CohortError("some cohort images score <= 0 against themselves: not usable as a cohort")
    ratios = known_relative_scores(backend, scores, episodes)
    quantiles = np.quantile(ratios, np.arange(QUANTILE_STEPS + 1) / 100)
    if quantiles[-1] - quantiles[5] <= SEPARATION_TOLERANCE:
        raise CohortError(
            f"the cohort's scores do not separate: its known queries from the 5% to the 50% quantile all "
            f"score {quantiles[-1]:.6f} relative to themselves; its images of a class are copies"
        )
    classes = len(set(labels.tolist()))
    described = f"{fitted_on}: {classes} classes, {len(frames)} images, N = {n}, {draws} draws"
    return OpenSetRule(known_quantiles=tuple(float(q) for q in quantiles), fitted_on=described)


@dataclass(frozen=True)
class Cohort:
    """A cohort folder as read (`load_cohort_folder`): checked before an export starts."""

    name: str
    frames: list[np.ndarray]
    labels: np.ndarray


def bundle_rule(bundle: Path, manifest: Manifest, cohort: Cohort | None) -> OpenSetRule:
    """The rule `dmf-export` writes: fitted on the cohort with the bundle's own graphs, or, with none,
    the demo model's (whose relative scores may sit elsewhere for another model)."""
    if cohort is None:
        rule = default_open_set()
        note = f"not fitted for this model: the demo model's rule ({rule.fitted_on}); refit with --cohort DIR"
        return OpenSetRule(rule.known_quantiles, rule.min_contrast, rule.default_sensitivity, note)
    from dmf_deploy.export.parity import OrtGraphs

    backend = OrtGraphs(bundle, manifest)
    preprocess = manifest.model.preprocess
    return fit_rule(backend, preprocess, cohort.frames, cohort.labels, f"cohort folder {cohort.name}")


def write_rule(bundle: Path, rule: OpenSetRule) -> dict[str, str]:
    """Write the record into the bundle folder; returns the manifest's entry for it."""
    data = (json.dumps(rule.to_dict(), indent=2) + "\n").encode()
    atomic_write_bytes(bundle / OPEN_SET_FILE, data)
    return {"file": OPEN_SET_FILE, "sha256": hashlib.sha256(data).hexdigest()}


def read_cohort(root: str | os.PathLike[str]) -> Cohort:
    frames, labels, _ = load_cohort_folder(root)
    return Cohort(Path(root).name, frames, labels)


def load_cohort_folder(root: str | os.PathLike[str]) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """DIR/<class>/<image> -> (frames, labels, class names); bounded, and a CohortError on bad input."""
    root = Path(root)
    if not root.is_dir():
        raise CohortError(f"cohort folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) > MAX_COHORT_CLASSES:
        raise CohortError(f"{root} has {len(folders)} class folders; at most {MAX_COHORT_CLASSES} are read")
    frames: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        images = [read_image(p) for p in files[:MAX_COHORT_IMAGES]]
        if len(images) < 2:
            continue  # a class needs a shot and a query
        names.append(folder.name)
        frames.extend(images)
        labels.extend([len(names) - 1] * len(images))
    if len(names) <= 1:
        raise CohortError(
            f"{root}: {len(names)} class folders with two or more images ({', '.join(IMAGE_SUFFIXES)}); "
            "the cohort needs several classes the model was not trained on"
        )
    return frames, np.asarray(labels), names


def read_image(path: Path) -> np.ndarray:
    try:
        return read_image_file(path, "cohort image", MAX_IMAGE_BYTES)
    except ImageFileError as exc:
        raise CohortError(str(exc)) from exc


def degenerate_frames(height: int = 480, width: int = 640, seed: int = 0) -> dict[str, np.ndarray]:
    """Camera frames with nothing to recognise, which every open-set rule must refuse (BGR uint8)."""
    rng = np.random.default_rng(seed)
    frames = {f"grey {v}": np.full((height, width, 3), v, np.uint8) for v in (0, 20, 64, 128, 192, 235, 255)}
    frames["black"], frames["white"] = frames.pop("grey 0"), frames.pop("grey 255")
    noise = rng.normal(128, 50, (height, width, 3))
    frames["Gaussian noise"] = np.clip(noise, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    # An empty sheet under a lamp: bright in the middle, some sensor noise, out of focus.
    light = 200 + 30 * np.exp(-((xx - width / 2) ** 2 + (yy - height / 2) ** 2) / (2 * (0.4 * width) ** 2))
    page = np.clip(light[..., None] + rng.normal(0, 4, (height, width, 3)), 0, 255).astype(np.uint8)
    frames["blurred empty page"] = cv2.GaussianBlur(page, (0, 0), 5)
    hand = frames["blurred empty page"].copy()
    skin = (120, 150, 200)  # BGR
    cx, cy, u = width // 2, int(height * 0.69), height / 480

    def blob(x: float, y: float, half_w: float, half_h: float, angle: float) -> None:
        centre, axes = (int(cx + x * u), int(cy + y * u)), (int(half_w * u), int(half_h * u))
        cv2.ellipse(hand, centre, axes, angle, 0, 360, skin, -1)

    blob(0, 0, 110, 150, 0)  # palm
    for i in range(4):
        blob(-80 + 50 * i, -160, 22, 80, -10 + 7 * i)  # fingers
    blob(130, -30, 20, 70, 40)  # thumb
    frames["hand-like blob"] = cv2.GaussianBlur(hand, (0, 0), 3)
    return frames
