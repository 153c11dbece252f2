"""Accuracy of the packaged demo model, measured through its exported bundle and the torch-free Recognizer.

The demo bundle (dmf_deploy/assets/demo_bundle: conv4, 56x56, fixed-step dopri5 x 8) runs on ONNX
Runtime; no PyTorch is involved. Omniglot alphabets held out from training:

- test (Korean, Latin; never seen in training or model selection): 5-way 1-shot and 5-way 5-shot
  (classes drawn across the test alphabets), and 20-way 1-shot within one alphabet (Lake's task);
- val (Greek; used to pick the checkpoint, so optimistic) for reference.

Every episode has --queries query drawings per class (default 15; an Omniglot character has 20). Each
figure is the mean accuracy over episodes +- 1.96 * std / sqrt(episodes) (train.episodes.confidence_interval).

Efficiently, but exactly what Recognizer.enroll and Recognizer.scores compute: the backbone runs once
per image (backbone.onnx on rec.preprocess(images), in batches); per episode a class prototype is the
float64 mean of its shots' features cast to float32 (as enroll), support.onnx makes each class's bank
(one class per call, as enroll), and head.onnx scores all the queries against all the classes in one
call (as scores). The first --check episodes of every task are also run through a fresh Recognizer's
enroll + scores on the raw images, and the script stops if any score differs. An episode with a shot
that Recognizer.enroll refuses, being blank to the model (its drawing not found), cannot be: the fast
path scores it with that shot, and the next episode is cross-checked instead (said on stderr).

    python benchmarks/demo_accuracy.py [--data-root OMNIGLOT_DIR] [--bundle DIR]
        [--episodes 600] [--episodes-20 400] [--queries 15] [--splits test,val] [--check 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dmf_deploy.manifest import BACKBONE, CLASS_BANK, HEAD, SUPPORT
from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.preprocess import InvalidFrame
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.recognizer import new_gallery
from dmf_deploy.train.datasets import FewShotDataset, open_dataset
from dmf_deploy.train.episodes import Episode, EpisodeSampler, confidence_interval

REPO = Path(__file__).resolve().parents[1]
# The folder with images_background_small{1,2}.zip (as tests/test_datasets.py looks for it).
DEFAULT_ROOT = Path(os.environ.get("DMF_OMNIGLOT_DIR", "omniglot"))  # the folder of the Omniglot zips
BATCH = 64
TOLERANCE = 1e-5  # relative, over an episode's [Q, N] scores (max|got - ref| / max|ref|)
# Lake et al.'s floors for Omniglot 20-way within-alphabet 1-shot (error rates, on their 20 runs).
FLOORS = (("chance", 95.0), ("pixel nearest neighbour (cosine, blurred)", 72.0), ("Modified Hausdorff", 39.0))


@dataclass(frozen=True)
class Task:
    name: str
    n_way: int
    k_shot: int
    within_alphabet: bool
    episodes: int


@dataclass
class Row:
    split: str
    alphabets: str
    task: str
    episodes: int
    queries: int
    accuracy: float
    ci95: float
    seconds: float
    checked: int  # episodes cross-checked against Recognizer.enroll + scores
    max_rel_diff: float  # over those: max|fast - recognizer| / max|recognizer| (0.0: identical)


def all_features(rec: Recognizer, ds: FewShotDataset) -> np.ndarray:
    """backbone.onnx once per image: [n, C, h, w]."""
    out = []
    for start in range(0, len(ds), BATCH):
        images = [ds.load(i) for i in range(start, min(start + BATCH, len(ds)))]
        out.append(rec.backend.run(BACKBONE, {"images": rec.preprocess(images)})["features"])
    return np.concatenate(out)


def episode_scores(rec: Recognizer, feats: np.ndarray, ep: Episode) -> np.ndarray:
    """[Q, N] scores: what enroll + scores give, without running the backbone again."""
    banks = []
    for c in range(ep.n_way):
        shots = feats[ep.support_indices[ep.support_labels == c]]
        prototype = (shots.astype(np.float64).sum(axis=0) / len(shots)).astype(np.float32)[None]
        banks.append(rec.backend.run(SUPPORT, {"prototypes": prototype}))
    bank = {k: np.concatenate([b[k] for b in banks]) for k in CLASS_BANK}
    return rec.backend.run(HEAD, {"query_features": feats[ep.query_indices], **bank})["scores"]


def recognizer_scores(rec: Recognizer, ds: FewShotDataset, ep: Episode) -> np.ndarray:
    """The same episode through a fresh Recognizer (same backend): enroll every class, then scores."""
    fresh = Recognizer(rec.bundle, rec.manifest, rec.backend, new_gallery(rec.manifest), None)
    for c in range(ep.n_way):
        fresh.enroll(f"class {c}", [ds.load(i) for i in ep.support_indices[ep.support_labels == c]])
    return fresh.scores([ds.load(i) for i in ep.query_indices])


def run_task(
    rec: Recognizer, ds: FewShotDataset, feats: np.ndarray, task: Task, queries: int, seed: int, check: int
) -> Row:
    sampler = EpisodeSampler(
        ds, task.n_way, task.k_shot, queries, task.episodes, seed, within_alphabet=task.within_alphabet
    )
    accs = []
    worst = 0.0
    checked = 0
    start = time.perf_counter()
    for index, ep in enumerate(sampler):
        scores = episode_scores(rec, feats, ep)
        accs.append(float((scores.argmax(axis=1) == ep.query_labels).mean()))
        if checked < check:
            try:
                ref = recognizer_scores(rec, ds, ep)
            except InvalidFrame as exc:  # a shot blank to the model: enroll refuses what the fast path scores
                print(f"  {ds.name} {task.name} episode {index} not cross-checked: {exc}", file=sys.stderr)
            else:
                diff = float(np.abs(scores - ref).max() / np.abs(ref).max())
                # Identical here (0.0). Elsewhere ONNX Runtime might round a batch of another size
                # differently; a difference beyond float rounding, or another prediction, is a bug.
                if diff > TOLERANCE or not np.array_equal(scores.argmax(1), ref.argmax(1)):
                    raise SystemExit(
                        f"cross-check failed on {ds.name} {task.name} episode {index}: the fast path "
                        f"differs from Recognizer.enroll + scores by {diff:.3g} (relative)"
                    )
                worst = max(worst, diff)
                checked += 1
        if (index + 1) % 100 == 0:
            mean, ci = confidence_interval(accs)
            print(
                f"  {ds.name} {task.name}: {index + 1}/{task.episodes} episodes, "
                f"{100 * mean:.2f} +- {100 * ci:.2f}% ({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    mean, ci = confidence_interval(accs)
    alphabets = ", ".join(ds.info["alphabets"])
    split = ds.name.removeprefix("omniglot-")
    seconds = time.perf_counter() - start
    return Row(split, alphabets, task.name, task.episodes, queries, mean, ci, seconds, checked, worst)


def same(rel_diff: float) -> str:
    return (
        "identical scores"
        if rel_diff == 0.0
        else f"same predictions, scores within {rel_diff:.2g} (relative)"
    )


def markdown(rows: list[Row]) -> str:
    lines = [
        "| split (alphabets) | task | episodes | accuracy (± 95% CI) | error |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.split} ({r.alphabets}) | {r.task} | {r.episodes} x {r.queries} queries/class | "
            f"{100 * r.accuracy:.2f} ± {100 * r.ci95:.2f}% | {100 * (1 - r.accuracy):.2f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="folder with the Omniglot zips")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the demo bundle)")
    parser.add_argument("--episodes", type=int, default=600, help="episodes per 5-way task")
    parser.add_argument("--episodes-20", type=int, default=400, help="episodes of the 20-way task")
    parser.add_argument("--queries", type=int, default=15, help="query drawings per class")
    parser.add_argument("--splits", default="test,val", help="comma-separated: test, val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", type=int, default=2, help="episodes per task cross-checked via enroll")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: its own)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()

    print("command: " + shlex.join(["python", "benchmarks/demo_accuracy.py", *sys.argv[1:]]))
    bundle = args.bundle or DEMO_BUNDLE
    rec = Recognizer.open(bundle, backend="onnxruntime", threads=args.threads)
    manifest = rec.manifest
    cfg = manifest.model
    print(
        f"bundle: {bundle} ({cfg.backbone}, {cfg.preprocess.image_size}px, G={cfg.groups}, k={cfg.kernel}; "
        f"solver {manifest.solver} x {manifest.steps}, opset {manifest.opset}; weights "
        f"{manifest.weights_sha256[:12]}); backend {rec.backend.name}"
    )
    tasks = (
        Task("5-way 1-shot", 5, 1, False, args.episodes),
        Task("5-way 5-shot", 5, 5, False, args.episodes),
        Task("20-way 1-shot, within one alphabet", 20, 1, True, args.episodes_20),
    )
    rows: list[Row] = []
    total = time.perf_counter()
    for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
        ds = open_dataset("omniglot", args.data_root, split)
        alphabets = ", ".join(ds.info["alphabets"])
        t0 = time.perf_counter()
        feats = all_features(rec, ds)
        print(
            f"{split}: {alphabets}: {ds.num_classes} characters, {len(ds)} drawings; backbone features "
            f"{list(feats.shape)} in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        for task in tasks:
            row = run_task(rec, ds, feats, task, args.queries, args.seed, args.check)
            rows.append(row)
            print(
                f"{split} {task.name}: {100 * row.accuracy:.2f} +- {100 * row.ci95:.2f}% over "
                f"{task.episodes} episodes ({row.seconds:.0f} s; {row.checked} cross-checked against "
                f"enroll + scores: {same(row.max_rel_diff)})",
                file=sys.stderr,
                flush=True,
            )

    print()
    print(markdown(rows))
    print()
    print("Lake et al.'s floors, Omniglot 20-way within-alphabet 1-shot (error on their 20 runs):")
    print()
    print("| method | error |")
    print("|---|---|")
    for name, error in FLOORS:
        print(f"| {name} | {error:.0f}% |")
    twenty = [r for r in rows if r.task.startswith("20-way")]
    for r in twenty:
        print(f"| demo model, {r.split} ({r.alphabets}), this bundle | {100 * (1 - r.accuracy):.1f}% |")
    print()
    print(
        "The floors are from Lake et al.'s 20 fixed runs on images_evaluation alphabets; the rows here are "
        "random episodes on held-out alphabets of images_background_small1/2, so they compare in kind, "
        "not run for run."
    )
    checked = sum(r.checked for r in rows)
    worst = max((r.max_rel_diff for r in rows), default=0.0)
    print()
    print(
        f"Cross-check: {checked} episodes also run through Recognizer.enroll + Recognizer.scores on the "
        f"raw images: {same(worst)}. Total {time.perf_counter() - total:.0f} s."
    )
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
