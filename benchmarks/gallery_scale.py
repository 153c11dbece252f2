"""Galleries that grow: save, open, file size and peak memory at 100, 1,000 and 10,000 classes.

For each class count N it builds a version 3 gallery of N classes of a ResNet-12 bundle through the
public API (prototypes are perturbed feature maps of synthetic frames, banks from support.onnx, one
thumbnail each), then measures:

- save: enrol one class (`rec.enroll`, one frame) and `rec.save()`, durable when it returns; the median
  and the slowest of --enrols saves, and the enrol itself;
- open: `Recognizer.open(bundle, gallery=...)` in a fresh process, against the same open without a
  gallery (the sessions' own cost);
- file: the gallery file's size, closed (one file), and the bank cache beside it (derived data, not the
  gallery's size; its disk use, sparse files counted by blocks);
- RSS: the peak resident memory (ru_maxrss) of a fresh process that opens the gallery and classifies
  100 frames with the default shortlist, and its time per frame.

Run nice'd (the CI machine is shared), about 10 minutes on 2 cores:

    nice -n 10 python benchmarks/gallery_scale.py                 # exports a random ResNet-12 (torch)
    nice -n 10 python benchmarks/gallery_scale.py --bundle DIR    # any bundle
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dmf_deploy.manifest import CLASS_BANK, SUPPORT
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.gallery import bank_cache_folder

BUILD_BATCH = 64  # prototypes per support.onnx call while building
SAVE_EVERY = 512  # classes per save while building (the sums held in memory until then)

# The fresh process of the open and RSS measurements.
CHILD = r"""
import json, resource, sys, time
import numpy as np
from dmf_deploy.runtime import Recognizer
bundle, gallery, frames = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
bare = Recognizer.open(bundle)
bare_s = time.perf_counter() - start
start = time.perf_counter()
rec = Recognizer.open(bundle, gallery=gallery)
open_s = time.perf_counter() - start
size = rec.config.preprocess.image_size
rng = np.random.default_rng(5)
shots = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(frames)]
rec.classify(shots[0])
times = []
for frame in shots:
    start = time.perf_counter()
    rec.classify(frame)
    times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"bare_open_s": bare_s, "open_s": open_s, "classify_ms": 1000 * float(np.median(times)),
                  "peak_rss_mb": peak, "classes": len(rec.classes), "stale": len(rec.gallery.missing_banks)}))
"""


def make_bundle(workdir: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from pytorch_head import make_random_resnet12  # needs torch: the export room

    return make_random_resnet12(workdir / "r12")


def build(bundle: Path, path: Path, n: int, seed: int = 0) -> None:
    """A gallery file of n classes, written as an application would: enrolments, then saves."""
    rec = Recognizer.open(bundle, gallery=path)
    size = rec.config.preprocess.image_size
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(8)]
    base = rec.features(frames)
    thumbs = [np.ascontiguousarray(f[:, :, ::-1]) for f in frames]
    rec.save()
    g = rec.gallery
    for start in range(len(g), n, BUILD_BATCH):
        count = min(BUILD_BATCH, n - start)
        picks = rng.integers(0, len(base), count)
        noise = rng.standard_normal((count, *base.shape[1:])).astype(np.float32) * base.std() * 0.3
        protos = (base[picks] * rng.uniform(0.5, 1.5, (count, 1, 1, 1)) + noise).astype(np.float32)
        banks = rec.backend.run(SUPPORT, {"prototypes": protos})
        for i in range(count):
            bank = {k: banks[k][i] for k in CLASS_BANK}
            g.add_shots(f"class {start + i}", protos[i], 1, thumbs[picks[i]], bank=bank)
        if (start + count) % SAVE_EVERY < BUILD_BATCH or start + count == n:
            rec.save()
    rec.close()


def measure_saves(bundle: Path, path: Path, enrols: int) -> dict[str, float]:
    rec = Recognizer.open(bundle, gallery=path)
    size = rec.config.preprocess.image_size
    rng = np.random.default_rng(9)
    saves, enrol = [], []
    for i in range(enrols):
        frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        start = time.perf_counter()
        rec.enroll(f"added {i}", [frame])
        middle = time.perf_counter()
        rec.save()
        saves.append(time.perf_counter() - middle)
        enrol.append(middle - start)
    for i in range(enrols):  # leave the gallery as built
        rec.remove(f"added {i}")
    rec.save()
    rec.close()
    return {
        "save_median_ms": 1000 * statistics.median(saves),
        "save_max_ms": 1000 * max(saves),
        "enrol_median_ms": 1000 * statistics.median(enrol),
    }


def disk_mb(folder: Path) -> float:
    """Disk use by blocks (the cache's files are sparse), in MB."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file()) / 1e6


def fresh_process(bundle: Path, path: Path, frames: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), str(path), str(frames)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, help="a bundle (default: export a random ResNet-12)")
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--enrols", type=int, default=20, help="enrol + save timings per class count")
    parser.add_argument("--frames", type=int, default=100, help="classified frames in the RSS process")
    parser.add_argument("--workdir", type=Path, help="where the galleries go (default: a temp folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gallery-scale-") as temp:
        workdir = args.workdir or Path(temp)
        workdir.mkdir(parents=True, exist_ok=True)
        bundle = args.bundle or make_bundle(workdir)
        print(f"bundle {bundle}")
        header = (
            f"{'classes':>8} {'build s':>8} {'save ms (median/max)':>21} {'enrol ms':>9} "
            f"{'open s':>7} {'bare open s':>11} {'file MB':>8} {'cache MB':>9} {'peak RSS MB':>11} "
            f"{'classify ms':>11}"
        )
        print(header, flush=True)
        rows = []
        for n in args.classes:
            path = workdir / f"g{n}.dmfg"
            start = time.perf_counter()
            build(bundle, path, n)
            built = time.perf_counter() - start
            saves = measure_saves(bundle, path, args.enrols)
            child = fresh_process(bundle, path, args.frames)
            assert child["classes"] == n and child["stale"] == 0, child
            row = {
                "classes": n,
                "build_s": built,
                **saves,
                **child,
                "file_mb": path.stat().st_size / 1e6,
                "cache_mb": disk_mb(bank_cache_folder(path)),
            }
            rows.append(row)
            print(
                f"{n:>8} {built:>8.1f} {row['save_median_ms']:>11.1f} / {row['save_max_ms']:>7.1f} "
                f"{row['enrol_median_ms']:>9.1f} {row['open_s']:>7.2f} {row['bare_open_s']:>11.2f} "
                f"{row['file_mb']:>8.1f} {row['cache_mb']:>9.1f} {row['peak_rss_mb']:>11.0f} "
                f"{row['classify_ms']:>11.1f}",
                flush=True,
            )
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
