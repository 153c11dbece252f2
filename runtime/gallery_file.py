"""The gallery file, version 3: one SQLite database, written in transactions (torch-free).

Tables (docs/gallery-format.md describes them for users of the `sqlite3` shell):

- ``meta(key, value)``: JSON values of format, format_version, fingerprint, model_description,
  feature_shape, feature_dtype, and the bank_shapes and bank_dtypes of the bundle that last saved it;
- ``classes(id, name, shots, revision, created, updated)``: one row per class; ``id`` orders the classes
  (enrolment order), ``revision`` is a random token that changes with every change of the class's sum;
- ``sums(class_id, crc32, data)``: the sum of the class's shots' feature maps, float32 little-endian,
  and its CRC-32 (SQLite keeps no checksums: a flipped bit on disk is found when the sum is read);
- ``thumbnails(class_id, seq, crc32, jpeg)``: JPEG thumbnails of the class's first and latest
  enrolments, each with its CRC-32.

The file is opened in WAL mode: a save is one transaction that writes only what changed and is durable
when it returns (synchronous=FULL), and closing checkpoints the WAL so that a closed gallery is one file.

A gallery is a file from outside, so opening follows SQLite's advice for untrusted databases ("Defense
Against the Dark Arts"): the header (magic, application id, version) is read before SQLite sees the
file; the connection has trusted_schema off, cell_size_check on, no memory map, no extensions and tight
limits; the schema must be exactly ours (no trigger, view or index of anyone else's is ever run); every
count, type and blob size is checked in SQL before a value is read, and every value read is checked
again (names, shot counts, sums, thumbnails). Checks at open are bounded by the class count, not by the
bank: `quick_check` (whose cost grows with the file) runs only in `check()`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import threading
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from dmf_deploy.atomic import atomic_path
from dmf_deploy.runtime.gallery_checks import (
    FORMAT,
    MAX_CLASSES,
    MAX_HEADER_BYTES,
    MAX_ROW_ELEMENTS,
    MAX_THUMBNAIL_BYTES,
    SUM_DTYPE,
    THUMBNAILS_KEPT,
    GalleryError,
    another_model,
    check_bank_dtypes,
    check_class_entry,
    check_feature_sum,
    check_shape,
    checked_thumbnail,
)

FORMAT_VERSION = 3
APPLICATION_ID = 0x444D4647  # "DMFG" in the SQLite header's application_id field
SQLITE_MAGIC = b"SQLite format 3\x00"
_SUM_LE = SUM_DTYPE.newbyteorder("<")
SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
    "CREATE TABLE classes (id INTEGER PRIMARY KEY, name TEXT NOT NULL, shots INTEGER NOT NULL, "
    "revision INTEGER NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL)",
    "CREATE TABLE sums (class_id INTEGER PRIMARY KEY, crc32 INTEGER NOT NULL, data BLOB NOT NULL)",
    "CREATE TABLE thumbnails (class_id INTEGER NOT NULL, seq INTEGER NOT NULL, crc32 INTEGER NOT NULL, "
    "jpeg BLOB NOT NULL, PRIMARY KEY (class_id, seq))",
)
META_KEYS = (
    "format",
    "format_version",
    "fingerprint",
    "model_description",
    "feature_shape",
    "feature_dtype",
    "bank_shapes",
    "bank_dtypes",
)
# Limits on what any statement may touch (sqlite3.Connection.setlimit): the largest value is one
# class's feature sum (MAX_ROW_ELEMENTS float32); our own statements need no more than these.
_LIMITS = {
    sqlite3.SQLITE_LIMIT_LENGTH: MAX_ROW_ELEMENTS * SUM_DTYPE.itemsize + 1024,
    sqlite3.SQLITE_LIMIT_SQL_LENGTH: 10_000,
    sqlite3.SQLITE_LIMIT_COLUMN: 32,
    sqlite3.SQLITE_LIMIT_EXPR_DEPTH: 32,
    sqlite3.SQLITE_LIMIT_COMPOUND_SELECT: 4,
    sqlite3.SQLITE_LIMIT_VDBE_OP: 50_000,
    sqlite3.SQLITE_LIMIT_FUNCTION_ARG: 8,
    sqlite3.SQLITE_LIMIT_ATTACHED: 0,
    sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH: 64,
    sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER: 16,
    sqlite3.SQLITE_LIMIT_TRIGGER_DEPTH: 1,
}
_SQLITE_ERRORS = (sqlite3.Error, OverflowError, UnicodeDecodeError)


@dataclass(frozen=True)
class ClassRecord:
    """One row of the classes table."""

    id: int
    name: str
    shots: int
    revision: int
    created: str
    updated: str


@dataclass
class Changes:
    """What one save writes: class rows to insert or replace, their new sums and thumbnails, removals."""

    meta: dict[str, Any] = field(default_factory=dict)
    records: list[ClassRecord] = field(default_factory=list)
    sums: dict[int, np.ndarray] = field(default_factory=dict)
    thumbnails: dict[int, list[bytes]] = field(default_factory=dict)
    removed: list[int] = field(default_factory=list)


def is_gallery_database(head: bytes) -> bool:
    """Whether the first 100 bytes of a file are an SQLite header with our application id."""
    return (
        head[:16] == SQLITE_MAGIC
        and len(head) >= 100
        and int.from_bytes(head[68:72], "big") == APPLICATION_ID
    )


def _expected_schema() -> list[tuple[str, str, str, str | None]]:
    """sqlite_schema of a fresh gallery, as SQLite itself records it (autoindexes included)."""
    db = sqlite3.connect(":memory:")
    try:
        for statement in SCHEMA:
            db.execute(statement)
        return db.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY name").fetchall()
    finally:
        db.close()


EXPECTED_SCHEMA = _expected_schema()


def _connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    """A hardened connection: limits first, then trusted_schema off, cell_size_check on, no mmap."""
    uri = f"file:{quote(os.fspath(path))}?mode={'ro' if read_only else 'rw'}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10.0)
    try:
        for limit, value in _LIMITS.items():
            conn.setlimit(limit, value)
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.execute("PRAGMA cell_size_check = ON")
        conn.execute("PRAGMA mmap_size = 0")
        conn.execute("PRAGMA foreign_keys = OFF")
    except BaseException:
        conn.close()
        raise
    return conn


class GalleryFile:
    """An open version-3 gallery file. Thread-safe: one lock around its connection."""

    def __init__(self, path: Path, conn: sqlite3.Connection, meta: dict[str, Any]) -> None:
        self.path, self._conn, self.meta = path, conn, meta
        self._lock = threading.Lock()

    # ----- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, fingerprint: str, description: str) -> GalleryFile:
        """Open and check a file that starts with our SQLite header; GalleryError on anything else."""
        try:
            conn = _connect(path)
        except _SQLITE_ERRORS as exc:
            raise GalleryError(f"cannot open the gallery {path}: {exc}") from exc
        try:
            _check_schema(path, conn)
            meta = _read_meta(path, conn, fingerprint, description)
            _check_rows(path, conn, meta["feature_shape"])
            # Only now, with the schema known to be ours, may SQLite write: WAL and durable commits.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise GalleryError(f"the gallery {path} cannot use a write-ahead log (journal mode {mode})")
            conn.execute("PRAGMA synchronous = FULL")
        except GalleryError:
            conn.close()
            raise
        except _SQLITE_ERRORS as exc:
            conn.close()
            raise GalleryError(f"{path} is corrupt or not a {FORMAT} file: {exc}") from exc
        return cls(path, conn, meta)

    # ----- reading ------------------------------------------------------------------------------------
    def records(self) -> list[ClassRecord]:
        """Every class in id order, each value checked (the counts were bounded at open)."""
        rows = self._query("SELECT id, name, shots, revision, created, updated FROM classes ORDER BY id")
        records, seen = [], set()
        for class_id, name, shots, revision, created, updated in rows:
            name = check_class_entry(self.path, name, shots, created, updated)
            if name in seen:
                raise GalleryError(f"{self.path} has two classes named {name!r}")
            seen.add(name)
            if not isinstance(revision, int) or revision == 0:
                raise GalleryError(
                    f"{self.path}: class {name!r} has an invalid revision {str(revision)[:40]!r}"
                )
            records.append(ClassRecord(class_id, name, shots, revision, created, updated))
        return records

    def read_sum(self, record: ClassRecord) -> np.ndarray:
        """The class's feature sum, float32 [*feature_shape], checked (size, finite, magnitude)."""
        rows = self._query("SELECT crc32, data FROM sums WHERE class_id = ?", (record.id,))
        shape = self.meta["feature_shape"]
        size = math.prod(shape) * SUM_DTYPE.itemsize
        if len(rows) != 1 or not isinstance(rows[0][1], bytes) or len(rows[0][1]) != size:
            raise GalleryError(
                f"{self.path}: the feature sum of {record.name!r} is missing or of another size"
            )
        crc, data = rows[0]
        if crc != zlib.crc32(data):
            raise GalleryError(f"{self.path} is corrupt: the feature sum of {record.name!r} fails its CRC")
        total = np.frombuffer(data, _SUM_LE).astype(SUM_DTYPE).reshape(shape)
        return check_feature_sum(self.path, record.name, total, record.shots)

    def read_thumbnails(self, record: ClassRecord) -> list[bytes]:
        rows = self._query("SELECT crc32, jpeg FROM thumbnails WHERE class_id = ? ORDER BY seq", (record.id,))
        if any(crc != zlib.crc32(jpeg) for crc, jpeg in rows):
            raise GalleryError(f"{self.path} is corrupt: a thumbnail of {record.name!r} fails its CRC")
        found = [checked_thumbnail(self.path, record.name, bytes(jpeg)) for _, jpeg in rows]
        return [t for t in found if t is not None]

    def check(self) -> list[str]:
        """SQLite's quick_check (its cost grows with the file): [] when the file is sound."""
        rows = self._query("PRAGMA quick_check")
        problems = [str(r[0]) for r in rows]
        return [] if problems == ["ok"] else [f"{self.path}: SQLite quick_check: {p}" for p in problems]

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            if self._conn is None:
                raise GalleryError(f"the gallery {self.path} is closed")
            try:
                return self._conn.execute(sql, args).fetchall()
            except _SQLITE_ERRORS as exc:
                raise GalleryError(f"{self.path} is corrupt or unreadable: {exc}") from exc

    # ----- writing ------------------------------------------------------------------------------------
    def commit(self, changes: Changes) -> None:
        """Write `changes` in one transaction, durable when this returns."""
        with self._lock:
            if self._conn is None:
                raise GalleryError(f"the gallery {self.path} is closed")
            try:
                _apply(self._conn, changes, begin="BEGIN IMMEDIATE")
            except _SQLITE_ERRORS as exc:
                raise OSError(f"cannot save the gallery {self.path}: {_describe(exc)}") from exc

    def snapshot(self, target: Path, changes: Changes) -> Path:
        """A consistent copy at `target` (this file's committed state plus `changes`), published
        atomically; this file is unchanged."""
        with self._lock:
            return write_new(target, changes, source=self._conn)

    def close(self) -> None:
        """Checkpoint the WAL into the file and close: a closed gallery is one file."""
        with self._lock:
            if self._conn is None:
                return
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None  # type: ignore[assignment]


