"""The head in PyTorch beside the bundle on ONNX Runtime: factored and literal forms, one query frame.

dmf-bench (runtime/tools/bench.py) times a bundle on the torch-free runtime; this script adds the PyTorch
forms of the head of the checkpoint the bundle was exported from, at the same numbers of classes and
on the same galleries (prototypes from the bundle's backbone and support graph, as dmf-bench builds
them):

- factored: the class bank precomputed (as the runtime holds it), then the per-pair work;
- literal: per (query, class) pair, the offset conv, the deformable conv and the ODE in channel
  space, in chunks of classes (skipped above --literal-max: ~40 ms per class for ResNet-12 on a CPU).

`--make-random-resnet12 DIR` first exports a random-weight ResNet-12 (ModelConfig() defaults, 84x84,
G = 64, k = 1, dopri5 x 8) to DIR/bundle with its checkpoint DIR/resnet12-random.pt, the bundle of
the figures in benchmarks/README.md; then `dmf-bench --bundle DIR/bundle` times the runtime side.

    python benchmarks/pytorch_head.py [--bundle DIR] [--ckpt demo|PATH] [--classes 1,10,100]
                                      [--repeats 10] [--threads 2] [--literal-max 100] [--json out.json]
    python benchmarks/pytorch_head.py --make-random-resnet12 /tmp/r12
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmf_deploy.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from dmf_deploy.manifest import Manifest, sha256_file
from dmf_deploy.packaged import DEMO_CHECKPOINT, resolve_bundle_path
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.gallery import Gallery
from dmf_deploy.runtime.tools.bench import (
    fill_gallery,
    first_rows,
    parse_classes,
    peak_rss_mb,
    random_frames,
    time_blocks,
)

LITERAL_MAX = 100  # the literal form costs ~40 ms per class on a CPU (ResNet-12): N above is skipped
LITERAL_CHUNK = 10  # classes per literal call


def bundle_checkpoint(manifest: Manifest, ckpt: str | None) -> Path:
    """The checkpoint the bundle was exported from: --ckpt, or the demo checkpoint when it matches."""
    path = resolve_checkpoint(ckpt) if ckpt is not None else DEMO_CHECKPOINT
    expected = manifest.checkpoint_sha256
    if expected and sha256_file(path) != expected:
        raise SystemExit(f"checkpoint {path} is not the one this bundle was exported from (sha256 differs)")
    return path


def make_random_resnet12(out: Path) -> Path:
    """A random-weight ResNet-12 (ModelConfig() defaults) exported with dopri5 x 8; the bundle folder."""
    from dmf_deploy import ModelConfig, save_checkpoint
    from dmf_deploy.export.bundle import export_bundle
    from dmf_deploy.model import DMFNet

    torch.manual_seed(0)
    model = DMFNet(ModelConfig()).eval()
    ckpt = save_checkpoint(model, out / "resnet12-random.pt", note="random weights, benchmark only")
    return export_bundle(ckpt, out / "bundle", solver="dopri5", steps=8, check=False)


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


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"PyTorch {r['torch']} ({r['threads']} threads), the head alone, one query frame; "
        f"checkpoint {r['checkpoint']}; bundle {r['bundle']}",
        "",
        "| N     | factored ms |      p90 | literal ms |      p90 | literal/factored |",
        "|-------|-------------|----------|------------|----------|------------------|",
    ]
    for n, t in r["by_classes"].items():
        fac, lit = t["factored"], t["literal"]
        cells = f"| {n:<5} | {fac['median_ms']:>11.2f} | {fac['p90_ms']:>8.2f} |"
        if "median_ms" in lit:
            ratio = lit["median_ms"] / fac["median_ms"]
            cells += f" {lit['median_ms']:>10.2f} | {lit['p90_ms']:>8.2f} | {ratio:>15.1f}x |"
        else:
            cells += f" {'skipped':>10} | {'':>8} | {'':>16} |"
        lines.append(cells)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="demo", help='bundle folder, or "demo" (default)')
    parser.add_argument("--ckpt", help='its checkpoint ("demo" or a path; default: the demo checkpoint)')
    parser.add_argument("--classes", default="1,10,100", type=parse_classes)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--literal-max", type=int, default=LITERAL_MAX)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--make-random-resnet12", type=Path, metavar="DIR", help="export the benchmark bundle and stop"
    )
    args = parser.parse_args()
    if args.make_random_resnet12 is not None:
        print(f"wrote {make_random_resnet12(args.make_random_resnet12)}")
        return

    bundle = resolve_bundle_path(args.bundle)
    manifest = Manifest.read(bundle)
    try:
        ckpt = bundle_checkpoint(manifest, args.ckpt)
    except CheckpointError as exc:
        raise SystemExit(str(exc)) from None
    rec = Recognizer.open(bundle, backend="onnxruntime", threads=args.threads)
    full = fill_gallery(rec, max(args.classes))
    galleries = {n: first_rows(full, rec.manifest, n) for n in args.classes}
    query = rec.features(random_frames(1, seed=7))
    results = {"bundle": str(bundle), "checkpoint": str(ckpt)}
    results |= torch_forms(
        ckpt, manifest, query, galleries, args.repeats, args.threads, args.literal_max, print
    )
    print()
    print(format_report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
