"""Runtime latency on ONNX Runtime (CPU): a frame's cost as the gallery grows, and the runtime's weight.

All figures in one run, on one bundle: ResNet-12 at 84x84 with random weights (ModelConfig() defaults:
widths 64-160-320-640, G = 64, k = 1), exported with fixed-step dopri5 x 8, unless --bundle names one.

- backbone alone, one frame (B = 1): backbone.onnx on a preprocessed frame;
- exact `Recognizer.scores` for one frame with N enrolled classes (preprocess + backbone + head), and
  its ratio to the backbone alone timed alongside (targets: N = 10 at most 1.5x, N = 100 at most
  3x). The classes are
  enrolled quickly: support.onnx on random prototypes in batches, written with Gallery.add_shots and
  set_bank, instead of running the backbone once per class;
- one enrolment shot (`enroll` of one frame: backbone + support + self-score) against one `classify`
  at N = 1 (target: at most 2x);
- RSS growth over --rss-iters classifications at N = 10 (target under 10 MB), read from VmRSS in
  /proc/self/status;
- the runtime alone, in a fresh interpreter: time to `import dmf_deploy.runtime` and RSS after it.

Times are the median and p90 of --repeats calls after warm-up calls. Figures that are compared are
measured together, in alternating blocks of consecutive calls, so that other load on the machine hits
both alike.

    python benchmarks/runtime_latency.py [--bundle DIR] [--classes 1 10 100 1000] [--repeats 20]
                                         [--rss-iters 5000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dmf_deploy.manifest import BACKBONE, CLASS_BANK, SUPPORT
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.recognizer import new_gallery

TARGETS = {10: 1.5, 100: 3.0}  # scores(N) / backbone
ENROLL_TARGET = 2.0  # one enrolment shot / one classify at N = 1
RSS_TARGET_MB = 10.0
WARMUP = 3
SUPPORT_BATCH = 50
BLOCK = 5  # consecutive calls of one function before the next takes its turn


def vm_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status (not Linux?)")


def stats(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "n": len(ms)}


def timed(*fns: Callable[[], object], repeats: int, warmup: int = WARMUP) -> list[dict[str, float]]:
    """Median and p90 of `repeats` calls of each function, in alternating blocks of BLOCK calls.

    Each function runs in a loop of its own, as an application calls it frame after frame; blocks of
    the functions take turns so that a change in other load on the machine hits all of them alike.
    The first call of each block is not counted: it pays for the previous function's session (ONNX
    Runtime's worker threads of one session spin for a while after a run and slow the next session).
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < repeats:
        for fn, bucket in zip(fns, times):
            fn()
            for _ in range(min(BLOCK, repeats - len(bucket))):
                start = time.perf_counter()
                fn()
                bucket.append(time.perf_counter() - start)
    return [stats(t) for t in times]


def build_bundle(out: Path) -> Path:
    """A random-weight ResNet-12 (ModelConfig() defaults) exported with dopri5 x 8. Needs torch."""
    import torch

    from dmf_deploy import ModelConfig, save_checkpoint
    from dmf_deploy.export.bundle import export_bundle
    from dmf_deploy.model import DMFNet

    torch.manual_seed(0)
    model = DMFNet(ModelConfig()).eval()
    ckpt = save_checkpoint(model, out / "resnet12-random.pt", note="random weights, benchmark only")
    return export_bundle(ckpt, out / "bundle", solver="dopri5", steps=8, check=False)


def random_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(count)]


def fill_gallery(rec: Recognizer, n: int, seed: int = 0):
    """A gallery of n classes whose prototypes are perturbed real feature maps, banks from support.onnx."""
    rng = np.random.default_rng(seed)
    base = rec.features(random_frames(8, seed + 1))  # [8, C, h, w] real feature maps
    gallery = new_gallery(rec.manifest)
    for start in range(0, n, SUPPORT_BATCH):
        stop = min(start + SUPPORT_BATCH, n)
        picks = base[rng.integers(0, len(base), stop - start)]
        noise = rng.standard_normal(picks.shape).astype(np.float32) * picks.std() * 0.3
        protos = (picks * rng.uniform(0.5, 1.5, (len(picks), 1, 1, 1)) + noise).astype(np.float32)
        banks = rec.backend.run(SUPPORT, {"prototypes": protos})
        for i, proto in enumerate(protos):
            row = gallery.add_shots(f"class {start + i}", proto, 1, None)
            gallery.set_bank(row, {k: banks[k][i] for k in CLASS_BANK})
    return gallery