def write_new(target: Path, changes: Changes, source: sqlite3.Connection | None = None) -> Path:
    """A new gallery file at `target`: `source`'s committed content (SQLite's backup API) or empty,
    plus `changes`; written to a temp file beside it and renamed over it. New files are 0600 and new
    folders 0700 (less the umask): a gallery holds pictures of camera frames."""
    _settle(target)
    try:
        with atomic_path(target, new_mode=0o600, folder_mode=0o700) as tmp:
            conn = sqlite3.connect(os.fspath(tmp), isolation_level=None)
            try:
                if source is not None:
                    source.backup(conn)
                else:
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
                    for statement in SCHEMA:
                        conn.execute(statement)
                conn.execute("PRAGMA synchronous = OFF")  # atomic_path fsyncs the finished file
                _apply(conn, changes, begin="BEGIN")
                conn.execute("PRAGMA journal_mode = WAL")  # recorded in the header; closing removes the log
            finally:
                conn.close()
    except _SQLITE_ERRORS as exc:
        raise OSError(f"cannot save the gallery {target}: {_describe(exc)}") from exc
    return target


def _describe(exc: BaseException) -> str:
    """SQLite's message and its extended code (SQLITE_FULL, SQLITE_IOERR_WRITE: which write failed)."""
    code = getattr(exc, "sqlite_errorname", None)
    return f"{exc} ({code})" if code else str(exc)


