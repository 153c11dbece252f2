"""A child process that opens gallery files (or bundle manifests) under a memory limit and times each.

Run as a script (`BoundedReader` below starts it): it imports only numpy and the gallery module (or the
manifest module, `kind="manifest"`), then caps its address space at what those imports took plus
`--memory-mb`, so a reader that allocates what a lying file claims fails here with MemoryError instead
of paging the test machine to death. It reads one path per stdin line (a gallery file, or a bundle
folder) and answers one JSON line: {"outcome": "ok" | "GalleryError" | "BundleError" | other exception
type, "message": ..., "cpu_s": CPU seconds the load took}.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

FINGERPRINT = "a1b2c3d4e5f6" + "0" * 52  # the model every test gallery belongs to
ANSWER_TIMEOUT_S = 20.0  # generous: catches a reader that blocks (a hang uses no CPU time)


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _reader(kind: str):
    """(read(path), the named error it may raise) for a gallery file or a bundle's manifest."""
    if kind == "manifest":
        from dmf_deploy.manifest import BundleError, Manifest

        return Manifest.read, BundleError  # the path is the bundle folder holding manifest.json
    from dmf_deploy.runtime.gallery import Gallery, GalleryError

    def read_everything(path: str) -> None:
        """Open, then read every sum and thumbnail (a version 3 file reads them only when asked)."""
        with Gallery.load(path, FINGERPRINT) as gallery:
            problems = gallery.check()
            if problems:
                raise GalleryError("; ".join(problems)[:500])

    return read_everything, GalleryError


def _serve(memory_mb: int, kind: str) -> None:
    import resource
    import traceback

    read, named = _reader(kind)
    limit = _vm_size_bytes() + (memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        start = time.process_time()
        try:
            read(line.rstrip("\n"))
            outcome, message = "ok", ""
        except named as exc:
            outcome, message = named.__name__, str(exc)[:500]
        except BaseException as exc:  # reported, not raised: the parent fails the test with it
            outcome, message = type(exc).__name__, traceback.format_exc()[-2000:]
        answer = {"outcome": outcome, "message": message, "cpu_s": time.process_time() - start}
        print(json.dumps(answer), flush=True)


class BoundedReader:
    """The parent's side: `load(path)` -> the child's answer for that file."""

    def __init__(self, memory_mb: int = 256, kind: str = "gallery") -> None:
        # One BLAS thread: each extra thread reserves address space that would eat into the limit.
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(memory_mb), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._answer().get("ready"), "the bounded reader did not start"

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], ANSWER_TIMEOUT_S)
        if not ready:
            raise AssertionError(f"the reader gave no answer within {ANSWER_TIMEOUT_S} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the reader died (exit status {self.proc.wait()})")
        return json.loads(line)

    def load(self, path: Path) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # still busy with a file it never finished
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