def import_cost() -> dict[str, float]:
    """Import time and RSS of `dmf_deploy.runtime` in fresh interpreters (median of 5; bare python too)."""
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "import dmf_deploy.runtime\n"
        "dt = time.perf_counter() - t\n"
        "rss = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')][0]\n"
        "print(dt * 1000, rss / 1024, int('torch' in sys.modules))\n"
    )
    bare = "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')][0] / 1024)"
    runs = []
    for _ in range(5):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs.append([float(v) for v in out.stdout.split()])
    ms, rss, torch_loaded = np.median(np.array(runs), axis=0)
    bare_rss = float(subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True).stdout)
    return {
        "import_ms": float(ms),
        "rss_mb": float(rss),
        "bare_python_rss_mb": bare_rss,
        "torch_imported": bool(torch_loaded),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="an existing bundle (default: export a random ResNet-12)")
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rss-iters", type=int, default=5000)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dmf-bench-") as tmp:
        bundle = args.bundle
        if bundle is None:
            print("exporting a random-weight ResNet-12 bundle (84x84, dopri5 x 8) ...", flush=True)
            start = time.perf_counter()
            bundle = build_bundle(Path(tmp))
            print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
        results = run(bundle, args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def run(bundle: Path, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    rec = Recognizer.open(bundle, backend="onnxruntime")
    open_s = time.perf_counter() - start
    cfg = rec.manifest.model
    frame = random_frames(1, 7)[0]
    results: dict = {
        "bundle": str(bundle),
        "model": f"{cfg.backbone} {cfg.preprocess.image_size}px C={cfg.channels} G={cfg.groups} "
        f"k={cfg.kernel}, {rec.manifest.solver} x {rec.manifest.steps}",
        "backend": f"onnxruntime {', '.join(rec.backend.providers)}",
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "open_s": open_s,
    }

    images = rec.preprocess([frame])

    def backbone() -> object:
        return rec.backend.run(BACKBONE, {"images": images})

    results["backbone"], results["preprocess"] = timed(
        backbone, lambda: rec.preprocess([frame]), repeats=args.repeats
    )
    print(f"backbone alone: {results['backbone']['median_ms']:.1f} ms", flush=True)

    # RSS over many classifications at N = 10 (the gallery stays fixed; frames cycle through 16). Done
    # before the large galleries below exist, so the absolute figure is the runtime's own at N = 10.
    ten = Recognizer(rec.bundle, rec.manifest, rec.backend, fill_gallery(rec, 10, seed=3), None)
    frames = random_frames(16, 11)
    for i in range(200):  # warm-up: arenas and caches reach their working size
        ten.classify(frames[i % 16])
    rss = [vm_rss_mb()]
    start = time.perf_counter()
    for i in range(args.rss_iters):
        ten.classify(frames[i % 16])
        if (i + 1) % max(1, args.rss_iters // 10) == 0:
            rss.append(vm_rss_mb())
    elapsed = time.perf_counter() - start
    results["rss"] = {
        "iterations": args.rss_iters,
        "classes": 10,
        "start_mb": rss[0],
        "end_mb": rss[-1],
        "max_mb": max(rss),
        "growth_mb": rss[-1] - rss[0],
        "samples_mb": rss,
        "classify_ms_mean": elapsed / max(1, args.rss_iters) * 1000,
    }
    print(f"RSS over {args.rss_iters} classifications: {rss[0]:.1f} -> {rss[-1]:.1f} MB", flush=True)

    results["scores"] = {}
    full = fill_gallery(rec, max(args.classes))
    for n in sorted(args.classes):
        gallery = new_gallery(rec.manifest)
        for row in range(n):
            name = full.names[row]
            gallery.add_shots(name, full.feature_sums[row], 1, None)
            gallery.set_bank(row, {k: v[row] for k, v in full.bank_arrays().items()})
        at_n = Recognizer(rec.bundle, rec.manifest, rec.backend, gallery, None)
        assert at_n.scores([frame]).shape == (1, n)
        # Each N is timed against the backbone in the same run (alternating blocks): the ratio then
        # survives a change of load on a busy machine.
        base, entry = timed(backbone, lambda r=at_n: r.scores([frame]), repeats=args.repeats)
        entry["backbone_ms"] = base["median_ms"]
        entry["ratio"] = entry["median_ms"] / base["median_ms"]
        results["scores"][n] = entry
        print(f"scores, N = {n}: {entry['median_ms']:.1f} ms ({entry['ratio']:.2f}x backbone)", flush=True)
        del at_n, gallery

    one = Recognizer(rec.bundle, rec.manifest, rec.backend, new_gallery(rec.manifest), None)
    one.enroll("first", [frame])
    results["classify_n1"], results["enroll_shot"] = timed(
        lambda: one.classify(frame), lambda: one.enroll("first", [frame]), repeats=args.repeats
    )
    results["enroll_ratio"] = results["enroll_shot"]["median_ms"] / results["classify_n1"]["median_ms"]
    print(f"enrol one shot: {results['enroll_ratio']:.2f}x classify at N = 1", flush=True)

    results["import"] = import_cost()
    return results


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(r: dict) -> None:
    bb = r["backbone"]
    print()
    print(f"Model:   {r['model']}")
    print(
        f"Backend: {r['backend']}; {r['cpus']} CPUs; load average at start "
        f"{', '.join(f'{x:.1f}' for x in r['load_average'])}; Recognizer.open {r['open_s']:.2f} s"
    )
    print()
    head = ("measure", "median ms", "p90 ms", "ratio", "(of ms)", "target")
    print("| {:<40} | {:>9} | {:>8} | {:>5} | {:>7} | {:<14} |".format(*head))
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 10}|{'-' * 7}|{'-' * 9}|{'-' * 16}|")

    def row(name: str, t: dict, ratio: str = "", of: str = "", target: str = "") -> None:
        times = f"{t['median_ms']:>9.2f} | {t['p90_ms']:>8.2f}"
        print(f"| {name:<40} | {times} | {ratio:>5} | {of:>7} | {target:<14} |")

    row("preprocess one frame (resize, normalise)", r["preprocess"])
    row("backbone alone, B = 1", bb)
    for n, t in r["scores"].items():
        target = ""
        if int(n) in TARGETS:
            limit = TARGETS[int(n)]
            target = f"<= {limit:g}x {verdict(t['ratio'] <= limit)}"
        row(f"scores(1 frame), N = {n} (exact)", t, f"{t['ratio']:.2f}", f"{t['backbone_ms']:.2f}", target)
    er = r["enroll_ratio"]
    row("classify(1 frame), N = 1", r["classify_n1"])
    row(
        "enroll one shot (existing class)",
        r["enroll_shot"],
        f"{er:.2f}",
        f"{r['classify_n1']['median_ms']:.2f}",
        f"<= {ENROLL_TARGET:g}x {verdict(er <= ENROLL_TARGET)}",
    )
    print(
        "ratio: median over the median of its reference (the backbone, or classify at N = 1) timed "
        "alongside it; '(of ms)' is that reference's median"
    )
    print()
    rss = r["rss"]
    growth_ok = rss["growth_mb"] < RSS_TARGET_MB
    print(
        f"RSS over {rss['iterations']} classify calls at N = {rss['classes']} "
        f"({rss['classify_ms_mean']:.1f} ms each): {rss['start_mb']:.1f} -> {rss['end_mb']:.1f} MB "
        f"(growth {rss['growth_mb']:+.1f} MB, max {rss['max_mb']:.1f} MB; target < {RSS_TARGET_MB:g} MB: "
        f"{verdict(growth_ok)})"
    )
    print("  samples (MB): " + " ".join(f"{v:.1f}" for v in rss["samples_mb"]))
    imp = r["import"]
    print(
        f"import dmf_deploy.runtime (fresh interpreter, median of 5): {imp['import_ms']:.0f} ms; "
        f"RSS after import {imp['rss_mb']:.1f} MB (bare python {imp['bare_python_rss_mb']:.1f} MB); "
        f"torch imported: {imp['torch_imported']}"
    )


if __name__ == "__main__":
    main()