def _settle(target: Path) -> None:
    """Before a gallery file is replaced: its write-ahead log checkpointed into it and gone. A log left
    beside the new file would be replayed into it at its next open; a log that another live process
    still holds means the file is in use, and it is not replaced."""
    wal = Path(f"{os.path.realpath(target)}-wal")
    if not wal.exists():
        return
    with contextlib.suppress(sqlite3.Error, OSError):
        conn = _connect(Path(os.path.realpath(target)))
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    if wal.exists() and wal.stat().st_size > 0:
        raise GalleryError(f"cannot replace the gallery {target}: another process has it open")


def _apply(conn: sqlite3.Connection, changes: Changes, begin: str) -> None:
    conn.execute(begin)
    try:
        conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [(k, json.dumps(v, ensure_ascii=False)) for k, v in changes.meta.items()],
        )
        for table, column in (("classes", "id"), ("sums", "class_id"), ("thumbnails", "class_id")):
            conn.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(i,) for i in changes.removed])
        conn.executemany(
            "INSERT OR REPLACE INTO classes (id, name, shots, revision, created, updated) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(r.id, r.name, r.shots, r.revision, r.created, r.updated) for r in changes.records],
        )
        blobs = [(i, np.ascontiguousarray(s, _SUM_LE).tobytes()) for i, s in changes.sums.items()]
        conn.executemany(
            "INSERT OR REPLACE INTO sums (class_id, crc32, data) VALUES (?, ?, ?)",
            [(i, zlib.crc32(blob), blob) for i, blob in blobs],
        )
        for class_id, jpegs in changes.thumbnails.items():
            conn.execute("DELETE FROM thumbnails WHERE class_id = ?", (class_id,))
            conn.executemany(
                "INSERT INTO thumbnails (class_id, seq, crc32, jpeg) VALUES (?, ?, ?, ?)",
                [(class_id, seq, zlib.crc32(jpeg), jpeg) for seq, jpeg in enumerate(jpegs)],
            )
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


