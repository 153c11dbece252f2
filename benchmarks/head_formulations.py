"""Formulations of the exported DMF head, side by side on ONNX Runtime (CPU).

Every variant is the whole head graph (query features + class bank -> scores [Q, N]) exported with
the bundle's own exporter path (`export.graphs.export_graph`, dynamo, opset 18) from one random-weight
ResNet-12 head: C = 640, 11x11 maps, G = 64, k = 1, fixed-step dopri5 x 8. One query frame (Q = 1).

- gridsample: ONNX GridSample over [N*9, GK, h, w], the bank in the reference layout
  (`DMFNet.head_scores`, the PyTorch reference traced);
- gather: what bundles export (`dmf_deploy.bundle_head`, the bank in the bundle's layout as
  support.onnx writes it): the 2x2 window around every sample computed in the graph, one Gather of
  9 taps x 4 corners rows of GK values per position, one batched MatMul for the weighted sum, and
  the group-space scores laid out [Q, G, N, hw];
- gather, polynomial growth: the same, with the solver's growth evaluated as dopri5's stability
  polynomial (Horner, then three squarings) instead of exp, which equals it in float32
  (`dmf_deploy.solvers.growth_is_exp`);
- gather, reference-layout bank: the same fed the reference layout ([N, 18, h, w] offsets,
  channel-first [N, 9, GK, h, w] taps), which the graph converts first (one pass over the whole bank
  per frame);
- dense matrix: no Gather and no Transpose, a dense [hw, hw] bilinear matrix per (class, tap) built
  from hat functions relu(1 - |p - i|), one batched MatMul against the channel-first bank, a sum over
  taps (its cost grows with (h*w)^2 per class, the gather's with h*w);
- chunked N: the gridsample and gather graphs called on chunks of classes (the runtime's HEAD_CHUNK).

Exactness: each variant's scores against gridsample's, relative = max|got - ref| / max|ref| (the
target is 1e-4). Timing: median and p90 of wall-clock time and median CPU time of this process, the
variants called in turn (a, b, c, a, b, c, ...) after warm-up, so that other load hits all alike.
Peak memory: the peak-RSS growth of a fresh process over one call of a variant at that N (Linux;
`--no-rss` skips it).

    python benchmarks/head_formulations.py [--classes 100 1000] [--repeats 7] [--threads 2]
                                           [--chunks 64 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmf_deploy import ModelConfig, bundle_head
from dmf_deploy.export.graphs import HeadGraph, export_graph
from dmf_deploy.head import TAPS, ClassBank
from dmf_deploy.manifest import HEAD, graph_io
from dmf_deploy.model import DMFNet

SOLVER, STEPS, OPSET = "dopri5", 8, 18
TOLERANCE = 1e-4
WARMUP = 2
VARIANTS = ("gridsample", "gather", "gather-poly", "gather-ref", "dense")
BUNDLE_LAYOUT = ("gather", "gather-poly")  # variants fed the bank in the bundle's layout
LABELS = {
    "gridsample": "GridSample (reference)",
    "gather": "Gather, bundle layout (as exported)",
    "gather-poly": "Gather, bundle layout, polynomial growth",
    "gather-ref": "Gather, reference-layout bank (converted)",
    "dense": "dense bilinear matrix + MatMul (no Gather)",
}


class _Reference(nn.Module):
    """The PyTorch reference traced: GridSample over the bank in the reference layout."""

    def __init__(self, model: DMFNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, query, support_offset, tap_projections, class_weight):
        return self.model.head_scores(
            query, ClassBank(support_offset, tap_projections, class_weight), SOLVER, STEPS
        )


class _ConvertingGather(nn.Module):
    """The bundle's head fed the reference layout: the graph converts the bank on every call."""

    def __init__(self, model: DMFNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, query, support_offset, tap_projections, class_weight):
        bank = bundle_head.bundle_bank(ClassBank(support_offset, tap_projections, class_weight))
        return bundle_head.bundle_head_scores(self.model, query, bank, SOLVER, STEPS)


