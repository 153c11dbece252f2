"""dmf-bench: per-stage latency and memory of one or more bundles on the torch-free runtime.

Stages, each timed on its own (median and p90 of --repeats calls after warm-up calls):

- backbone, by batch size (1 and 8 frames);
- enrolment: one class from one frame (`Recognizer.enroll`: backbone + support graph + self-score),
  one more shot of an enrolled class against one `classify` at N = 1, and the support graph alone
  per class, in batches;
- the head, by the number of enrolled classes N (one query frame's features against the class bank,
  chunked as the Recognizer runs it: `Recognizer.head_scores`);
- end-to-end `classify(frame)` by N: exact, and with a shortlist when --shortlist K is given;
- with --rss-iters: resident memory over that many `classify` calls at N = 10;
- with --import-cost: the time and memory of `import dmf_deploy.runtime` in a fresh interpreter.

Each stage runs in blocks of back-to-back calls (as a camera loop calls it) that take turns with the
other stages of the same N over two rounds, so that load drifting over the run hits them alike; the
backbone is timed again at every N, and the ratios use that figure. Several --bundle options run one
after the other in one process and are compared side by side (one table, one plot).

Classes are enrolled quickly: support.onnx runs on perturbed copies of real feature maps in batches
and the rows are written with `Gallery.add_shots` + `set_bank`, instead of N backbone calls.

Memory: peak RSS (`ru_maxrss`) after each stage, and the memory floor of a frame: the bytes of class
bank that one classification reads at each N (all three bank tensors of every class for exact; the
classifier weight of every class plus the K shortlisted banks for a shortlist).

The PyTorch forms of the head (factored and literal) are timed by benchmarks/pytorch_head.py.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from dmf_deploy.cli_support import DmfCommand, version_option
from dmf_deploy.manifest import BACKBONE, CLASS_BANK, SUPPORT, BundleError, Manifest
from dmf_deploy.packaged import DEMO_NAME, resolve_bundle_path
from dmf_deploy.runtime.backends import BACKENDS
from dmf_deploy.runtime.gallery import Gallery
from dmf_deploy.runtime.recognizer import Recognizer, new_gallery

DEFAULT_CLASSES = (1, 10, 100, 1000)
BACKBONE_BATCHES = (1, 8)
WARMUP = 2
SUPPORT_BATCH = 50


# ----- timing ----------------------------------------------------------------------------------------
def stats(seconds: list[float], cpu_seconds: list[float] | None = None) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    out = {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "calls": len(ms)}
    if cpu_seconds is not None:
        out["cpu_median_ms"] = float(np.median(cpu_seconds) * 1e3)
    return out


def time_blocks(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = WARMUP, rounds: int = 2
) -> dict[str, dict[str, float]]:
    """Median and p90 wall-clock time (and median CPU time of this process, all threads) of each
    function. Each function runs in blocks of back-to-back calls, as a camera loop calls it, after
    `warmup` calls; the blocks take turns (a, b, c, a, b, c) over `rounds`, so that load drifting over
    the run hits all alike. Calls of different functions are not interleaved one by one: an ONNX
    Runtime session's threads spin for a while after its run and would slow the next session's call,
    which is no part of either. On a loaded machine the CPU time is the steadier figure: it leaves out
    the time spent waiting for a core."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    rounds = max(1, min(rounds, repeats))
    for r in range(rounds):
        calls = repeats // rounds + (1 if r < repeats % rounds else 0)
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            for _ in range(calls):
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    return {name: stats(wall[name], cpu[name]) for name in fns}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024.0


# ----- the class bank --------------------------------------------------------------------------------
def bank_bytes_per_class(manifest: Manifest) -> dict[str, int]:
    """Bytes of each class-bank tensor per class, from the manifest's support outputs and dtypes."""
    dtypes = manifest.bank_dtypes
    return {k: np.dtype(dtypes[k]).itemsize * math.prod(shape) for k, shape in manifest.bank_shapes.items()}


def memory_floor(manifest: Manifest, n: int, shortlist: int | None) -> dict[str, int]:
    """Bytes of class bank one frame reads: exact, and with a shortlist of K (if given)."""
    per_class = bank_bytes_per_class(manifest)
    floor = {"exact_bytes": n * sum(per_class.values())}
    if shortlist:
        k = min(shortlist, n)
        floor["shortlist_bytes"] = (
            n * per_class["class_weight"] + k * sum(per_class.values())
            if n > shortlist
            else floor["exact_bytes"]
        )
    return floor