# ----- the checks at open, each bounded by the class count -----------------------------------------------
def _check_schema(path: Path, conn: sqlite3.Connection) -> None:
    """Exactly our tables and their automatic indexes: nothing of anyone else's can run."""
    head = (
        conn.execute("PRAGMA application_id").fetchone()[0],
        conn.execute("PRAGMA user_version").fetchone()[0],
    )
    if head[0] != APPLICATION_ID:
        raise GalleryError(f"{path} is not a {FORMAT} file (an SQLite database of another application)")
    if head[1] != FORMAT_VERSION:
        raise GalleryError(f"{path} has {FORMAT} version {head[1]}; this runtime reads versions 1, 2 and 3")
    schema = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY name LIMIT 64"
    ).fetchall()
    if schema != EXPECTED_SCHEMA:
        extra = sorted({(t, n) for t, n, _, _ in schema} - {(t, n) for t, n, _, _ in EXPECTED_SCHEMA})
        raise GalleryError(
            f"{path} has another schema than a {FORMAT} file"
            + (f" (it adds {', '.join(f'{t} {n!r}' for t, n in extra[:5])})" if extra else "")
        )


def _read_meta(path: Path, conn: sqlite3.Connection, fingerprint: str, description: str) -> dict[str, Any]:
    rows = conn.execute(
        "SELECT key, value FROM meta WHERE typeof(value) = 'text' AND length(value) <= ? LIMIT 64",
        (MAX_HEADER_BYTES,),
    ).fetchall()
    raw = dict(rows)
    missing = [k for k in META_KEYS if k not in raw]
    if missing:
        raise GalleryError(f"{path} lacks the gallery fields {missing}")
    try:
        meta = {k: json.loads(raw[k]) for k in META_KEYS}
    except (ValueError, RecursionError) as exc:
        raise GalleryError(f"{path} has a malformed gallery field: {exc}") from exc
    if meta["format"] != FORMAT or meta["format_version"] != FORMAT_VERSION:
        raise GalleryError(f"{path} is not a {FORMAT} file of version {FORMAT_VERSION}")
    theirs = str(meta["fingerprint"])
    if theirs != fingerprint:
        raise another_model(path, theirs, str(meta["model_description"] or ""), fingerprint, description)
    if meta["feature_dtype"] != SUM_DTYPE.name:
        raise GalleryError(f"{path} stores feature sums as {str(meta['feature_dtype'])[:40]!r}")
    meta["feature_shape"] = check_shape(meta["feature_shape"], "feature_shape")
    if not isinstance(meta["bank_shapes"], dict):
        raise GalleryError(f"{path} has no valid bank_shapes")
    meta["bank_shapes"] = {k: check_shape(s, f"bank shape of {k!r}") for k, s in meta["bank_shapes"].items()}
    meta["bank_dtypes"] = check_bank_dtypes(meta["bank_dtypes"], meta["bank_shapes"])
    meta["model_description"] = str(meta["model_description"])
    return meta


