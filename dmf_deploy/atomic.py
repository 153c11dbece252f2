"""Atomic file writes: a temporary file beside the target, fsync, then os.replace.

A crash (even kill -9) at any moment leaves either the old file or the new one, never a mix. Only a
regular file (or a missing one) is ever replaced; a symbolic link is written through, to its target,
and an existing file keeps its permission bits.
Folders are swapped with `exchange_folders` (one atomic renameat2 where Linux allows it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class NotARegularFile(OSError):
    """The path exists but is a folder, device, FIFO or socket: never replaced by a file."""


def write_target(path: str | os.PathLike[str]) -> tuple[Path, int | None]:
    """The file a write to `path` replaces (a symlink's final target) and its permission bits (None: new).

    Raises NotARegularFile when that file exists and is not a regular file.
    """
    target = Path(path)
    if target.is_symlink():
        target = Path(os.path.realpath(target))  # replacing the link itself would leave its target stale
    try:
        info = os.stat(target)
    except FileNotFoundError:
        return target, None
    if not stat.S_ISREG(info.st_mode):
        raise NotARegularFile(
            f"{path} exists and is not a regular file (a folder, device or FIFO); refusing to replace it"
        )
    return target, stat.S_IMODE(info.st_mode)


class NotWritable(OSError):
    """A file cannot be written where asked: a read-only filesystem, /proc, a path under a file, ..."""


def check_writable(path: str | os.PathLike[str], *, folder: bool = False) -> None:
    """Raise NotWritable (or NotARegularFile) unless an atomic write to `path` could succeed now.

    Tries what the write does: a temporary file in the nearest existing folder on the way to `path`
    (the write makes the missing ones), removed at once. With `folder`, `path` is a folder that files
    will be written into. Meant for the start of a command, so that a path that cannot be written fails
    before the work whose result it would hold.
    """
    if folder:
        target = Path(path) / "file"
    else:
        try:
            target, _ = write_target(path)
        except NotADirectoryError:  # a path under a file: said below
            target = Path(path)
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotWritable(f"{path} cannot be written: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dmf-write-check-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise NotWritable(f"{path} cannot be written: {exc.strerror or exc} ({folder})") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a binary file for writing that appears at `path` only if the block succeeds."""
    target, mode = write_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes 0600: a new file follows the umask, a replaced one keeps its mode (a 0600 stays 0600).
        os.chmod(fd, 0o666 & ~current_umask() if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_write_with(path: str | os.PathLike[str], writer: Callable[[BinaryIO], None]) -> None:
    """Let `writer` fill a file object (np.savez, torch.save, ...) and publish it atomically."""
    with atomic_open(path) as handle:
        writer(handle)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def exchange_folders(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    False, with nothing changed, where the OS or filesystem cannot do it; the caller then falls back to
    two renames.
    """
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        _fsync_dir(Path(a).parent)
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # an old kernel or a filesystem without exchange
    raise OSError(code, os.strerror(code), os.fspath(a), None, os.fspath(b))


def remove_stale(folder: Path, pattern: re.Pattern[str], max_age_s: float, folders: bool = False) -> None:
    """Delete entries of `folder` whose name matches `pattern`, untouched for `max_age_s` seconds.

    Leftovers of writes that were killed (temp files, or with `folders` temp folders); never follows links.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return  # the folder does not exist yet
    cutoff = time.time() - max_age_s
    for entry in entries:
        try:
            if not pattern.match(entry.name) or entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
            if folders and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            elif not folders and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        except OSError:
            pass  # another process removed it first, or it is not ours to remove
