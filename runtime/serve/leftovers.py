"""What a `dmf-serve` killed with kill -9 leaves behind, and its removal at the next start.

Each `dmf-serve` names what it makes after its own process id: the Python backend's shared-memory
regions (``/dev/shm/dmf-serve-shm-PID_UUID``, through the backend's `shm-region-prefix-name`) and the
backend folder (``$TMPDIR/dmf-serve-backends-PID-*``). Such a leftover is removed only when it is
provably the project's own and nobody uses it: its name has exactly that form, it belongs to this
user, the PID is not a running process, and no running process names it on its command line (the
`tritonserver` that a killed `dmf-serve` started names both, and may outlive it). Nothing else is
touched: other Triton servers' regions, and never a SQLite ``-wal`` or ``-shm`` file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

SHM_FOLDER = Path("/dev/shm")
SHM_PREFIX = "dmf-serve-shm-"
BACKENDS_PREFIX = "dmf-serve-backends-"
_SHM_NAME = re.compile(re.escape(SHM_PREFIX) + r"(\d+)_[0-9a-f-]+\Z")
_BACKENDS_NAME = re.compile(re.escape(BACKENDS_PREFIX) + r"(\d+)-[A-Za-z0-9_]+\Z")


def shm_prefix(pid: int | None = None) -> str:
    """The Python backend's region prefix for the `dmf-serve` of `pid` (this process by default)."""
    return f"{SHM_PREFIX}{os.getpid() if pid is None else pid}_"  # the backend appends a UUID


def backends_prefix(pid: int | None = None) -> str:
    return f"{BACKENDS_PREFIX}{os.getpid() if pid is None else pid}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _command_lines() -> list[bytes]:
    lines = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # it ended meanwhile
                lines.append(Path(entry.path, "cmdline").read_bytes())
    return lines


def stale_leftovers(shm_folder: Path = SHM_FOLDER, tmp_folder: Path | None = None) -> list[Path]:
    """Regions and backend folders of `dmf-serve` processes that are gone, which nobody uses."""
    tmp_folder = Path(tempfile.gettempdir()) if tmp_folder is None else tmp_folder
    candidates: list[tuple[Path, int]] = []
    for folder, pattern, want_dir in ((shm_folder, _SHM_NAME, False), (tmp_folder, _BACKENDS_NAME, True)):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            match = pattern.match(entry.name)
            if not match:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                kind_ok = (
                    entry.is_dir(follow_symlinks=False) if want_dir else entry.is_file(follow_symlinks=False)
                )
            except OSError:
                continue
            if kind_ok and info.st_uid == os.getuid():
                candidates.append((Path(entry.path), int(match.group(1))))
    candidates = [(path, pid) for path, pid in candidates if not _running(pid)]
    if not candidates:
        return []
    in_use = b"\0".join(_command_lines())
    return [
        path
        for path, pid in candidates
        if shm_prefix(pid).encode() not in in_use and backends_prefix(pid).encode() not in in_use
    ]


def remove_leftovers(shm_folder: Path = SHM_FOLDER, tmp_folder: Path | None = None) -> list[Path]:
    """Remove what `stale_leftovers` finds; returns what was removed."""
    removed = []
    for path in stale_leftovers(shm_folder, tmp_folder):
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue  # another start removed it first
        removed.append(path)
    return removed
