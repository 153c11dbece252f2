"""Open-set decision of a bundle ("unknown" = Prediction.label None), measured on held-out Omniglot.

Protocol, per alphabet, over --draws seeded draws (dmf_deploy.export.cohort.draw_episodes): pick 20
characters, enrol one shot of N of them (N = 1, 5, 10), query another drawing of each enrolled character
(known) and one drawing of each of 10 characters never enrolled (unknown), and the degenerate frames of
dmf_deploy.export.cohort.degenerate_frames (black, white, uniform greys, Gaussian noise, a blurred empty
page, a hand-like blob) against the same gallery. Reported for the bundle's rule at its default
sensitivity and for the 0.7-of-the-self-score rule of earlier versions:

- known accepted (label not None), and accepted with the right label;
- unknown rejected;
- AUROC of the rule's decision score, known against unknown queries, and the unknown queries it
  rejects at best (the cut that accepts 95% of known queries, set on the same data: the score's limit);
- degenerate frames rejected (every frame of every draw).

Test alphabets: Korean and Latin (never used to fit). `--fit` first fits the rule on the validation
alphabet (Greek) with dmf_deploy.export.cohort.fit_rule and writes it to --rule-out; rerun it whenever
the demo model changes, and re-export the demo bundle (dmf_deploy/assets/README.md).

Efficiently, but what Recognizer.classify computes: each image's features, one-shot bank and own score
once, then one head call per draw.

    python benchmarks/open_set.py [--data-root DIR] [--bundle DIR] [--rule FILE] [--draws 200]
        [--fit --rule-out FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from dmf_deploy.export.cohort import (
    FIT_DRAWS,
    ImageScores,
    degenerate_frames,
    draw_episodes,
    fit_rule,
    head_scores,
    load_cohort_folder,
    score_images,
)
from dmf_deploy.manifest import read_manifest
from dmf_deploy.open_set import OPEN_SET_FILE, OpenSetRule, blank_reason, refusal, relative_score
from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.runtime.backends import Backend, open_backend
from dmf_deploy.train.datasets import FewShotDataset, open_dataset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = Path(os.environ.get("DMF_OMNIGLOT_DIR", "omniglot"))  # the folder of the Omniglot zips
ENROLLED = (1, 5, 10)
OLD_RATIO = 0.7  # the rule of earlier versions: best >= 0.7 x the best class's self-score


@dataclass
class Row:
    alphabet: str
    enrolled: int
    rule: str
    known_accepted: float
    known_right: float
    unknown_rejected: float
    auroc: float
    oracle_unknown_rejected: float  # at the threshold that accepts 95% of this row's known queries
    degenerate_rejected: float
    degenerate_missed: str  # frames accepted at least once


@dataclass
class Outcomes:
    """Per query: accepted, accepted with the right label, and the rule's decision score."""

    accepted: list[bool]
    right: list[bool]
    score: list[float]

    def add(self, accepted: np.ndarray, right: np.ndarray, score: np.ndarray) -> None:
        self.accepted.extend(accepted.tolist())
        self.right.extend((accepted & right).tolist())
        self.score.extend(score.tolist())


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a known query's score > an unknown one's), ties counted half (Mann-Whitney U)."""
    both = np.concatenate([positive, negative])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    sorted_values = both[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2
    ranks[order] = np.repeat(average, counts)
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def rejected_at(known: np.ndarray, unknown: np.ndarray, accepted: float) -> float:
    """Unknown queries rejected by the cut that accepts `accepted` of the known ones: what the decision
    score allows at best on this very data (a limit, not a result: the cut is set on the test set)."""
    cut = np.quantile(known, 1.0 - accepted)
    return float(np.mean(unknown < cut))


def decide(
    rule: OpenSetRule, best: np.ndarray, own: np.ndarray, contrast: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's rule at its default sensitivity: (accepted [Q], decision score [Q])."""
    accepted = np.array([not refusal(rule, c, "", b, o) for b, o, c in zip(best, own, contrast)])
    score = np.array(
        [-np.inf if blank_reason(rule, c) else relative_score(b, o) for b, o, c in zip(best, own, contrast)]
    )
    return accepted, score


def alphabet_rows(
    backend: Backend,
    rule: OpenSetRule,
    name: str,
    labels: np.ndarray,
    images: ImageScores,
    degenerate: ImageScores,
    degenerate_names: list[str],
    draws: int,
    seed: int,
) -> list[Row]:
    rows = []
    for n in ENROLLED:
        new = {kind: Outcomes([], [], []) for kind in ("known", "unknown", "degenerate")}
        old = {kind: Outcomes([], [], []) for kind in ("known", "unknown", "degenerate")}
        for d in draw_episodes(labels, n, draws, seed):
            enrolled_labels = labels[d.enrolled]
            self_scores = images.own[d.enrolled]  # one shot: the prototype is the shot's features
            everything = np.arange(len(degenerate_names))
            groups = {  # queries: (their scores, ids, true labels; -1: no enrolled class is right)
                "known": (images, d.known, labels[d.known]),
                "unknown": (images, d.unknown, np.full(len(d.unknown), -1)),
                "degenerate": (degenerate, everything, np.full(len(everything), -1)),
            }
            for kind, (source, ids, truth) in groups.items():
                s = head_scores(backend, source.features[ids], images, d.enrolled)
                top = s.argmax(axis=1)
                best = s[np.arange(len(s)), top]
                right = enrolled_labels[top] == truth
                accepted, score = decide(rule, best, source.own[ids], source.contrast[ids])
                new[kind].add(accepted, right, score)
                ratio = best / self_scores[top]
                old[kind].add(ratio >= OLD_RATIO, right, ratio)
        for rule_name, out in (("bundle's rule", new), (f"{OLD_RATIO} x self-score", old)):
            deg = np.array(out["degenerate"].accepted).reshape(draws, -1)
            missed = [degenerate_names[i] for i in np.flatnonzero(deg.any(axis=0))]
            rows.append(
                Row(
                    name,
                    n,
                    rule_name,
                    float(np.mean(out["known"].accepted)),
                    float(np.mean(out["known"].right)),
                    1.0 - float(np.mean(out["unknown"].accepted)),
                    auroc(np.array(out["known"].score), np.array(out["unknown"].score)),
                    rejected_at(np.array(out["known"].score), np.array(out["unknown"].score), 0.95),
                    1.0 - float(deg.mean()),
                    ", ".join(missed) or "-",
                )
            )
    return rows