def random_frames(count: int, size: int = 96, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def fill_gallery(rec: Recognizer, n: int, seed: int = 0) -> Gallery:
    """n classes whose prototypes are perturbed real feature maps; banks from support.onnx in batches."""
    rng = np.random.default_rng(seed)
    base = rec.features(random_frames(8, seed=seed + 1))
    gallery = new_gallery(rec.manifest)
    for start in range(0, n, SUPPORT_BATCH):
        count = min(SUPPORT_BATCH, n - start)
        picks = base[rng.integers(0, len(base), count)]
        noise = rng.standard_normal(picks.shape).astype(np.float32) * picks.std() * 0.3
        protos = (picks * rng.uniform(0.5, 1.5, (count, 1, 1, 1)) + noise).astype(np.float32)
        banks = rec.backend.run(SUPPORT, {"prototypes": protos})
        for i in range(count):
            row = gallery.add_shots(f"class {start + i}", protos[i], 1, None)
            gallery.set_bank(row, {k: banks[k][i] for k in CLASS_BANK})
    return gallery


def first_rows(full: Gallery, manifest: Manifest, n: int) -> Gallery:
    """A gallery of the first n classes of `full`."""
    gallery = new_gallery(manifest)
    banks = full.bank_arrays()
    for row in range(n):
        new = gallery.add_shots(full.names[row], full.feature_sum(row), int(full.counts[row]), None)
        gallery.set_bank(new, {k: banks[k][row] for k in CLASS_BANK})
    return gallery


# ----- memory ----------------------------------------------------------------------------------------
def vm_rss_mb() -> float | None:
    """Resident memory now (VmRSS of /proc/self/status); None where there is no /proc (not Linux)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_growth(rec: Recognizer, iterations: int) -> dict[str, Any]:
    """Resident memory over `iterations` classify calls at N = 10 (frames cycle through 16), after 200
    warm-up calls that bring arenas and caches to their working size."""
    ten = Recognizer(rec.bundle, rec.manifest, rec.backend, fill_gallery(rec, 10, seed=3), None)
    frames = random_frames(16, seed=11)
    for i in range(200):
        ten.classify(frames[i % 16])
    samples = [vm_rss_mb()]
    if samples[0] is None:
        return {"skipped": "no /proc/self/status (not Linux)"}
    start = time.perf_counter()
    for i in range(iterations):
        ten.classify(frames[i % 16])
        if (i + 1) % max(1, iterations // 10) == 0:
            samples.append(vm_rss_mb())
    return {
        "iterations": iterations,
        "classes": 10,
        "start_mb": samples[0],
        "end_mb": samples[-1],
        "growth_mb": samples[-1] - samples[0],
        "samples_mb": samples,
        "classify_ms_mean": 1000 * (time.perf_counter() - start) / max(1, iterations),
    }


IMPORT_PROBE = (
    "import sys, time\n"
    "t = time.perf_counter()\n"
    "import dmf_deploy.runtime\n"
    "dt = time.perf_counter() - t\n"
    "rss = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')][0]\n"
    "print(dt * 1000, rss / 1024, int('torch' in sys.modules))\n"
)


def import_cost(runs: int = 5) -> dict[str, Any]:
    """Time and RSS of `import dmf_deploy.runtime` in fresh interpreters (median of `runs`)."""
    if vm_rss_mb() is None:
        return {"skipped": "no /proc/self/status (not Linux)"}
    figures = []
    for _ in range(runs):
        probe = [sys.executable, "-c", IMPORT_PROBE]
        out = subprocess.run(probe, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            return {"skipped": f"the import failed: {out.stderr.strip().splitlines()[-1:]}"}
        figures.append([float(v) for v in out.stdout.split()])
    ms, rss, torch_loaded = np.median(np.array(figures), axis=0)
    return {"import_ms": float(ms), "rss_mb": float(rss), "torch_imported": bool(torch_loaded), "runs": runs}


# ----- the run -----------------------------------------------------------------------------------------
def run_bench(
    bundle: Path,
    classes: list[int],
    backend: str = "onnxruntime",
    shortlist: int | None = None,
    repeats: int = 10,
    threads: int | None = None,
    rss_iters: int = 0,
    say: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Every stage of one bundle (see the module docstring); the figures as a JSON-ready dict."""
    start = time.perf_counter()
    rec = Recognizer.open(bundle, backend=backend, threads=threads)
    cfg = rec.manifest.model
    results: dict[str, Any] = {
        "bundle": str(bundle),
        "backbone": cfg.backbone,
        "image_size": cfg.preprocess.image_size,
        "model": f"{cfg.backbone} {cfg.preprocess.image_size}px C={cfg.channels} G={cfg.groups} "
        f"k={cfg.kernel}, {rec.manifest.solver} x {rec.manifest.steps}",
        "backend": getattr(rec.backend, "description", None)
        or f"{rec.backend.name} ({', '.join(getattr(rec.backend, 'providers', []))})",
        "threads": threads,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_average": list(os.getloadavg()),
        "repeats": repeats,
        "shortlist": shortlist,
        "open_s": time.perf_counter() - start,
        "bank_bytes_per_class": bank_bytes_per_class(rec.manifest),
    }
    frame = random_frames(1, seed=7)[0]

    # Backbone by batch size.
    batches = {b: rec.preprocess(random_frames(b, seed=10 + b)) for b in BACKBONE_BATCHES}
    timed = time_blocks(
        {f"B={b}": (lambda x=x: rec.backend.run(BACKBONE, {"images": x})) for b, x in batches.items()},
        repeats,
    )
    results["backbone"] = {
        b: {**timed[f"B={b}"], "per_frame_ms": timed[f"B={b}"]["median_ms"] / b} for b in BACKBONE_BATCHES
    }
    results["peak_rss_mb"] = {"backbone": peak_rss_mb()}
    say(
        "backbone: "
        + ", ".join(f"B={b} {results['backbone'][b]['median_ms']:.1f} ms" for b in BACKBONE_BATCHES)
    )

    # Enrolment: one class from one frame (then removed); one more shot of an enrolled class against one
    # classify at N = 1; the support graph per class in batches.
    empty = Recognizer(rec.bundle, rec.manifest, rec.backend, new_gallery(rec.manifest), None)
    one = Recognizer(rec.bundle, rec.manifest, rec.backend, new_gallery(rec.manifest), None)
    one.enroll("first", [frame])
    protos = rec.features(random_frames(SUPPORT_BATCH, seed=3))

    def enroll_one() -> None:
        empty.enroll("bench", [frame])
        empty.remove("bench")

    timed = time_blocks(
        {
            "enroll": enroll_one,
            "enroll_shot": lambda: one.enroll("first", [frame]),
            "classify_n1": lambda: one.classify(frame),
            "support": lambda: rec.backend.run(SUPPORT, {"prototypes": protos}),
        },
        repeats,
    )
    results["enroll"] = {
        "one_class_one_frame": timed["enroll"],
        "one_shot_existing_class": timed["enroll_shot"],
        "classify_n1": timed["classify_n1"],
        "shot_ratio_to_classify": timed["enroll_shot"]["median_ms"] / timed["classify_n1"]["median_ms"],
        "support_per_class_ms": timed["support"]["median_ms"] / SUPPORT_BATCH,
        "support_batch": SUPPORT_BATCH,
    }
    results["peak_rss_mb"]["enroll"] = peak_rss_mb()
    say(
        f"enrol one class: {timed['enroll']['median_ms']:.1f} ms; one more shot "
        f"{results['enroll']['shot_ratio_to_classify']:.2f}x classify at N = 1; support graph "
        f"{results['enroll']['support_per_class_ms']:.2f} ms per class"
    )

    if rss_iters:  # before the large galleries below exist, so the figure is the runtime's own at N = 10
        results["rss"] = rss_growth(rec, rss_iters)
        if "growth_mb" in results["rss"]:
            say(f"RSS over {rss_iters} classify calls: {results['rss']['growth_mb']:+.1f} MB")

    # Head and classify by N.
    full = fill_gallery(rec, max(classes))
    query = rec.features([frame])
    galleries = {
        n: full if n == len(full) else first_rows(full, rec.manifest, n) for n in sorted(set(classes))
    }
    results["by_classes"] = {}
    for n, gallery in galleries.items():
        exact = Recognizer(rec.bundle, rec.manifest, rec.backend, gallery, None)
        bank = gallery.bank_arrays()
        image = batches[1]
        fns: dict[str, Callable[[], object]] = {
            "backbone": lambda image=image: rec.backend.run(BACKBONE, {"images": image}),
            "head": lambda exact=exact, bank=bank: exact.head_scores(query, bank),
            "classify": lambda exact=exact: exact.classify(frame),
        }
        if shortlist:
            short = Recognizer(rec.bundle, rec.manifest, rec.backend, gallery, None, shortlist=shortlist)
            fns["classify_shortlist"] = lambda short=short: short.classify(frame)
        timed = time_blocks(fns, repeats)
        base, base_cpu = timed["backbone"]["median_ms"], timed["backbone"]["cpu_median_ms"]
        for name in fns:
            if name != "backbone":
                timed[name]["ratio_to_backbone"] = timed[name]["median_ms"] / base
                timed[name]["cpu_ratio_to_backbone"] = timed[name]["cpu_median_ms"] / max(base_cpu, 1e-9)
        timed["memory_floor"] = memory_floor(rec.manifest, n, shortlist)
        timed["peak_rss_mb"] = peak_rss_mb()
        results["by_classes"][n] = timed
        head_ms, classify_ms = timed["head"]["median_ms"], timed["classify"]["median_ms"]
        line = f"N={n}: head {head_ms:.1f} ms, classify {classify_ms:.1f} ms"
        if shortlist:
            line += f", classify shortlist K={shortlist} {timed['classify_shortlist']['median_ms']:.1f} ms"
        say(line + f" (backbone {base:.1f} ms)")

    results["peak_rss_mb"]["end"] = peak_rss_mb()
    return results


# ----- output ------------------------------------------------------------------------------------------
CLASSIFY_TARGETS = {10: 1.5, 100: 3.0}  # classify exact at N over the backbone alone ...
CLASSIFY_TARGETS_MODEL = ("resnet12", 84)  # ... of the model they were set for (a ratio depends on it)
SHOT_TARGET = 2.0  # one more enrolment shot over one classify at N = 1
RSS_TARGET_MB = 10.0  # growth over --rss-iters classify calls


def _table(header: list[str], widths: list[int], rows: list[list[str]]) -> list[str]:
    """A Markdown table; the first column left-aligned, the others right-aligned."""

    def line(cells: list[str]) -> str:
        parts = [f"{cells[0]:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(parts) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def _ratio(t: dict[str, float]) -> str:
    return f"{t['ratio_to_backbone']:.2f} ({t['cpu_ratio_to_backbone']:.2f})"


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def targets(r: dict[str, Any]) -> list[str]:
    """The runtime's speed and memory targets that this run measured, each with its verdict."""
    lines = []
    for n, limit in CLASSIFY_TARGETS.items() if classify_targets_apply(r) else ():
        t = r["by_classes"].get(n) or r["by_classes"].get(str(n))
        if t is not None:
            ratio = t["classify"]["ratio_to_backbone"]
            verdict = _verdict(ratio <= limit)
            lines.append(f"classify exact at N = {n}: {ratio:.2f}x the backbone (<= {limit:g}x: {verdict})")
    shot = r["enroll"]["shot_ratio_to_classify"]
    verdict = _verdict(shot <= SHOT_TARGET)
    lines.append(f"one more enrolment shot: {shot:.2f}x classify at N = 1 (<= {SHOT_TARGET:g}x: {verdict})")
    rss = r.get("rss", {})
    if "growth_mb" in rss:
        ok = rss["growth_mb"] < RSS_TARGET_MB
        lines.append(
            f"RSS over {rss['iterations']} classify calls at N = {rss['classes']}: {rss['start_mb']:.1f} -> "
            f"{rss['end_mb']:.1f} MB ({rss['growth_mb']:+.1f} MB; < {RSS_TARGET_MB:g} MB: {_verdict(ok)})"
        )
    return lines


def classify_targets_apply(r: dict[str, Any]) -> bool:
    """The classify targets are ratios to the backbone: they hold for ResNet-12 at 84 px only (next to a
    backbone as small as the demo's conv4, any head weighs more)."""
    return (r.get("backbone"), r.get("image_size")) == CLASSIFY_TARGETS_MODEL


def format_report(r: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.1f}" for x in r["load_average"])
    lines = [
        f"bundle:  {r['bundle']}",
        f"model:   {r['model']}",
        f"backend: {r['backend']}; threads {r['threads'] or 'default'}; {r['cpus']} CPUs; "
        f"load average {load} at the start; median and p90 of {r['repeats']} calls after warm-up",
        "",
    ]
    rows: list[list[str]] = []

    def row(stage: str, t: dict, ratio: str = "", floor: str = "", rss: str = "") -> None:
        cpu = f"{t['cpu_median_ms']:.2f}" if "cpu_median_ms" in t else ""
        rows.append([stage, f"{t['median_ms']:.2f}", f"{t['p90_ms']:.2f}", cpu, ratio, floor, rss])

    for b, t in r["backbone"].items():
        row(f"backbone, B = {b}" + (f" ({t['per_frame_ms']:.2f} ms/frame)" if int(b) > 1 else ""), t)
    en = r["enroll"]
    row("enrol one class (1 frame)", en["one_class_one_frame"])
    row("enrol one more shot of a class", en["one_shot_existing_class"])
    row("classify, N = 1 (beside the shot)", en["classify_n1"])
    support = f"support graph per class (batch {en['support_batch']})"
    rows.append([support, f"{en['support_per_class_ms']:.2f}", "", "", "", "", ""])
    for n, t in r["by_classes"].items():
        floor = t["memory_floor"]
        exact_mb = f"{floor['exact_bytes'] / 1e6:.2f}"
        rss = f"{t['peak_rss_mb']:.0f}"
        row(f"head, N = {n}", t["head"], _ratio(t["head"]), exact_mb, rss)
        row(f"classify exact, N = {n}", t["classify"], _ratio(t["classify"]), exact_mb)
        if "classify_shortlist" in t:
            mb = f"{floor['shortlist_bytes'] / 1e6:.2f}"
            s = t["classify_shortlist"]
            row(f"classify shortlist K={r['shortlist']}, N = {n}", s, _ratio(s), mb)
    header = ["stage", "median ms", "p90 ms", "CPU ms", "x backbone (CPU)", "bank MB/frame", "peak RSS MB"]
    lines += _table(header, [44, 9, 8, 8, 16, 13, 11], rows)
    per_class = sum(r["bank_bytes_per_class"].values())
    lines += [
        "",
        "CPU ms: median CPU time of the process (all threads), the steadier figure on a loaded machine.",
        "x backbone: median over the median of the backbone alone (B = 1) timed with the same N (CPU: the"
        " same with CPU times).",
        f"bank MB/frame: the memory floor, class-bank bytes one frame reads ({per_class / 1e6:.3f} MB per "
        "class exact; a shortlist reads every class weight plus K banks).",
        f"peak RSS: ru_maxrss after the stage; {r['peak_rss_mb']['end']:.0f} MB at the end.",
        "",
        "targets:"
        if classify_targets_apply(r)
        else "targets (the classify ones are set for ResNet-12 at 84 px and are not shown for this model):",
        *(f"  {line}" for line in targets(r)),
    ]
    return "\n".join(lines)


def bundle_labels(bundles: list[Path]) -> list[str]:
    """Short names that tell the bundles apart: the folder name, or more of the path where names repeat."""
    parts = [Path(os.path.abspath(b)).parts for b in bundles]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i + 1}: {Path(b).name}" for i, b in enumerate(bundles)]  # the same folder given twice


def format_comparison(runs: list[dict[str, Any]]) -> str:
    """The bundles side by side: median ms (x backbone) of each stage by N."""
    labels = [r["label"] for r in runs]
    ns = sorted({int(n) for r in runs for n in r["by_classes"]})
    rows = [["backbone, B = 1"] + [f"{r['backbone'][1]['median_ms']:.2f}" for r in runs]]
    enrol = [f"{r['enroll']['one_class_one_frame']['median_ms']:.2f}" for r in runs]
    rows.append(["enrol one class", *enrol])
    stages = [("head", "head"), ("classify", "classify exact")]
    if any(r["shortlist"] for r in runs):
        stages.append(("classify_shortlist", "classify shortlist"))
    for n in ns:
        for key, name in stages:
            cells = [f"{name}, N = {n}"]
            for r in runs:
                t = r["by_classes"].get(n, {}).get(key)
                cells.append(f"{t['median_ms']:.2f} ({t['ratio_to_backbone']:.2f}x)" if t else "")
            rows.append(cells)
    width = max(16, *(len(label) for label in labels))
    lines = ["side by side: median ms (x the bundle's own backbone)", ""]
    lines += _table(["stage", *labels], [26] + [width] * len(labels), rows)
    lines += [""] + [f"{r['label']}: {r['bundle']} ({r['model']})" for r in runs]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """One log-log plot: head and classify latency against N, every bundle in its own colour."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_ns: set[int] = set()
    for i, r in enumerate(runs):
        colour = colours[i % len(colours)]
        by = {int(n): t for n, t in r["by_classes"].items()}
        ns = sorted(by)
        all_ns.update(ns)
        prefix = f"{r['label']}: " if len(runs) > 1 else ""
        modes = [("classify", "classify, exact", "-"), ("head", "head (exact)", "--")]
        if r["shortlist"]:
            modes.append(("classify_shortlist", f"classify, shortlist K={r['shortlist']}", "-."))
        for key, name, style in modes:
            ys = [by[n][key]["median_ms"] for n in ns]
            ax.plot(ns, ys, marker="o", ls=style, color=colour, label=prefix + name)
        backbone = r["backbone"][1]["median_ms"]
        ax.axhline(backbone, color=colour, ls=":", lw=1, label=prefix + "backbone, 1 frame")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ticks = sorted(all_ns)
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.set_xlabel("enrolled classes N")
    ax.set_ylabel("median latency (ms)")
    title = runs[0]["model"] if len(runs) == 1 else "dmf-bench: " + ", ".join(r["label"] for r in runs)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_classes(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected comma-separated positive integers, got {text!r}")
    return sorted(set(values))


@click.command("dmf-bench", cls=DmfCommand, context_settings={"help_option_names": ["-h", "--help"]})
@version_option("dmf-bench")
@click.option(
    "--bundle",
    "bundle_args",
    multiple=True,
    help='Bundle folder, or "demo" (the default): the packaged demo bundle. Repeat to compare bundles.',
)
@click.option(
    "--classes",
    "classes_text",
    default=",".join(str(n) for n in DEFAULT_CLASSES),
    show_default=True,
    help="Comma-separated numbers of enrolled classes.",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--shortlist", type=click.IntRange(min=1), help="Also time classify with a shortlist of K.")
@click.option(
    "--repeats", type=click.IntRange(min=1), default=10, show_default=True, help="Timed calls per stage."
)
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads.")
@click.option(
    "--rss-iters",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also measure resident memory over this many classify calls at N = 10 (0: skip).",
)
@click.option(
    "--import-cost",
    "measure_import",
    is_flag=True,
    help="Also time `import dmf_deploy.runtime` in fresh interpreters.",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="Write the figures here."
)
@click.option(
    "--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), help="Write a PNG plot here."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def main(
    bundle_args: tuple[str, ...],
    classes_text: str,
    backend: str,
    shortlist: int | None,
    repeats: int,
    threads: int | None,
    rss_iters: int,
    measure_import: bool,
    json_path: Path | None,
    plot_path: Path | None,
    quiet: bool,
) -> None:
    """Time each stage of one or more bundles (backbone, enrolment, head, classify) against the number
    of classes; several --bundle are compared side by side."""
    classes = parse_classes(classes_text)
    bundles = [resolve_bundle_path(b) for b in bundle_args or (DEMO_NAME,)]
    if plot_path is not None:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.ClickException("--plot needs matplotlib: pip install matplotlib") from None
    for bundle in bundles:  # every bundle checked before the first is timed
        try:
            Manifest.read(bundle)
        except BundleError as exc:
            raise click.ClickException(str(exc)) from None

    def say(msg: str) -> None:
        if not quiet:
            click.echo(f"dmf-bench: {msg}", err=True)

    runs = []
    for bundle, label in zip(bundles, bundle_labels(bundles)):
        say(f"{label}: {bundle}")
        try:
            run = run_bench(bundle, classes, backend, shortlist, repeats, threads, rss_iters, say)
        except (BundleError, RuntimeError) as exc:
            raise click.ClickException(f"{bundle}: {exc}") from None
        runs.append({"label": label, **run})
        click.echo(format_report(run) + "\n")
    if len(runs) > 1:
        click.echo(format_comparison(runs) + "\n")
    figures: dict[str, Any] = {"bundles": runs}
    if measure_import:
        figures["import"] = imported = import_cost()
        if "import_ms" in imported:
            click.echo(
                f"import dmf_deploy.runtime (fresh interpreter, median of {imported['runs']}): "
                f"{imported['import_ms']:.0f} ms, RSS after it {imported['rss_mb']:.1f} MB; "
                f"torch imported: {imported['torch_imported']}"
            )
        else:
            click.echo(f"import cost: skipped ({imported['skipped']})")
    if json_path is not None:
        json_path.write_text(json.dumps(figures, indent=2))
        say(f"wrote {json_path}")
    if plot_path is not None:
        plot(runs, plot_path)
        say(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
