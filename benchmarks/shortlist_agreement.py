"""How often a shortlist keeps the exact DMF answer: top-1 agreement of shortlist-K with exact.

The shortlist (`Recognizer.open(..., shortlist=K)`) ranks every enrolled class by the alignment-free
score <mean_p q(p), w_c> (one matmul) and runs the exact head only on the best K. Its top-1 equals the
exact top-1 exactly when the exact winner is among those K, so agreement = P(rank of the exact winner
under the cheap score < K).

Setup: the demo bundle (conv4, trained on Omniglot background alphabets), the held-out Omniglot
characters (test + val alphabets: Korean, Latin, Greek; 90 characters), and, to enrol more classes,
their 90-, 180- and 270-degree rotations as further classes (the demo model was trained with rotations
as classes). One shot per class is enrolled (a seeded random drawer); every other drawing of that class
is a query. Class sets grow by rotation: 90 (upright), 180 (+90 deg), 270 (+180 deg), 360 (all).
Queries are scored against every class of the set; one exact score matrix per seed serves every set
(the head scores each class independently).

The figures are computed on the runtime (ONNX Runtime, torch-free): backbone and support graphs for
features and class banks, the head graph for exact scores; and a sample of queries is re-classified
through `Recognizer.classify` with `shortlist=K` to check that the derived figures are what the
Recognizer does.

    python benchmarks/shortlist_agreement.py [--bundle DIR] [--data DIR] [--ks 8 16 32 64]
                                              [--seeds 0] [--threads 2] [--json out.json]
                                              [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from dmf_deploy import packaged
from dmf_deploy.manifest import CLASS_BANK, SUPPORT
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.recognizer import coarse_scores, new_gallery

DEMO_BUNDLE = packaged.DEMO_BUNDLE
DATA = Path(os.environ.get("DMF_OMNIGLOT_DIR", "omniglot"))  # the folder of the Omniglot zips
TARGET = 0.995  # top-1 agreement with exact at >= 200 classes
ROTATION_SETS = ((0,), (0, 90), (0, 90, 180), (0, 90, 180, 270))
BATCH = 64


def rotation_of(name: str) -> int:
    tail = name.rsplit("/", 1)[-1]
    return int(tail[3:]) if tail.startswith("rot") else 0


def load_images(data: Path) -> tuple[list[str], np.ndarray, list]:
    """Held-out characters and their rotations: class names, labels, and the images (BGR uint8)."""
    from dmf_deploy.train.datasets import open_dataset

    names: list[str] = []
    labels: list[int] = []
    images: list[np.ndarray] = []
    for split in ("test", "val"):
        ds = open_dataset("omniglot", data, split, rotations=True)
        offset = len(names)
        names += ds.class_names
        for i in range(len(ds)):
            labels.append(offset + int(ds.labels[i]))
            images.append(ds.load(i))
    return names, np.asarray(labels), images


def features(rec: Recognizer, images: list) -> np.ndarray:
    return np.concatenate([rec.features(images[i : i + BATCH]) for i in range(0, len(images), BATCH)])


def class_banks(rec: Recognizer, prototypes: np.ndarray) -> dict[str, np.ndarray]:
    parts = [
        rec.backend.run(SUPPORT, {"prototypes": prototypes[i : i + BATCH]})
        for i in range(0, len(prototypes), BATCH)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in CLASS_BANK}


def exact_scores(rec: Recognizer, feats: np.ndarray, bank: dict[str, np.ndarray], batch: int) -> np.ndarray:
    return np.concatenate([rec._head(feats[i : i + batch], bank) for i in range(0, len(feats), batch)])


def winner_ranks(exact: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Rank (0 = best) under the coarse score of each row's exact winner."""
    winner = exact.argmax(axis=1)
    at_winner = coarse[np.arange(len(coarse)), winner]
    return (coarse > at_winner[:, None]).sum(axis=1)


def run_seed(rec, names, labels, feats, ks, seed, batch, check, rng_check, cache=None) -> dict:
    rng = np.random.default_rng(seed)
    n_all = len(names)
    shot = np.array([rng.choice(np.flatnonzero(labels == c)) for c in range(n_all)])
    bank = class_banks(rec, feats[shot])
    is_query = np.ones(len(labels), bool)
    is_query[shot] = False
    q_idx = np.flatnonzero(is_query)
    start = time.perf_counter()
    head_sha = rec.manifest.graphs["head"].sha256[:12]
    cached = cache / f"exact-{head_sha}-seed{seed}.npy" if cache else None
    if cached is not None and cached.is_file():
        exact_all = np.load(cached)
    else:
        exact_all = exact_scores(rec, feats[q_idx], bank, batch)  # [queries, all classes]
        if cached is not None:
            cache.mkdir(parents=True, exist_ok=True)
            np.save(cached, exact_all)
    exact_s = time.perf_counter() - start
    coarse_all = coarse_scores(feats[q_idx], bank["class_weight"])
    rotation = np.array([rotation_of(n) for n in names])
    out = {"seed": seed, "exact_head_s": exact_s, "sets": []}
    for rots in ROTATION_SETS:
        cols = np.flatnonzero(np.isin(rotation, rots))
        rows = np.isin(labels[q_idx], cols)
        exact = exact_all[rows][:, cols]
        coarse = coarse_all[rows][:, cols]
        truth = np.searchsorted(cols, labels[q_idx][rows])
        ranks = winner_ranks(exact, coarse)
        entry = {
            "classes": len(cols),
            "rotations": list(rots),
            "queries": int(rows.sum()),
            "exact_accuracy": float((exact.argmax(1) == truth).mean()),
            "coarse_accuracy": float((coarse.argmax(1) == truth).mean()),
            "winner_rank_max": int(ranks.max()),
            "winner_rank_q995": float(np.quantile(ranks, TARGET)),
            "shortlist": {},
        }
        for k in ks:
            top = np.argsort(-coarse, axis=1)[:, :k]
            sub = np.take_along_axis(exact, top, axis=1)
            pick = top[np.arange(len(top)), sub.argmax(1)]
            entry["shortlist"][k] = {
                "agreement": float((ranks < k).mean()),
                "agreement_direct": float((pick == exact.argmax(1)).mean()),
                "accuracy": float((pick == truth).mean()),
            }
        out["sets"].append(entry)
    if check:
        out["recognizer_check"] = recognizer_check(
            rec, names, feats[shot], bank, feats, q_idx, exact_all, ks, check, rng_check
        )
    return out


