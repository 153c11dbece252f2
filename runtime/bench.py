"""dmf-bench: per-stage latency and memory of a bundle on the runtime, and of the PyTorch forms.

Stages, each timed on its own (median and p90 of --repeats calls after warm-up calls):

- backbone, by batch size (1 and 8 frames);
- enrolment of one class from one frame (`Recognizer.enroll`: backbone + support graph + self-score),
  and the support graph alone per class, in batches;
- the head, by the number of enrolled classes N (one query frame's features against the class bank,
  chunked as the Recognizer runs it);
- end-to-end `classify(frame)` by N: exact, and with a shortlist when --shortlist K is given;
- with torch installed and the bundle's checkpoint at hand: the PyTorch head in its factored form
  (class bank precomputed, as the runtime) and its literal pairwise form, side by side.

Each stage runs in blocks of back-to-back calls (as a camera loop calls it) that take turns with the
other stages of the same N over two rounds, so that load drifting over the run hits them alike; the
backbone is timed again at every N, and the ratios use that figure.

Classes are enrolled quickly: support.onnx runs on perturbed copies of real feature maps in batches
and the rows are written with `Gallery.add_shots` + `set_bank`, instead of N backbone calls.

Memory: peak RSS (`ru_maxrss`) after each stage, and the memory floor of a frame: the bytes of class
bank that one classification reads at each N (all three bank tensors of every class for exact; the
classifier weight of every class plus the K shortlisted banks for a shortlist).

torch is optional: without it (or without the checkpoint) the PyTorch rows are skipped with a note.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from dmf_deploy.manifest import BACKBONE, CLASS_BANK, SUPPORT, BundleError, Manifest, sha256_file
from dmf_deploy.runtime.backends import BACKENDS
from dmf_deploy.runtime.gallery import Gallery
from dmf_deploy.runtime.recognizer import Recognizer, new_gallery

DEFAULT_CLASSES = (1, 10, 100, 1000)
BACKBONE_BATCHES = (1, 8)
WARMUP = 2
SUPPORT_BATCH = 50
LITERAL_MAX = 100  # the literal PyTorch form costs ~40 ms per class on a CPU (ResNet-12): N above is skipped
LITERAL_CHUNK = 10  # classes per literal call


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
    return {
        k: np.dtype(dtypes[k]).itemsize * math.prod(shape) for k, shape in manifest.bank_shapes.items()
    }


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
        new = gallery.add_shots(full.names[row], full.feature_sums[row], int(full.counts[row]), None)
        gallery.set_bank(new, {k: banks[k][row] for k in CLASS_BANK})
    return gallery


# ----- the PyTorch forms -----------------------------------------------------------------------------
def resolve_torch_checkpoint(
    bundle: Path, manifest: Manifest, ckpt: str | None
) -> tuple[Path | None, str]:
    """The checkpoint for the PyTorch rows, or (None, why they are skipped)."""
    expected = manifest.checkpoint_sha256
    if ckpt is None:
        import dmf_deploy

        demo = Path(dmf_deploy.__file__).resolve().parent / "assets" / "demo.pt"
        if demo.is_file() and expected and sha256_file(demo) == expected:
            return demo, "the demo checkpoint (the bundle is the demo bundle)"
        return None, "no --ckpt given and the bundle is not the demo bundle"
    path = demo_or_path(ckpt)
    if not path.is_file():
        return None, f"checkpoint {path} does not exist"
    if expected and sha256_file(path) != expected:
        return None, f"checkpoint {path} is not the one this bundle was exported from (sha256 differs)"
    return path, str(path)


def demo_or_path(ckpt: str) -> Path:
    if ckpt == "demo":
        import dmf_deploy

        return Path(dmf_deploy.__file__).resolve().parent / "assets" / "demo.pt"
    return Path(ckpt)


def torch_forms(
    ckpt: Path,
    manifest: Manifest,
    query: np.ndarray,
    galleries: dict[int, Gallery],
    repeats: int,
    threads: int | None,
    literal_max: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """PyTorch head, factored (bank precomputed) and literal, one query frame against N classes."""
    import torch

    from dmf_deploy.checkpoint import load_checkpoint

    if threads:
        torch.set_num_threads(threads)
    model = load_checkpoint(ckpt)
    solver, steps = manifest.solver, manifest.steps
    scale = model.config.score_scale()
    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "by_classes": {}}
    q = torch.from_numpy(np.ascontiguousarray(query))
    with torch.inference_mode():
        for n, gallery in galleries.items():
            protos = torch.from_numpy(
                np.ascontiguousarray(gallery.feature_sums / gallery.counts[:, None, None, None])
            )
            # The bank in batches: torch's broadcast MatMul in class_bank expands [N, 9, C, h*w] (5 GB at
            # N = 1000 for ResNet-12); ONNX Runtime's support graph does not.
            parts = [model.class_bank(protos[i : i + 50].float()) for i in range(0, len(protos), 50)]
            bank = type(parts[0])(*(torch.cat(t) for t in zip(*parts)))

            def factored(bank=bank) -> object:
                return model.head_scores(q, bank, solver, steps)

            fns: dict[str, Callable[[], object]] = {"factored": factored}
            if n <= literal_max:

                def literal(protos=protos) -> object:
                    parts = []
                    for i in range(0, len(protos), LITERAL_CHUNK):  # bounds the [Q*N, C, h, w] stages
                        chunk = protos[i : i + LITERAL_CHUNK].float()
                        maps = model.head.literal_score_map(q, chunk, solver, steps)
                        parts.append(maps.mean(dim=(2, 3)) * scale)
                    return torch.cat(parts, dim=1)

                fns["literal"] = literal
            entry = time_blocks(fns, repeats, warmup=1)
            if "literal" not in entry:
                entry["literal"] = {"skipped": f"N > --literal-max {literal_max}"}
            out["by_classes"][n] = entry
            lit = entry["literal"].get("median_ms")
            say(
                f"pytorch N={n}: factored {entry['factored']['median_ms']:.1f} ms"
                + (f", literal {lit:.1f} ms" if lit is not None else "")
            )
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ----- the run -----------------------------------------------------------------------------------------
def run_bench(
    bundle: Path,
    classes: list[int],
    backend: str = "onnxruntime",
    shortlist: int | None = None,
    repeats: int = 10,
    threads: int | None = None,
    ckpt: str | None = None,
    literal_max: int = LITERAL_MAX,
    say: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    start = time.perf_counter()
    rec = Recognizer.open(bundle, backend=backend, threads=threads)
    cfg = rec.manifest.model
    results: dict[str, Any] = {
        "bundle": str(bundle),
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

    # Enrolment: one class from one frame (then removed), and the support graph per class in batches.
    empty = Recognizer(rec.bundle, rec.manifest, rec.backend, new_gallery(rec.manifest), None)
    protos = rec.features(random_frames(SUPPORT_BATCH, seed=3))

    def enroll_one() -> None:
        empty.enroll("bench", [frame])
        empty.remove("bench")

    timed = time_blocks(
        {"enroll": enroll_one, "support": lambda: rec.backend.run(SUPPORT, {"prototypes": protos})}, repeats
    )
    results["enroll"] = {
        "one_class_one_frame": timed["enroll"],
        "support_per_class_ms": timed["support"]["median_ms"] / SUPPORT_BATCH,
        "support_batch": SUPPORT_BATCH,
    }
    results["peak_rss_mb"]["enroll"] = peak_rss_mb()
    say(
        f"enrol one class: {timed['enroll']['median_ms']:.1f} ms; support graph "
        f"{results['enroll']['support_per_class_ms']:.2f} ms per class"
    )

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
            "head": lambda exact=exact, bank=bank: exact._head(query, bank),
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

    # The PyTorch forms.
    try:
        import torch  # noqa: F401
    except ImportError:
        results["pytorch"] = {"skipped": "torch is not installed"}
    else:
        path, why = resolve_torch_checkpoint(bundle, rec.manifest, ckpt)
        if path is None:
            results["pytorch"] = {"skipped": why}
        else:
            say(f"pytorch forms with {why}")
            results["pytorch"] = {
                "checkpoint": str(path),
                **torch_forms(path, rec.manifest, query, galleries, repeats, threads, literal_max, say),
            }
    if "skipped" in results["pytorch"]:
        say(f"pytorch forms skipped: {results['pytorch']['skipped']}")
    results["peak_rss_mb"]["end"] = peak_rss_mb()
    return results


# ----- output ------------------------------------------------------------------------------------------
def _table(header: list[str], widths: list[int], rows: list[list[str]]) -> list[str]:
    """A Markdown table; the first column left-aligned, the others right-aligned."""

    def line(cells: list[str]) -> str:
        parts = [f"{cells[0]:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(parts) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def _ratio(t: dict[str, float]) -> str:
    return f"{t['ratio_to_backbone']:.2f} ({t['cpu_ratio_to_backbone']:.2f})"


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

    pt = r["pytorch"]
    lines.append("")
    if "skipped" in pt:
        lines.append(f"PyTorch forms: skipped ({pt['skipped']})")
    else:
        lines.append(
            f"PyTorch {pt['torch']} ({pt['threads']} threads), the head alone, one query frame; "
            f"checkpoint {pt['checkpoint']}:"
        )
        rows = []
        for n, t in pt["by_classes"].items():
            fac, lit = t["factored"], t["literal"]
            cells = [str(n), f"{fac['median_ms']:.2f}", f"{fac['p90_ms']:.2f}"]
            if "median_ms" in lit:
                ratio = lit["median_ms"] / fac["median_ms"]
                cells += [f"{lit['median_ms']:.2f}", f"{lit['p90_ms']:.2f}", f"{ratio:.1f}x"]
            else:
                cells += ["skipped", "", ""]
            rows.append(cells)
        header = ["N", "factored ms", "p90", "literal ms", "p90", "literal/factored"]
        lines += _table(header, [5, 11, 8, 10, 8, 16], rows)
    per_class = sum(r["bank_bytes_per_class"].values())
    lines += [
        "",
        "CPU ms: median CPU time of the process (all threads), the steadier figure on a loaded machine.",
        "x backbone: median over the median of the backbone alone (B = 1) timed with the same N (CPU: the"
        " same with CPU times).",
        f"bank MB/frame: the memory floor, class-bank bytes one frame reads ({per_class / 1e6:.3f} MB per "
        "class exact; a shortlist reads every class weight plus K banks).",
        f"peak RSS: ru_maxrss after the stage; {r['peak_rss_mb']['end']:.0f} MB at the end.",
    ]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install matplotlib") from None
    ns = sorted(int(n) for n in r["by_classes"])
    by = {int(n): t for n, t in r["by_classes"].items()}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    modes = [("head", "head (exact)"), ("classify", "classify, exact")]
    if r["shortlist"]:
        modes.append(("classify_shortlist", f"classify, shortlist K={r['shortlist']}"))
    for key, label in modes:
        ax.plot(ns, [by[n][key]["median_ms"] for n in ns], marker="o", label=label)
    pt = r["pytorch"]
    if "by_classes" in pt:
        pns = sorted(int(n) for n in pt["by_classes"])
        pby = {int(n): t for n, t in pt["by_classes"].items()}
        ax.plot(
            pns,
            [pby[n]["factored"]["median_ms"] for n in pns],
            marker="s",
            ls="--",
            label="PyTorch factored head",
        )
        lit = [n for n in pns if "median_ms" in pby[n]["literal"]]
        if lit:
            ax.plot(
                lit,
                [pby[n]["literal"]["median_ms"] for n in lit],
                marker="s",
                ls="--",
                label="PyTorch literal head",
            )
    ax.axhline(r["backbone"][1]["median_ms"], color="grey", ls=":", label="backbone, 1 frame")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("enrolled classes N")
    ax.set_ylabel("median latency (ms)")
    ax.set_title(r["model"], fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
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


def default_bundle() -> Path:
    import dmf_deploy

    return Path(dmf_deploy.__file__).resolve().parent / "assets" / "demo_bundle"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--bundle",
    type=click.Path(path_type=Path, file_okay=False),
    help="Bundle folder (default: the packaged demo bundle).",
)
@click.option(
    "--classes",
    "classes_text",
    default=",".join(str(n) for n in DEFAULT_CLASSES),
    show_default=True,
    help="Comma-separated numbers of enrolled classes.",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True)
@click.option("--shortlist", type=click.IntRange(min=1), help="Also time classify with a shortlist of K.")
@click.option(
    "--repeats", type=click.IntRange(min=1), default=10, show_default=True, help="Timed calls per stage."
)
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads (and torch's).")
@click.option(
    "--ckpt",
    help="Checkpoint of the bundle for the PyTorch rows ('demo' or a path; default: the demo checkpoint "
    "when the bundle is the demo bundle, otherwise those rows are skipped).",
)
@click.option(
    "--literal-max",
    type=click.IntRange(min=0),
    default=LITERAL_MAX,
    show_default=True,
    help="Largest N for the (slow) literal PyTorch form.",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="Write the figures here."
)
@click.option(
    "--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), help="Write a PNG plot here."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def main(
    bundle: Path | None,
    classes_text: str,
    backend: str,
    shortlist: int | None,
    repeats: int,
    threads: int | None,
    ckpt: str | None,
    literal_max: int,
    json_path: Path | None,
    plot_path: Path | None,
    quiet: bool,
) -> None:
    """Time each stage of a bundle (backbone, enrolment, head, classify) against the number of classes."""
    classes = parse_classes(classes_text)
    bundle = bundle if bundle is not None else default_bundle()
    if plot_path is not None:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.ClickException("--plot needs matplotlib: pip install matplotlib") from None
    try:
        Manifest.read(bundle)
    except BundleError as exc:
        raise click.ClickException(str(exc)) from None

    def say(msg: str) -> None:
        if not quiet:
            click.echo(f"dmf-bench: {msg}", err=True)

    try:
        results = run_bench(bundle, classes, backend, shortlist, repeats, threads, ckpt, literal_max, say)
    except (BundleError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(format_report(results))
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
        say(f"wrote {json_path}")
    if plot_path is not None:
        plot(results, plot_path)
        say(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