def split_alphabets(ds: FewShotDataset) -> dict[str, tuple[list[int], np.ndarray]]:
    """alphabet -> (image ids, their character labels)."""
    out = {}
    labels = np.asarray(ds.labels)
    for alphabet, classes in ds.classes_by_group().items():
        ids = np.flatnonzero(np.isin(labels, classes))
        out[alphabet] = (ids.tolist(), labels[ids])
    return out


def write_cohort(ds: FewShotDataset, folder: Path) -> None:
    """One sub-folder of PNGs per character: the layout `dmf-export --cohort` reads."""
    labels = np.asarray(ds.labels)
    for c, name in enumerate(ds.class_names):
        target = folder / name.replace("/", "_")
        target.mkdir(parents=True, exist_ok=False)
        for k, i in enumerate(np.flatnonzero(labels == c)):
            cv2.imwrite(str(target / f"{k:02d}.png"), ds.load(int(i)))


def markdown(rows: list[Row]) -> str:
    lines = [
        "| alphabet | N enrolled | rule | known accepted | known accepted & right | unknown rejected "
        "| AUROC | unknown rejected at 95% known (cut set on this row) | degenerate rejected "
        "| degenerate frames accepted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.alphabet} | {r.enrolled} | {r.rule} | {100 * r.known_accepted:.1f}% | "
            f"{100 * r.known_right:.1f}% | {100 * r.unknown_rejected:.1f}% | {r.auroc:.3f} | "
            f"{100 * r.oracle_unknown_rejected:.1f}% | "
            f"{100 * r.degenerate_rejected:.1f}% | {r.degenerate_missed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="folder with the Omniglot zips")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the demo bundle)")
    parser.add_argument(
        "--rule", type=Path, default=None, help=f"open-set record (default: the bundle's {OPEN_SET_FILE})"
    )
    parser.add_argument("--fit", action="store_true", help="fit the rule on the validation alphabet first")
    parser.add_argument("--rule-out", type=Path, default=None, help="--fit: write the fitted record here")
    parser.add_argument(
        "--write-cohort", type=Path, default=None, help="write the validation alphabet as a cohort folder"
    )
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--fit-draws", type=int, default=FIT_DRAWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()

    print("command: " + shlex.join(["python", "benchmarks/open_set.py", *sys.argv[1:]]))
    bundle = args.bundle or DEMO_BUNDLE
    manifest = read_manifest(bundle)
    backend = open_backend(bundle, manifest, "onnxruntime", args.threads)
    preprocess = manifest.model.preprocess
    print(f"bundle: {bundle} (weights {manifest.weights_sha256[:12]})")
    started = time.perf_counter()
    if args.write_cohort:
        write_cohort(open_dataset("omniglot", args.data_root, "val"), args.write_cohort)
        print(f"wrote {args.write_cohort}; fit a bundle's rule with dmf-export --cohort {args.write_cohort}")
        return
    if args.fit:
        # Through a cohort folder, as `dmf-export --cohort` reads it: the same record either way.
        with tempfile.TemporaryDirectory() as folder:
            val = open_dataset("omniglot", args.data_root, "val")
            write_cohort(val, Path(folder) / "cohort")
            frames, labels, _ = load_cohort_folder(Path(folder) / "cohort")
        fitted_on = "cohort folder of Omniglot " + ", ".join(val.info["alphabets"])
        rule = fit_rule(backend, preprocess, frames, labels, fitted_on, args.fit_draws, args.seed)
        record = json.dumps(rule.to_dict(), indent=2) + "\n"
        if args.rule_out:
            args.rule_out.write_text(record)
        print(f"fitted in {time.perf_counter() - started:.0f} s")
    else:
        path = args.rule or bundle / OPEN_SET_FILE
        rule = OpenSetRule.from_dict(json.loads(path.read_text()))
    print(
        f"rule: contrast >= {rule.min_contrast:g}, relative score >= {rule.threshold():.4f} at sensitivity "
        f"{rule.default_sensitivity} (fitted on {rule.fitted_on})"
    )

    degenerate = degenerate_frames()
    degenerate_scores = score_images(backend, preprocess, list(degenerate.values()))
    rows: list[Row] = []
    splits = ("val", "test") if args.fit else ("test",)
    for split in splits:
        ds = open_dataset("omniglot", args.data_root, split)
        for alphabet, (ids, labels) in split_alphabets(ds).items():
            images = score_images(backend, preprocess, [ds.load(i) for i in ids])
            names = list(degenerate)
            rows += alphabet_rows(
                backend, rule, alphabet, labels, images, degenerate_scores, names, args.draws, args.seed
            )
            seconds = time.perf_counter() - started
            print(f"{alphabet}: {len(ids)} drawings ({seconds:.0f} s)", file=sys.stderr, flush=True)
    print()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