@contextlib.contextmanager
def polynomial_growth() -> Iterator[None]:
    """Trace the bundle head with no bound on the rates, so that growth stays the polynomial."""
    saved = bundle_head.MAX_FILTER
    bundle_head.MAX_FILTER = None
    try:
        yield
    finally:
        bundle_head.MAX_FILTER = saved


def _dense(taps: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling as a dense matrix per (query, class, tap): the weight of input (i, j) for a
    sample at (y, x) is relu(1 - |y - i|) * relu(1 - |x - j|), zero outside the map by construction.
    taps [N, 9, GK, h, w] (the reference layout) -> [Q, N, GK, h, w], with no Transpose and no Gather."""
    n, t, gk, h, w = taps.shape
    q, hw = py.shape[0], h * w
    ys = torch.arange(h, dtype=py.dtype).reshape(h, 1)
    xs = torch.arange(w, dtype=px.dtype).reshape(w, 1)
    hat_y = torch.relu(1 - (py.reshape(q, n, t, 1, hw) - ys).abs())  # [Q, N, 9, h, hw_out]
    hat_x = torch.relu(1 - (px.reshape(q, n, t, 1, hw) - xs).abs())  # [Q, N, 9, w, hw_out]
    matrix = (hat_y.unsqueeze(4) * hat_x.unsqueeze(3)).reshape(q, n, t, hw, hw)  # [.., hw_in, hw_out]
    sampled = torch.matmul(taps.reshape(1, n, t, gk, hw), matrix)  # [Q, N, 9, GK, hw_out]
    return sampled.sum(dim=2).reshape(q, n, gk, h, w)


class _DenseHead(nn.Module):
    def __init__(self, model: DMFNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, query, support_offset, tap_projections, class_weight):
        head = self.model.head
        bank = ClassBank(support_offset, tap_projections, class_weight)
        py, px = head.sampling_positions(query, bank)
        filt = torch.sigmoid(_dense(tap_projections, py, px))
        maps = head._group_space_scores(query, filt, class_weight, SOLVER, STEPS, 1e-2, 1e-2)
        return maps.mean(dim=(2, 3))


def build_model(ckpt: str | None = None, seed: int = 0) -> DMFNet:
    """The random-weight ResNet-12 (ModelConfig() defaults), or a checkpoint's model ("demo": conv4)."""
    if ckpt:
        from dmf_deploy.checkpoint import load_checkpoint

        return load_checkpoint(ckpt)
    torch.manual_seed(seed)
    model = DMFNet(ModelConfig()).eval()
    c = model.config.channels
    with torch.no_grad():  # offsets of a pixel or two, as in a trained model
        model.head.off_conv.weight.normal_(0.0, 1.5 / (2 * c * 25) ** 0.5)
        model.head.kernel_conv.weight.normal_(0.0, 2.0 / (9 * c) ** 0.5)
    return model


def export_variants(model: DMFNet, out: Path) -> dict[str, Path]:
    config = model.config
    bundle_spec = graph_io(config)[HEAD]
    s, gk = config.feature_size, config.filter_channels
    reference_spec = {"inputs": dict(bundle_spec["inputs"]), "outputs": bundle_spec["outputs"]}
    reference_spec["inputs"]["support_offset"] = ["N", 2 * TAPS, s, s]
    reference_spec["inputs"]["tap_projections"] = ["N", TAPS, gk, s, s]
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(2, config.channels, s, s, generator=gen)
    with torch.no_grad():
        bank = model.class_bank(torch.randn(3, config.channels, s, s, generator=gen))
    reference_args = (query, *bank)
    bundle_args = (query, *bundle_head.bundle_bank(bank))
    modules = {
        "gridsample": (_Reference(model), reference_args, reference_spec),
        "gather": (HeadGraph(model, SOLVER, STEPS), bundle_args, bundle_spec),
        "gather-poly": (HeadGraph(model, SOLVER, STEPS), bundle_args, bundle_spec),
        "gather-ref": (_ConvertingGather(model), reference_args, reference_spec),
        "dense": (_DenseHead(model), reference_args, reference_spec),
    }
    paths = {}
    for name in VARIANTS:
        path = out / f"head-{name}.onnx"
        paths[name] = path
        if path.is_file():  # a kept graph (--keep)
            continue
        module, args, spec = modules[name]
        context = polynomial_growth() if name == "gather-poly" else contextlib.nullcontext()
        with context:
            export_graph(module.eval(), args, spec, path, OPSET)
    return paths


def to_bundle_layout(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference-layout bank as support.onnx writes it (`bundle_head.bundle_bank`)."""
    bank = bundle_head.bundle_bank(ClassBank(**{k: torch.from_numpy(feeds[k]) for k in ClassBank._fields}))
    return {**feeds, **{k: v.numpy() for k, v in bank._asdict().items()}}


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the runtime's
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def make_inputs(model: DMFNet, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    config = model.config
    s = config.feature_size
    gen = torch.Generator().manual_seed(100 + seed)
    query = torch.randn(1, config.channels, s, s, generator=gen)
    feeds = {"query_features": query.numpy()}
    with torch.no_grad():
        for start in range(0, n, 250):  # the bank in batches: bounds the torch intermediates
            protos = torch.randn(min(250, n - start), config.channels, s, s, generator=gen)
            for key, value in model.class_bank(protos)._asdict().items():
                feeds.setdefault(key, []).append(value.numpy())
    return {k: v if k == "query_features" else np.concatenate(v) for k, v in feeds.items()}


def runner(sess, name: str, feeds: dict[str, np.ndarray], chunk: int | None) -> Callable[[], np.ndarray]:
    if name in BUNDLE_LAYOUT:
        feeds = to_bundle_layout(feeds)
    n = len(feeds["class_weight"])
    if not chunk or chunk >= n:
        return lambda: sess.run(["scores"], feeds)[0]
    parts = [
        {k: v if k == "query_features" else np.ascontiguousarray(v[i : i + chunk]) for k, v in feeds.items()}
        for i in range(0, n, chunk)
    ]
    return lambda: np.concatenate([sess.run(["scores"], p)[0] for p in parts], axis=1)


def relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def peak_rss_mb(path: Path, name: str, feeds_file: Path, chunk: int | None, threads: int) -> float:
    """Peak-RSS growth (MB) of one call of a variant, in a fresh process without torch."""
    cmd = [sys.executable, __file__, "--rss-probe", str(path), name, str(feeds_file), str(chunk or 0)]
    out = subprocess.run(cmd + [str(threads)], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status (not Linux?)")


def rss_probe(path: Path, name: str, feeds_file: Path, chunk: int, threads: int) -> None:
    """Peak RSS during one call minus RSS before it (inputs loaded, session created). Read from
    /proc/self/status (VmHWM, reset through clear_refs): ru_maxrss would carry the parent's peak,
    which a child inherits across fork and exec."""
    with np.load(feeds_file) as data:
        feeds = {k: data[k] for k in data.files}
    run = runner(session(path, threads), name, feeds, chunk)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_mb("VmRSS")
    run()
    print(_status_mb("VmHWM") - before)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-probe":
        path, name, feeds_file, chunk, threads = sys.argv[2:7]
        rss_probe(Path(path), name, Path(feeds_file), int(chunk), int(threads))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunks", type=int, nargs="*", default=[64, 256], help="chunked-N variants")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="export into (and reuse graphs from) this folder")
    parser.add_argument("--ckpt", help="another model's head: a checkpoint path or 'demo' (conv4, 7x7 maps)")
    args = parser.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    model = build_model(args.ckpt)
    cfg = model.config
    print(
        f"DMF head on ONNX Runtime {ort.__version__} CPU, {args.threads} threads: {cfg.backbone} head "
        f"C={cfg.channels}, {cfg.feature_size}x{cfg.feature_size}, G={cfg.groups}, k={cfg.kernel}, "
        f"{SOLVER} x {STEPS}, Q = 1\n"
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start",
        flush=True,
    )
    results: dict = {"threads": args.threads, "load_average_start": os.getloadavg(), "rows": []}
    with tempfile.TemporaryDirectory(prefix="dmf-head-forms-") as tmp:
        start = time.perf_counter()
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        paths = export_variants(model, args.keep or Path(tmp))
        print(f"exported {len(paths)} head graphs in {time.perf_counter() - start:.0f} s", flush=True)
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        cases = [(name, None) for name in VARIANTS]
        cases += [(name, c) for c in args.chunks for name in ("gridsample", "gather")]
        for n in args.classes:
            feeds = make_inputs(model, n)
            feeds_file = Path(tmp) / f"feeds-{n}.npz"
            if not args.no_rss:
                np.savez(feeds_file, **feeds)
            runs = {case: runner(sessions[case[0]], case[0], feeds, case[1]) for case in cases}
            ref = runs[("gridsample", None)]()
            errors = {case: relative(run(), ref) for case, run in runs.items()}
            for _ in range(WARMUP):
                for run in runs.values():
                    run()
            wall: dict = {case: [] for case in cases}
            cpu: dict = {case: [] for case in cases}
            for _ in range(args.repeats):
                for case, run in runs.items():
                    w0, c0 = time.perf_counter(), time.process_time()
                    run()
                    wall[case].append(time.perf_counter() - w0)
                    cpu[case].append(time.process_time() - c0)
            base = statistics.median(wall[("gridsample", None)])
            for case in cases:
                name, chunk = case
                rss = None
                if not args.no_rss:
                    rss = peak_rss_mb(paths[name], name, feeds_file, chunk, args.threads)
                row = {
                    "variant": name,
                    "chunk": chunk,
                    "classes": n,
                    "median_ms": 1e3 * statistics.median(wall[case]),
                    "p90_ms": 1e3 * float(np.percentile(wall[case], 90)),
                    "cpu_ms": 1e3 * statistics.median(cpu[case]),
                    "speedup": base / statistics.median(wall[case]),
                    "relative_error": errors[case],
                    "exact": errors[case] <= TOLERANCE,
                    "peak_rss_mb": rss,
                }
                results["rows"].append(row)
                print(f"  N={n} {describe(row)}: {row['median_ms']:.0f} ms", flush=True)
    results["load_average_end"] = os.getloadavg()
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def describe(row: dict) -> str:
    label = LABELS[row["variant"]]
    return f"{label}, chunks of {row['chunk']}" if row["chunk"] else label


def report(results: dict) -> None:
    print(
        f"\nload average {results['load_average_start'][0]:.1f} at the start, "
        f"{results['load_average_end'][0]:.1f} at the end\n"
    )
    print(
        f"| {'N':>5} | {'formulation':<52} | {'median ms':>9} | {'p90 ms':>8} | {'CPU ms':>8} | "
        f"{'ms/class':>8} | {'speed-up':>8} | {'rel. error':>10} | {'peak MB':>7} |"
    )
    print("|" + "|".join("-" * (width + 2) for width in (5, 52, 9, 8, 8, 8, 8, 10, 7)) + "|")
    for r in results["rows"]:
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "-"
        print(
            f"| {r['classes']:>5} | {describe(r):<52} | {r['median_ms']:>9.1f} | {r['p90_ms']:>8.1f} | "
            f"{r['cpu_ms']:>8.1f} | {r['median_ms'] / r['classes']:>8.3f} | {r['speedup']:>7.2f}x | "
            f"{r['relative_error']:>10.1e} | {rss:>7} |"
        )
    print(
        "\nspeed-up: GridSample's median wall time / this one's, same N. rel. error: against GridSample's "
        f"scores (exact: <= {TOLERANCE:g}). peak MB: peak-RSS growth over one call, in a fresh process."
    )


if __name__ == "__main__":
    main()
