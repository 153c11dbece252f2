"""The open-set decision: when a frame's best match is "unknown" (Prediction.label None), and why.

Two gates, in order:

1. Frame contrast. A blank, dark, saturated, uniform or smoothly shaded frame has no edge: the
   strongest local contrast of its grey image at the model's input size (99th percentile of
   |image - Gaussian blur|, in grey levels) is below `min_contrast`. Refused whatever it scores.
2. Relative score. DMF scores scale with the query's feature norm, so the best class's score is
   divided by the frame's own score: the frame scored against a class enrolled from itself (its
   prototype and bank are the frame's own features). Known when that ratio reaches the threshold that
   keeps `sensitivity` of the known queries out on the fit protocol (benchmarks/open_set.py): the
   bundle stores the ratio's quantiles over known queries, so the knob has one meaning on any model.

`threshold=` (an absolute score) replaces gate 2, never gate 1.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from dmf_deploy.config import PreprocessConfig
from dmf_deploy.manifest import CLASS_BANK, HEAD, SUPPORT, BundleError, Manifest, sha256_file
from dmf_deploy.packaged import DEMO_BUNDLE


class GraphRunner(Protocol):
    """What runs a bundle's graphs by name: the runtime's backends, or export's own ONNX Runtime sessions."""

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


OPEN_SET_FORMAT = "dmf-open-set"
OPEN_SET_VERSION = 1
OPEN_SET_FILE = "open_set.json"
# Uniform frames measure 0 grey levels, a blurred empty page about 2; a 1-pixel pen line across a
# 640x480 frame 11 at 56x56, a 2-pixel one 38, Omniglot characters 105 or more. Noise (5 to 8) is left
# to the score: the gate refuses only frames without an edge, so that faint drawings still count.
DEFAULT_MIN_CONTRAST = 8.0
DEFAULT_SENSITIVITY = 0.05  # refuse 5% of known queries on the fit protocol
QUANTILE_STEPS = 50  # quantiles at refused fractions 0, 0.01, ..., 0.50
MAX_SENSITIVITY = QUANTILE_STEPS / 100
CONTRAST_BLUR_SIGMA = 2.0  # pixels at the model's input size: edges narrower than ~4 px count
CONTRAST_PERCENTILE = 99.0  # a stroke covers a few percent of the frame; the 99th ignores lone pixels
MAX_RECORD_BYTES = 64 << 10


class OpenSetError(ValueError):
    """An open-set record that is malformed (the bundle reader turns it into a BundleError)."""


