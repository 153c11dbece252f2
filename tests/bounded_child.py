"""A child process that calls one file reader under a memory limit and times each call.

Run as a script (`BoundedChild` below starts it) with the reader as "module:attribute.path": it imports
the reader, then caps its address space at what the imports took plus `memory_mb`, so a reader that
allocates what a lying file claims fails here with MemoryError instead of paging the machine to death.
It reads one path per stdin line, calls the reader on it, and answers one JSON line: {"outcome": "ok" or
the exception's type name, "message": ..., "cpu_s": CPU seconds the call took}.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

ANSWER_TIMEOUT_S = 20.0  # generous: catches a reader that blocks (a hang uses no CPU time)


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _serve(target: str, memory_mb: int) -> None:
    import resource
    import traceback

    module, _, attributes = target.partition(":")
    reader = importlib.import_module(module)
    for name in attributes.split("."):
        reader = getattr(reader, name)
    limit = _vm_size_bytes() + (memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        start = time.process_time()
        try:
            reader(line.rstrip("\n"))
            outcome, message = "ok", ""
        except Exception as exc:  # reported, not raised: the parent decides which are named errors
            outcome = type(exc).__name__
            message = str(exc)[:500] if isinstance(exc, ValueError) else traceback.format_exc()[-2000:]
        answer = {"outcome": outcome, "message": message, "cpu_s": time.process_time() - start}
        print(json.dumps(answer), flush=True)


class BoundedChild:
    """The parent's side: `call(path)` -> the child's answer for that file."""

    def __init__(self, target: str, memory_mb: int = 256) -> None:
        # One BLAS thread: each extra thread reserves address space that would eat into the limit.
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, target, str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._answer().get("ready"), "the bounded child did not start"

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], ANSWER_TIMEOUT_S)
        if not ready:
            raise AssertionError(f"the child gave no answer within {ANSWER_TIMEOUT_S} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the child died (exit status {self.proc.wait()})")
        return json.loads(line)

    def call(self, path: Path) -> dict:
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
    _serve(sys.argv[1], int(sys.argv[2]))
