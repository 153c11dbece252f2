"""dmf-serve's enrol rate as its gallery grows: a gallery of 10 classes against one of 1,000.

The served recogniser saves every change before it answers it (one SQLite transaction holding that
change alone, durable when it commits), so an enrolment's cost should not grow with the gallery
(issue [S]: the rate at 1,000 classes within 1.5x of the rate at 10). Measured as a user meets it:

1. per size N (--classes, default 10 1000), a Triton repository of the packaged demo bundle
   (`write_triton_repository`, what `dmf-export --triton` writes) whose gallery is enrolled to N classes
   through the library (pen_gallery.py: `Recognizer.enroll` of a pen drawing per class, then `save`);
2. one `dmf-serve` per repository, all running at once, on free loopback ports with a key of this run;
3. --enrols enrolments per server, each a new class of one frame sent by `RemoteRecognizer.enroll`
   (one HTTP request; the server runs the backbone and support.onnx, saves, answers), timed at the
   client. The servers take turns in rounds of --round enrolments, so the load of a shared machine
   falls on every size alike;
4. after the run, each gallery file is opened again and must hold N + --enrols classes.

    nice -n 10 python benchmarks/serve_enrol.py [--classes 10 1000] [--enrols 500] [--round 10]

About 2 minutes on 2 cores. Needs the serve extra (pip install "dmf-deploy[serve]").
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from pen_gallery import build_gallery, pen_frame  # benchmarks/, this script's folder

from dmf_deploy.export.triton import write_triton_repository
from dmf_deploy.export.triton_recognizer import GALLERY_FILE, MODEL_NAME
from dmf_deploy.manifest import read_manifest
from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.serve.remote import RemoteRecognizer
from dmf_deploy.runtime.serve.server import serving

FIRST_NEW = 1_000_000  # class ids of the enrolled-while-served drawings: none of the prefilled ones


def repository(work: Path, n: int) -> Path:
    """A Triton repository of the demo bundle whose gallery holds n classes."""
    repo = work / f"repo-{n}"
    write_triton_repository(DEMO_BUNDLE, read_manifest(DEMO_BUNDLE), repo)
    seconds = build_gallery(DEMO_BUNDLE, repo / MODEL_NAME / GALLERY_FILE, n)
    print(f"gallery of {n} classes enrolled in {seconds:.1f} s", flush=True)
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--enrols", type=int, default=500, help="enrolments per server")
    parser.add_argument("--round", type=int, default=10, help="enrolments per server per turn")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    key = secrets.token_urlsafe(24)  # this run's servers' key: the user's key file is not touched
    times: dict[int, list[float]] = {n: [] for n in args.classes}
    with tempfile.TemporaryDirectory(prefix="dmf-serve-enrol-") as temp, ExitStack() as stack:
        work = Path(temp)
        repos = {n: repository(work, n) for n in args.classes}
        remotes = {}
        for n, repo in repos.items():
            served = stack.enter_context(serving(repo, work / f"serve-{n}.log", key=key))
            remotes[n] = stack.enter_context(RemoteRecognizer(served.url, key=key, timeout=60))
            assert len(remotes[n].classes) == n
        for remote in remotes.values():  # warm-up: the first request pays for session set-up
            remote.classify(pen_frame(0, 1))
        frames = [pen_frame(FIRST_NEW + i) for i in range(args.enrols)]
        began = time.perf_counter()
        for start in range(0, args.enrols, args.round):
            for n, remote in remotes.items():
                for i in range(start, min(start + args.round, args.enrols)):
                    t0 = time.perf_counter()
                    remote.enroll(f"new {i}", [frames[i]])
                    times[n].append(time.perf_counter() - t0)
        wall = time.perf_counter() - began
        stack.close()  # servers stopped: each gallery file is closed, one file again
        for n, repo in repos.items():
            with Recognizer.open(DEMO_BUNDLE, gallery=repo / MODEL_NAME / GALLERY_FILE) as rec:
                assert len(rec.classes) == n + args.enrols, (n, len(rec.classes))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {wall:.1f} s of enrolments")
    print(f"{'classes':>8} {'enrols':>7} {'enrols/s':>9} {'p50 ms':>7} {'p90 ms':>7} {'max ms':>7}")
    rates = {}
    for n, samples in times.items():
        ms = np.array(samples) * 1000
        rates[n] = len(samples) / sum(samples)
        print(
            f"{n:>8} {len(samples):>7} {rates[n]:>9.1f} {statistics.median(ms):>7.1f} "
            f"{np.percentile(ms, 90):>7.1f} {ms.max():>7.1f}"
        )
    smallest = min(rates)
    for n in sorted(rates)[1:]:
        print(f"rate at {smallest} / rate at {n}: {rates[smallest] / rates[n]:.2f}x (target at 1000: 1.5x)")


if __name__ == "__main__":
    main()
