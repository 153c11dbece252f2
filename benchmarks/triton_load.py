"""Load on dmf_recognizer served by a real Triton Inference Server, against a local Recognizer.

For each bundle (the packaged demo bundle; with --resnet12 also a random-weight ResNet-12 at 84x84,
exported here with dopri5 x 8) and each gallery size N (--classes, default 10 100):

1. a gallery of N classes is written into the repository's dmf_recognizer folder (prototypes are
   perturbed real feature maps, banks from support.onnx: `dmf_deploy.runtime.tools.bench.fill_gallery`);
2. `dmf-serve` starts on free loopback ports (one tritonserver, one model instance, dynamic batching);
3. for each client count (--clients, default 1 4 16), that many threads send single-frame `classify`
   requests through one RemoteRecognizer for --seconds, then the same threads call `classify` on a
   local Recognizer (same bundle, same gallery, in this process) for as long. Requests per second is
   completed calls / wall time; p50/p99 are per-call latencies.
4. Triton's statistics for the model, read before and after each served run: inference_count (frames)
   over execution_count (model executions) is the mean batch the dynamic batcher formed.

    python benchmarks/triton_load.py [--resnet12] [--classes 10 100] [--clients 1 4 16]
                                     [--seconds 5] [--json out.json]

Needs the serve extra (pip install "dmf-deploy[serve]"); --resnet12 needs torch.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http as http

from dmf_deploy.export.triton import write_triton_repository
from dmf_deploy.export.triton_recognizer import GALLERY_FILE, MODEL_NAME
from dmf_deploy.manifest import read_manifest
from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.runtime.recognizer import Recognizer
from dmf_deploy.runtime.serve.key import HEADER
from dmf_deploy.runtime.serve.remote import RemoteRecognizer
from dmf_deploy.runtime.serve.server import serving
from dmf_deploy.runtime.tools.bench import fill_gallery, random_frames


def load(call: Callable[[int], object], clients: int, seconds: float) -> dict[str, float]:
    """`clients` threads calling call(thread index) for `seconds`: req/s and latency percentiles."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds

    def worker(k: int) -> None:
        mine = latencies[k]
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                call(k)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            mine.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, first: {errors[0]}")
    all_ms = np.array([x for bucket in latencies for x in bucket]) * 1e3
    return {
        "requests": int(all_ms.size),
        "req_per_s": all_ms.size / wall,
        "p50_ms": float(np.percentile(all_ms, 50)),
        "p99_ms": float(np.percentile(all_ms, 99)),
    }


def model_counts(client: Any, key: str) -> tuple[int, int]:
    """(inference_count, execution_count) of dmf_recognizer since the server started."""
    stats = client.get_inference_statistics(MODEL_NAME, headers={HEADER: key})["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def run_bundle(
    bundle: Path, label: str, classes: list[int], clients: list[int], seconds: float, work: Path
) -> list[dict[str, Any]]:
    manifest = read_manifest(bundle)
    helper = Recognizer.open(bundle)
    frames = random_frames(max(clients), seed=5)  # each client sends its own frame
    results = []
    for n in classes:
        repo = work / f"{label}-{n}"
        write_triton_repository(bundle, manifest, repo)
        gallery_path = repo / MODEL_NAME / GALLERY_FILE
        fill_gallery(helper, n).save(gallery_path)
        local = Recognizer.open(bundle, gallery=gallery_path)  # as the server opens it
        with serving(repo, work / f"{label}-{n}.log") as served, RemoteRecognizer(served.url) as remote:
            stats = http.InferenceServerClient(served.url)
            assert len(remote.classes) == n
            for frame in frames:  # warm-up: first calls pay for session set-up
                remote.classify(frame)
                local.classify(frame)
            for c in clients:
                before = model_counts(stats, served.key)
                served_run = load(lambda k: remote.classify(frames[k]), c, seconds)
                after = model_counts(stats, served.key)
                local_run = load(lambda k, rec=local: rec.classify(frames[k]), c, seconds)
                inferences, executions = after[0] - before[0], after[1] - before[1]
                row = {
                    "bundle": label,
                    "classes": n,
                    "clients": c,
                    "served": served_run,
                    "local": local_run,
                    "frames": inferences,
                    "executions": executions,
                    "mean_batch": inferences / max(1, executions),
                }
                results.append(row)
                print(format_row(row), flush=True)
            stats.close()
    return results


def format_row(r: dict[str, Any]) -> str:
    s, lo = r["served"], r["local"]
    return (
        f"{r['bundle']:>9} N={r['classes']:<4} clients={r['clients']:<3} "
        f"served {s['req_per_s']:7.1f} req/s p50 {s['p50_ms']:7.2f} ms p99 {s['p99_ms']:7.2f} ms | "
        f"local {lo['req_per_s']:7.1f} req/s p50 {lo['p50_ms']:7.2f} ms p99 {lo['p99_ms']:7.2f} ms | "
        f"batches: {r['frames']} frames in {r['executions']} executions = {r['mean_batch']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resnet12", action="store_true", help="Also a random-weight ResNet-12 bundle.")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="dmf-triton-load-") as tmp:
        work = Path(tmp)
        demo = DEMO_BUNDLE
        results += run_bundle(demo, "demo", args.classes, args.clients, args.seconds, work)
        if args.resnet12:
            from pytorch_head import make_random_resnet12  # benchmarks/ is this script's folder

            bundle = make_random_resnet12(work / "resnet12")
            results += run_bundle(bundle, "resnet12", args.classes, args.clients, args.seconds, work)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