@dataclass(frozen=True)
class OpenSetRule:
    """The constants of the decision, as `dmf-export` writes them into the bundle."""

    known_quantiles: tuple[float, ...]  # relative score below which i% of known queries fall, i=0..50
    min_contrast: float = DEFAULT_MIN_CONTRAST
    default_sensitivity: float = DEFAULT_SENSITIVITY
    fitted_on: str = ""  # what the quantiles were measured on, for people

    def __post_init__(self) -> None:
        q = self.known_quantiles
        if len(q) != QUANTILE_STEPS + 1 or not all(math.isfinite(v) for v in q):
            raise OpenSetError(f"known_quantiles must be {QUANTILE_STEPS + 1} finite numbers")
        if any(b < a for a, b in zip(q, q[1:])):
            raise OpenSetError("known_quantiles must not decrease")
        if not (math.isfinite(self.min_contrast) and self.min_contrast >= 0):
            raise OpenSetError(f"min_contrast must be a number >= 0, got {self.min_contrast!r}")
        check_sensitivity(self.default_sensitivity)

    def threshold(self, sensitivity: float | None = None) -> float:
        """The relative score a known frame needs at this sensitivity (None: the bundle's default)."""
        s = self.default_sensitivity if sensitivity is None else check_sensitivity(sensitivity)
        steps = np.arange(QUANTILE_STEPS + 1) / 100
        return float(np.interp(s, steps, self.known_quantiles))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": OPEN_SET_FORMAT,
            "format_version": OPEN_SET_VERSION,
            "rule": "contrast gate, then best score / the frame's own score",
            "min_contrast": self.min_contrast,
            "default_sensitivity": self.default_sensitivity,
            "known_quantiles": [float(v) for v in self.known_quantiles],
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_dict(cls, data: object) -> OpenSetRule:
        if not isinstance(data, dict) or data.get("format") != OPEN_SET_FORMAT:
            raise OpenSetError(f"not a {OPEN_SET_FORMAT} record")
        if data.get("format_version") != OPEN_SET_VERSION:
            version = data.get("format_version")
            raise OpenSetError(f"open-set record version {version!r}; this runtime reads {OPEN_SET_VERSION}")
        try:
            quantiles = tuple(float(v) for v in data["known_quantiles"])
            return cls(
                known_quantiles=quantiles,
                min_contrast=float(data["min_contrast"]),
                default_sensitivity=float(data["default_sensitivity"]),
                fitted_on=str(data.get("fitted_on", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise OpenSetError(f"malformed open-set record: {exc}") from exc


def check_sensitivity(sensitivity: float) -> float:
    if isinstance(sensitivity, bool) or not isinstance(sensitivity, numbers.Real):
        raise ValueError(f"sensitivity must be a number in [0, {MAX_SENSITIVITY}], got {sensitivity!r}")
    if not 0.0 <= sensitivity <= MAX_SENSITIVITY:
        raise ValueError(f"sensitivity must be in [0, {MAX_SENSITIVITY}], got {sensitivity}")
    return float(sensitivity)


def frame_contrast(frame: np.ndarray, size: int) -> float:
    """Strongest local contrast (grey levels) of a checked HxWx3 BGR frame, at size x size pixels."""
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    # INTER_AREA averages pixel noise away as a camera's optics would; the model's own resize may not.
    small = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    return _detail(small)


def _detail(grey: np.ndarray) -> float:
    detail = np.abs(grey - cv2.GaussianBlur(grey, (0, 0), CONTRAST_BLUR_SIGMA)).ravel()
    # np.percentile's linear rule by one partition: np.percentile's own overhead is most of its cost.
    position = CONTRAST_PERCENTILE / 100 * (len(detail) - 1)
    low = math.floor(position)
    high = min(low + 1, len(detail) - 1)
    part = np.partition(detail, (low, high))
    return float(part[low] + (position - low) * (part[high] - part[low]))


def gate_contrast(frame: np.ndarray, view: np.ndarray, config: PreprocessConfig) -> float:
    """The contrast gate's measure. A model that finds the drawing (locate="drawing") is gated on what
    it sees, the drawing redrawn black on white (blank paper redraws all white); any other on the
    checked frame itself (`frame_contrast`), as before."""
    if config.locate == "drawing":
        return _detail(cv2.cvtColor(view, cv2.COLOR_BGR2GRAY).astype(np.float32))
    return frame_contrast(frame, config.image_size)


def own_scores(
    backend: GraphRunner, features: np.ndarray, banks: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """Each frame scored against a class enrolled from itself alone: [B], one head call per frame.

    `banks`: the frames' own class banks when already computed (support.onnx of `features`).
    """
    if banks is None:
        banks = backend.run(SUPPORT, {"prototypes": features})
    out = np.empty(len(features), np.float32)
    for i in range(len(features)):
        own_bank = {k: banks[k][i : i + 1] for k in CLASS_BANK}
        out[i] = backend.run(HEAD, {"query_features": features[i : i + 1], **own_bank})["scores"][0, 0]
    return out


def relative_score(best: float, own: float) -> float:
    """The best class's score as a fraction of the frame's own score; -inf when that is not positive."""
    return best / own if own > 0 and math.isfinite(own) else -math.inf


def blank_reason(rule: OpenSetRule, contrast: float) -> str:
    """Why a frame is blank to the model (gate 1: `contrast`, `gate_contrast`'s measure, below the rule's
    `min_contrast`), or "" when it is not. The one blank test: `refusal` calls such a frame unknown, and
    enrolment refuses it (a class enrolled from blank paper would match every empty scene)."""
    if contrast < rule.min_contrast:
        return f"contrast {contrast:.1f} < {rule.min_contrast:g} grey levels"
    return ""


def refusal(
    rule: OpenSetRule,
    contrast: float,
    best_name: str,
    best: float,
    own: float,
    sensitivity: float | None = None,
    threshold: float | None = None,
) -> str:
    """Why the frame is unknown (its `Prediction.reason`), or "" when `best_name` is accepted."""
    blank = blank_reason(rule, contrast)
    if blank:
        return f"blank frame: {blank}"
    if threshold is not None:
        if best < threshold:
            return f"best match {best_name!r} scores {best:.2f} < threshold {threshold:g}"
        return ""
    needed = rule.threshold(sensitivity)
    ratio = relative_score(best, own)
    if ratio < needed:
        return f"best match {best_name!r} scores {ratio:.2f} of the frame's own score (< {needed:.2f})"
    return ""


def load_open_set(bundle: str | os.PathLike[str], manifest: Manifest) -> OpenSetRule:
    """The bundle's rule, its file checked against the manifest's sha256 (the manifest's `open_set`
    entry: {"file": OPEN_SET_FILE, "sha256": ...}); a bundle exported without one (format version 1)
    gets the demo model's, fitted on Omniglot."""
    entry = manifest.open_set
    if entry is None:
        if Path(bundle).resolve() == DEMO_BUNDLE:
            raise BundleError(f"the demo bundle {DEMO_BUNDLE} has no open-set record ({OPEN_SET_FILE})")
        return default_open_set()
    named = isinstance(entry, dict) and entry.get("file") == OPEN_SET_FILE
    if not named or not isinstance(entry.get("sha256"), str):
        raise BundleError(f"the manifest's 'open_set' entry must name {OPEN_SET_FILE} and its sha256")
    path = Path(bundle) / OPEN_SET_FILE
    if not path.is_file():
        raise BundleError(f"{path} is missing (the manifest names it)")
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise BundleError(f"{path} is larger than {MAX_RECORD_BYTES} bytes")
    if sha256_file(path) != entry["sha256"]:
        raise BundleError(f"{path} is corrupt or was modified: its sha256 does not match the manifest's")
    try:
        return OpenSetRule.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, OpenSetError) as exc:
        raise BundleError(f"{path}: {exc}") from exc


def default_open_set() -> OpenSetRule:
    """The demo model's rule (fitted on Omniglot): for bundles exported without one."""
    return load_open_set(DEMO_BUNDLE, Manifest.read(DEMO_BUNDLE))