def recognizer_check(rec, names, protos, bank, feats, q_idx, exact_all, ks, count, rng) -> dict:
    """Classify a sample of queries through `Recognizer._classify_scores` with `shortlist=K` (all
    classes enrolled) and compare with the top-1 derived above."""
    gallery = new_gallery(rec.manifest)
    for c, name in enumerate(names):
        row = gallery.add_shots(name.replace("/", " "), protos[c], 1, None)  # names may not hold "/"
        gallery.set_bank(row, {k: bank[k][c] for k in CLASS_BANK})
    picks = rng.choice(len(q_idx), size=min(count, len(q_idx)), replace=False)
    coarse = coarse_scores(feats[q_idx[picks]], bank["class_weight"])
    result = {"queries": len(picks)}
    shortlisted = Recognizer(rec.bundle, rec.manifest, rec.backend, gallery, None)
    for k in ks:
        shortlisted.shortlist = k
        got = shortlisted._classify_scores(feats[q_idx[picks]]).argmax(1)
        top = np.argsort(-coarse, axis=1)[:, :k]
        sub = np.take_along_axis(exact_all[picks], top, axis=1)
        derived = top[np.arange(len(top)), sub.argmax(1)]
        result[k] = float((got == derived).mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with the Omniglot zips")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="queries per head call")
    parser.add_argument("--check", type=int, default=300, help="queries re-classified by the Recognizer")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cache", type=Path, help="keep (and reuse) the exact score matrices in this folder")
    args = parser.parse_args()

    rec = Recognizer.open(args.bundle, backend="onnxruntime", threads=args.threads)
    cfg = rec.manifest.model
    start = time.perf_counter()
    names, labels, images = load_images(args.data)
    feats = features(rec, images)
    print(
        f"bundle {args.bundle} ({cfg.backbone} {cfg.preprocess.image_size}px C={cfg.channels} "
        f"G={cfg.groups}, "
        f"{rec.manifest.solver} x {rec.manifest.steps}); {len(names)} classes, {len(images)} images; "
        f"features in {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = {"bundle": str(args.bundle), "ks": args.ks, "seeds": []}
    rng_check = np.random.default_rng(12345)
    for seed in args.seeds:
        out = run_seed(
            rec, names, labels, feats, args.ks, seed, args.batch, args.check, rng_check, args.cache
        )
        results["seeds"].append(out)
        print(f"seed {seed}: exact head over all queries in {out['exact_head_s']:.0f} s", flush=True)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def report(results: dict) -> None:
    ks = results["ks"]
    seeds = results["seeds"]
    several = " (mean over seeds; min over seeds in brackets)" if len(seeds) > 1 else ""
    print(f"\nTop-1 agreement of shortlist-K with exact{several}\n")
    header = f"| {'classes':>7} | {'queries':>7} | {'exact acc.':>10} | {'coarse acc.':>11} | "
    header += " | ".join(f"{'K=' + str(k):>15}" for k in ks) + f" | {'rank q99.5':>10} | {'max rank':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for i, entry in enumerate(seeds[0]["sets"]):
        per = [s["sets"][i] for s in seeds]

        def mean(key, per=per):
            return float(np.mean([p[key] for p in per]))

        cells = []
        for k in ks:
            values = [p["shortlist"][k]["agreement"] for p in per]
            bracket = f" ({100 * min(values):5.2f})" if len(values) > 1 else ""
            cells.append(f"{100 * np.mean(values):6.2f}%{bracket}")
        queries = sum(p["queries"] for p in per)
        q995 = max(p["winner_rank_q995"] for p in per)
        worst = max(p["winner_rank_max"] for p in per)
        print(
            f"| {entry['classes']:>7} | {queries:>7} | {100 * mean('exact_accuracy'):>9.2f}% | "
            f"{100 * mean('coarse_accuracy'):>10.2f}% | "
            + " | ".join(f"{c:>15}" for c in cells)
            + f" | {q995:>10.0f} | {worst:>8} |"
        )
    print("\nShortlist accuracy (top-1 = true class), mean over seeds:")
    for i, entry in enumerate(seeds[0]["sets"]):
        accs = [float(np.mean([s["sets"][i]["shortlist"][k]["accuracy"] for s in seeds])) for k in ks]
        print(
            f"  {entry['classes']:>4} classes: "
            + ", ".join(f"K={k} {100 * a:.2f}%" for k, a in zip(ks, accs))
        )
    for s in seeds:
        check = s.get("recognizer_check")
        if check:
            same = ", ".join(f"K={k} {100 * check[k]:.1f}%" for k in ks)
            print(
                f"seed {s['seed']}: Recognizer shortlist top-1 equals the derived one on {check['queries']} "
                f"queries: {same}"
            )
    print(
        "\nrank q99.5 / max rank: the 99.5th percentile and the maximum, over queries, of the exact winner's "
        "rank under the cheap score (K must exceed it); coarse acc.: the cheap score alone as a classifier."
    )


if __name__ == "__main__":
    main()
