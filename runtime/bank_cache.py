"""Class banks by slot, in memory or in a cache folder beside the gallery (torch-free).

A class bank (support offsets, tap projections, class weight) is derived data: support.onnx computes it
from a class's prototype. The gallery file stores the feature sums; the banks live here, each in a
slot tagged with the revision token of the feature sum it was computed from. A row whose revision
matches no slot's token has a stale bank and is computed again, so a missing, old or foreign cache
costs time, never a wrong score.

`BankSlots` keeps the banks in memory (a gallery without a file, or a cache folder that cannot be
used). `CachedBankSlots` keeps them in raw little-endian files, one per bank tensor, read with pread
so that a shortlist reads only its candidates' rows and the page cache stays out of the process's
resident memory. Its files and the token table grow sparsely by doubling.

Crash safety of the cache (the gallery file is the truth; the cache only has to never lie):
- a slot is written only while no committed revision names it: fresh or free slots only. A class
  whose bank changes gets a new slot; its old slot is retired and freed after the gallery's next
  commit, once its revision is no longer the committed one;
- `sync` makes the written rows durable before it writes their tokens, so a token on disk always
  names data on disk. Tokens not yet synced when a process dies only make those rows stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no cache folder, banks stay in memory
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("dmf_deploy.runtime")

CACHE_FORMAT = "dmf-bank-cache"
CACHE_VERSION = 1
_MIN_SLOTS = 64
_TOKEN = np.dtype("<i8")


def cache_key(fingerprint: str, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype]) -> str:
    """One cache per model and bank layout: another head form or precision gets its own folder."""
    layout = {k: [list(shapes[k]), np.dtype(dtypes[k]).name] for k in sorted(shapes)}
    text = json.dumps([fingerprint, layout], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _runs(slots: np.ndarray) -> Iterable[tuple[int, int, int]]:
    """(first index, first slot, length) of each run of consecutive slots."""
    if len(slots) == 0:
        return
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(slots)]])
    for a, b in zip(starts.tolist(), stops.tolist()):
        yield a, int(slots[a]), b - a


class BankSlots:
    """Class banks in memory, by slot, each tagged with the revision token it was computed from."""

    persistent = False

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype]) -> None:
        self.shapes = {k: tuple(s) for k, s in shapes.items()}
        self.dtypes = {k: np.dtype(dtypes[k]) for k in self.shapes}
        self.tokens = np.zeros(0, np.int64)  # 0: the slot holds no bank
        self._arrays = {k: np.zeros((0, *s), self.dtypes[k]) for k, s in self.shapes.items()}
        self._free: list[int] = []
        self._retired: list[int] = []

    @property
    def capacity(self) -> int:
        return len(self.tokens)

    def bind(self, revisions: np.ndarray) -> np.ndarray:
        """The slot holding each revision's bank (-1: none); every other slot becomes free."""
        where = {int(t): s for s, t in enumerate(self.tokens.tolist()) if t}
        slots = np.array([where.get(int(r), -1) for r in revisions.tolist()], np.int64)
        used = set(slots[slots >= 0].tolist())
        self._free = [s for s in range(self.capacity - 1, -1, -1) if s not in used]
        self._retired = []
        return slots

    def take(self) -> int:
        """A slot that may be written now."""
        if not self._free:
            old = self.capacity
            self._grow(max(_MIN_SLOTS, 2 * old))
            self._free = list(range(self.capacity - 1, old - 1, -1))
        return self._free.pop()

    def retire(self, slot: int) -> None:
        """The slot's bank is no longer a live row's; it is free once no committed revision names it."""
        if slot >= 0:
            self._retired.append(slot)
            if not self.persistent:
                self.committed()

    def committed(self) -> None:
        """The gallery committed: retired slots name no committed revision any more."""
        self._free.extend(self._retired)
        self._retired = []

    def write(self, slot: int, arrays: Mapping[str, np.ndarray], token: int) -> None:
        for key, array in self._arrays.items():
            array[slot] = arrays[key]
        self.tokens[slot] = token

    def read(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """{name: [len(slots), *shape]}: a view when the slots are one consecutive run, else a copy."""
        slots = np.asarray(slots, np.int64)
        if len(slots) and slots[-1] - slots[0] == len(slots) - 1 and np.all(np.diff(slots) == 1):
            start = int(slots[0])
            return {k: a[start : start + len(slots)] for k, a in self._arrays.items()}
        return {k: a[slots] for k, a in self._arrays.items()}

    def read_tensor(self, key: str) -> np.ndarray:
        """One tensor of every slot, [capacity, *shape]."""
        return self._arrays[key]

    def sync(self) -> None:
        """Nothing to make durable in memory."""

    def close(self) -> None:
        """Nothing to release in memory."""

    def _grow(self, capacity: int) -> None:
        def grown(array: np.ndarray) -> np.ndarray:
            bigger = np.zeros((capacity, *array.shape[1:]), array.dtype)
            bigger[: len(array)] = array
            return bigger

        self.tokens = grown(self.tokens)
        self._arrays = {k: grown(a) for k, a in self._arrays.items()}


class CachedBankSlots(BankSlots):
    """Class banks in a cache folder: `<key>/<tensor>.bin` raw rows, `tokens.bin`, `cache.json`.

    The folder is locked (flock on cache.json) while a gallery uses it; `open` returns None when
    another live process holds it or it cannot be used, and the gallery keeps its banks in memory.
    """

    persistent = True

    @classmethod
    def open(
        cls,
        folder: Path,
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, np.dtype],
    ) -> CachedBankSlots | None:
        if fcntl is None:
            return None
        try:
            return cls(folder, shapes, dtypes)
        except (OSError, ValueError) as exc:
            log.info("class-bank cache %s not used (%s); banks kept in memory", folder, exc)
            return None

    def __init__(
        self, folder: Path, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype]
    ) -> None:
        super().__init__(shapes, dtypes)
        self._arrays = {}
        self.folder = folder
        self._fds: dict[str, int] = {}
        _make_private_folders(folder)
        self._lock_fd = os.open(folder / "cache.json", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._row_bytes = {k: math.prod(s) * self.dtypes[k].itemsize for k, s in self.shapes.items()}
            for key in [*self.shapes, "tokens"]:
                self._fds[key] = os.open(folder / f"{key}.bin", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            self._load_or_reset()
        except BaseException:
            self.close()
            raise
        self._dirty_tokens: set[int] = set()
        self._dirty_rows = False

    def _describe(self) -> bytes:
        layout = {k: {"shape": list(s), "dtype": self.dtypes[k].name} for k, s in self.shapes.items()}
        return json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "banks": layout}).encode()

    def _load_or_reset(self) -> None:
        """Use the folder's tokens when its layout and sizes agree; otherwise start it empty."""
        described = os.pread(self._lock_fd, 1 << 16, 0)
        token_bytes = os.fstat(self._fds["tokens"]).st_size
        capacity = token_bytes // _TOKEN.itemsize
        consistent = (
            described == self._describe()
            and token_bytes % _TOKEN.itemsize == 0
            and all(os.fstat(self._fds[k]).st_size == capacity * n for k, n in self._row_bytes.items())
        )
        if consistent:
            self.tokens = np.frombuffer(os.pread(self._fds["tokens"], token_bytes, 0), _TOKEN).astype(
                np.int64
            )
            if len(self.tokens) == capacity:
                return
        for fd in self._fds.values():
            os.ftruncate(fd, 0)
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, self._describe(), 0)
        self.tokens = np.zeros(0, np.int64)

    def _grow(self, capacity: int) -> None:
        for key, n in self._row_bytes.items():
            os.ftruncate(self._fds[key], capacity * n)  # sparse: no disk used until written
        os.ftruncate(self._fds["tokens"], capacity * _TOKEN.itemsize)
        self.tokens = np.concatenate([self.tokens, np.zeros(capacity - len(self.tokens), np.int64)])

    def write(self, slot: int, arrays: Mapping[str, np.ndarray], token: int) -> None:
        for key, n in self._row_bytes.items():
            row = np.ascontiguousarray(arrays[key], self.dtypes[key].newbyteorder("<"))
            os.pwrite(self._fds[key], row.tobytes(), slot * n)
        self.tokens[slot] = token
        self._dirty_tokens.add(slot)
        self._dirty_rows = True

    def read(self, slots: np.ndarray, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        if not self._fds:
            raise ValueError(f"the class-bank cache {self.folder} is closed (its gallery was closed)")
        slots = np.asarray(slots, np.int64)
        out = {}
        for key in self.shapes if keys is None else keys:
            n = self._row_bytes[key]
            array = np.empty((len(slots), *self.shapes[key]), self.dtypes[key].newbyteorder("<"))
            flat = memoryview(array.reshape(-1).view(np.uint8))
            for first, slot, count in _runs(slots):
                view = flat[first * n : (first + count) * n]
                if os.preadv(self._fds[key], [view], slot * n) != count * n:
                    raise OSError(f"the class-bank cache {self.folder} is shorter than its tokens say")
            out[key] = array.astype(self.dtypes[key], copy=False)
        return out

    def read_tensor(self, key: str) -> np.ndarray:
        return self.read(np.arange(self.capacity), [key])[key]

    def sync(self) -> None:
        """Rows first, then the tokens that name them."""
        if self._dirty_rows:
            for key in self._row_bytes:
                os.fdatasync(self._fds[key])
            self._dirty_rows = False
        if self._dirty_tokens:
            for slot in sorted(self._dirty_tokens):
                os.pwrite(
                    self._fds["tokens"], self.tokens[slot : slot + 1].astype(_TOKEN).tobytes(), slot * 8
                )
            os.fdatasync(self._fds["tokens"])
            self._dirty_tokens.clear()

    def __del__(self) -> None:  # a gallery dropped without close() still releases the folder
        self.close()

    def close(self) -> None:
        if not getattr(self, "_fds", None):
            return
        with contextlib.suppress(OSError):
            if self._fds and getattr(self, "_dirty_tokens", None) is not None:
                self.sync()
        for fd in [*self._fds.values(), self._lock_fd]:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the lock's descriptor releases the folder
        self._fds = {}
        self._lock_fd = -1


def _make_private_folders(folder: Path) -> None:
    """The cache folder and its parent, made 0700 (less the umask) when they are new."""
    for part in (folder.parent, folder):
        with contextlib.suppress(FileExistsError):
            os.mkdir(part, 0o700)
        if part.is_symlink() or not part.is_dir():
            raise ValueError(f"{part} is not a folder")