def _check_rows(path: Path, conn: sqlite3.Connection, feature_shape: tuple[int, ...]) -> None:
    """Counts, types and sizes, from SQLite's record headers: no sum or thumbnail is read here."""

    def count(sql: str, *args: Any) -> int:
        return int(conn.execute(sql, args).fetchone()[0])

    n = count("SELECT count(*) FROM classes")
    if n > MAX_CLASSES:
        raise GalleryError(f"{path} holds {n} classes; at most {MAX_CLASSES} are allowed")
    sum_bytes = math.prod(feature_shape) * SUM_DTYPE.itemsize
    problems = {
        "a class without a feature sum": count(
            "SELECT count(*) FROM classes WHERE id NOT IN (SELECT class_id FROM sums)"
        ),
        "a feature sum without a class": count(
            "SELECT count(*) FROM sums WHERE class_id NOT IN (SELECT id FROM classes)"
        ),
        f"a feature sum that is not {sum_bytes} bytes": count(
            "SELECT count(*) FROM sums WHERE typeof(data) != 'blob' OR length(data) != ? "
            "OR typeof(crc32) != 'integer'",
            sum_bytes,
        ),
        "a class row of the wrong types": count(
            "SELECT count(*) FROM classes WHERE typeof(name) != 'text' OR typeof(shots) != 'integer' "
            "OR typeof(revision) != 'integer' OR typeof(created) != 'text' OR typeof(updated) != 'text'"
        ),
        "a thumbnail that is not a small JPEG blob, or of no class": count(
            "SELECT count(*) FROM thumbnails WHERE typeof(jpeg) != 'blob' OR length(jpeg) > ? "
            "OR typeof(crc32) != 'integer' OR class_id NOT IN (SELECT id FROM classes)",
            MAX_THUMBNAIL_BYTES,
        ),
        f"a class with more than {THUMBNAILS_KEPT} thumbnails": count(
            "SELECT count(*) FROM (SELECT class_id FROM thumbnails GROUP BY class_id HAVING count(*) > ?)",
            THUMBNAILS_KEPT,
        ),
    }
    found = [what for what, number in problems.items() if number]
    if found:
        raise GalleryError(f"{path} is inconsistent: it has {'; '.join(found)}")


def iter_meta(
    fingerprint: str,
    model_description: str,
    feature_shape: tuple[int, ...],
    bank_shapes: Mapping[str, tuple[int, ...]],
    bank_dtypes: Mapping[str, np.dtype],
) -> Iterator[tuple[str, Any]]:
    """The meta table's content for a gallery of this model and bank layout."""
    yield "format", FORMAT
    yield "format_version", FORMAT_VERSION
    yield "fingerprint", fingerprint
    yield "model_description", model_description
    yield "feature_shape", list(feature_shape)
    yield "feature_dtype", SUM_DTYPE.name
    yield "bank_shapes", {k: list(s) for k, s in bank_shapes.items()}
    yield "bank_dtypes", {k: np.dtype(d).name for k, d in bank_dtypes.items()}
