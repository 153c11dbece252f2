"""Atomic file writes: a temporary file beside the target, fsync, then os.replace.

A crash (even kill -9) at any moment leaves either the old file or the new one, never a mix. Only a
regular file (or a missing one) is ever replaced; a symbolic link is written through, to its target,
and an existing file keeps its permission bits.
Folders are swapped with `exchange_folders` (one atomic renameat2 where Linux allows it).

A temporary file is locked (flock) by the process writing it, so that `remove_orphans` can tell the
leftovers of a killed writer (no lock) from a write in progress (locked), whatever their age.
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

try:
    import fcntl
except ImportError:  # not POSIX: temp files are not locked, and remove_orphans removes none
    fcntl = None  # type: ignore[assignment]


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


def _lock(fd: int) -> None:
    """Mark a temp file as owned by this live process (released by the kernel when it dies)."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _temp_beside(target: Path, new_mode: int) -> tuple[int, Path]:
    """A locked temp file `.<name>.XXXXXXXX.tmp` of mode `new_mode` in the target's folder."""
    _make_folder(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    _lock(fd)
    os.chmod(fd, new_mode)
    return fd, Path(tmp_name)


def _make_folder(folder: Path, mode: int = 0o777) -> None:
    """mkdir -p; folders made here get `mode` less the umask (existing ones are left as they are)."""
    if folder.is_dir():
        return
    _make_folder(folder.parent, mode)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, mode)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], new_mode: int = 0o666) -> Iterator[BinaryIO]:
    """Open a binary file for writing that appears at `path` only if the block succeeds.

    A new file gets `new_mode` less the umask; a replaced one keeps its mode (a 0600 stays 0600).
    """
    target, mode = write_target(path)
    fd, tmp = _temp_beside(target, new_mode & ~current_umask() if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], new_mode: int = 0o666, folder_mode: int = 0o777
) -> Iterator[Path]:
    """A temp path beside `path` for a writer that needs a file name (SQLite); published atomically.

    The block writes and closes the file at the yielded path; on success it is fsynced and renamed over
    `path`. A new file gets `new_mode` less the umask, folders made for it `folder_mode` less the umask;
    a replaced file keeps its mode.
    """
    target, mode = write_target(path)
    _make_folder(target.parent, folder_mode)
    fd, tmp = _temp_beside(target, new_mode & ~current_umask() if mode is None else mode)
    try:
        yield tmp
        os.fsync(fd)  # the lock's descriptor is the file's own: it flushes what the writer wrote
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
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


ORPHAN_MIN_AGE_S = 10.0  # covers the instant between a temp file's creation and its writer's lock


def remove_orphans(
    folder: Path, pattern: re.Pattern[str], is_ours: Callable[[Path], bool] | None = None
) -> list[Path]:
    """Delete the temp files in `folder` that killed writers left: the name matches `pattern`, no live
    process holds the file's lock (every writer here locks its temp file), `is_ours` (if given)
    recognises its content, and it is older than a few seconds. Never follows links; returns what went.
    """
    if fcntl is None:
        return []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []  # the folder does not exist yet
    removed = []
    cutoff = time.time() - ORPHAN_MIN_AGE_S
    for entry in entries:
        try:
            if not pattern.match(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live writer has it
                if is_ours is not None and not is_ours(Path(entry.path)):
                    continue
                os.unlink(entry.path)  # still locked by us: no writer can take it up meanwhile
                removed.append(Path(entry.path))
            finally:
                os.close(fd)
        except OSError:
            pass  # locked by a live writer, removed by another process first, or not ours to remove
    return removed
