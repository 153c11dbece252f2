"""Recognizer: enrol classes from a few frames and recognise them, on a bundle, without torch.

rec = Recognizer.open("bundle/", gallery="gallery.dmfg")
rec.enroll("mug", frames)
print(rec.classify(frame))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dmf_deploy.manifest import BACKBONE, CLASS_BANK, EXPLAIN, HEAD, SUPPORT, Manifest, verify_graph
from dmf_deploy.names import validate_class_name
from dmf_deploy.open_set import blank_reason, gate_contrast, load_open_set, own_scores, refusal
from dmf_deploy.packaged import resolve_bundle_path
from dmf_deploy.preprocess import (
    InvalidFrame,
    Roi,
    model_views,
    preprocess_frames,
    refuse_none,
    stack_inputs,
)
from dmf_deploy.runtime.backends import Backend, OnnxRuntimeBackend, open_backend
from dmf_deploy.runtime.explain import Explanation, ExplanationUnavailable, UnknownClassError
from dmf_deploy.runtime.gallery import (
    THUMBNAIL_SIZE,
    ClassInfo,
    Gallery,
    GalleryError,
    GalleryNotFoundError,
    decode_thumbnail,
)
from dmf_deploy.runtime.gallery_checks import check_feature_sum
from dmf_deploy.runtime.rwlock import ReadWriteLock

log = logging.getLogger("dmf_deploy.runtime")

HEAD_CHUNK = 256  # classes per head call at most
# Bytes of per-pair intermediates per head call: the gather sampler holds 9 taps x 4 corners x G*k*k
# floats per (query, class, position), ~1.1 MB per pair for ResNet-12, so a call takes ~115 of its
# classes (~200 MB transient). Smaller chunks cost time: each call redoes the query's offset conv.
HEAD_CHUNK_BYTES = 128 << 20
# shortlist="auto" (the default of `open`): exact scores while at most AUTO_EXACT_MAX classes are
# enrolled; beyond, the exact head on the AUTO_SHORTLIST classes ranked best by <mean q, w>.
# benchmarks/shortlist_agreement.py measures its top-1 agreement with exact.
AUTO_EXACT_MAX = 128
AUTO_SHORTLIST = 32
BANK_BATCH = 64  # prototypes per support-graph call when banks are recomputed at open


@dataclass(frozen=True)
class Prediction:
    label: str | None
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    message: str = ""
    reason: str = ""  # why the label is None: the gate that refused the frame, and its value

    def top(self, k: int) -> list[tuple[str, float]]:
        """The k best (class, score) pairs, best first."""
        return sorted(self.scores.items(), key=lambda kv: kv[1], reverse=True)[:k]


@dataclass(frozen=True)
class RemovedClass:
    """A class as `Recognizer.remove` took it out: enough to `restore` it."""

    name: str
    feature_sum: np.ndarray  # the sum of its shots' features, as the gallery stores it
    count: int
    thumbnail: bytes | None  # JPEG


class Recognizer:
    """Few-shot recogniser over a bundle. Thread-safe: classify calls run together, enrol/remove alone."""

    def __init__(
        self,
        bundle: Path,
        manifest: Manifest,
        backend: Backend,
        gallery: Gallery,
        gallery_path: Path | None,
        shortlist: int | str | None = None,
        threshold: float | None = None,
        smoothing: float = 0.0,
        sensitivity: float | None = None,
        roi: Roi | tuple[float, float, float, float] | None = None,
    ) -> None:
        self.bundle, self.manifest, self.backend, self.gallery = bundle, manifest, backend, gallery
        self._roi = Roi.of(roi)
        self.config = manifest.model
        self.gallery_path = gallery_path
        count = isinstance(shortlist, int) and not isinstance(shortlist, bool) and shortlist >= 0
        if not (shortlist is None or shortlist == "auto" or count):
            raise ValueError(f"shortlist must be a class count, 'auto' or None (exact), got {shortlist!r}")
        self.shortlist = shortlist
        self.open_set = load_open_set(bundle, manifest)
        self.open_set.threshold(sensitivity)  # a ValueError now, not at the first frame
        self.sensitivity = sensitivity
        self.threshold = threshold
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing
        self._lock = ReadWriteLock()
        self._smoothed: tuple[tuple[str, ...], np.ndarray] | None = None
        self._explainer: Backend | None = None  # explain.onnx's session, made at the first `explain`
        self._complete_banks()

    # ----- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        bundle: str | os.PathLike[str],
        backend: str = "auto",
        gallery: str | os.PathLike[str] | Gallery | None = None,
        shortlist: int | str | None = "auto",
        threshold: float | None = None,
        smoothing: float = 0.0,
        threads: int | None = None,
        sensitivity: float | None = None,
        roi: Roi | tuple[float, float, float, float] | None = None,
    ) -> Recognizer:
        """Verify the bundle (sha256 of every graph), create every session, and load or start a gallery.

        `bundle`: a bundle folder, or "demo" for the packaged demo bundle (from any working directory;
        "./demo" names a folder called demo).
        `gallery`: a file to load (a missing file starts an empty gallery that `save()` writes there),
        a Gallery, or None (in-memory; pass a path to `save`).
        `sensitivity`: the fraction of known frames the open-set rule may call unknown, as measured
        when the bundle's rule was fitted (0 to 0.5; None: the bundle's default, 0.05). Higher refuses
        more unknown frames. `threshold`: an absolute score instead (blank frames stay unknown).
        `roi`: (x, y, w, h) in fractions of the frame, the region the model sees (a guide box the
        card is held in); None: the whole frame, through the bundle's recorded preprocessing.
        """
        roi = Roi.of(roi)  # a malformed roi fails before the bundle is read
        root = resolve_bundle_path(bundle)
        manifest = Manifest.read(root)
        runner = open_backend(root, manifest, backend, threads)
        if EXPLAIN in manifest.graphs:  # its session waits for the first `explain`; its sha256 does not
            verify_graph(root, manifest, EXPLAIN)
        gallery_path = None
        if isinstance(gallery, Gallery):
            store = gallery
            if store.fingerprint != manifest.fingerprint:
                theirs = store.model_description or "(no description)"
                raise GalleryError(
                    f"the gallery was enrolled with another model: it belongs to {theirs!r} "
                    f"(fingerprint {store.fingerprint[:12]}), but the open model is "
                    f"{describe_model(manifest)!r} (fingerprint {manifest.fingerprint[:12]})"
                )
        else:
            store = None
            if gallery is not None:
                gallery_path = Path(gallery)
                try:
                    store = Gallery.load(
                        gallery_path,
                        manifest.fingerprint,
                        describe_model(manifest),
                        manifest.bank_shapes,
                        manifest.bank_dtypes,
                    )
                except GalleryNotFoundError:
                    log.info("gallery %s does not exist yet; starting an empty one", gallery_path)
            if store is None:
                store = new_gallery(manifest)
            elif store.path is not None:
                gallery_path = store.path  # a version 1 or 2 file's converted file, once there is one
        if tuple(store.feature_shape) != tuple(manifest.feature_shape):
            # The same fingerprint with other feature maps: a hand-made or damaged file. Refused here,
            # not as an ONNX Runtime shape error at the first frame.
            if not isinstance(gallery, Gallery):
                store.close()
            raise GalleryError(
                f"the gallery {gallery_path or ''} stores feature maps of shape {list(store.feature_shape)}, "
                f"but this bundle's are {list(manifest.feature_shape)}"
            )
        return cls(
            root,
            manifest,
            runner,
            store,
            gallery_path,
            shortlist=shortlist,
            threshold=threshold,
            smoothing=smoothing,
            sensitivity=sensitivity,
            roi=roi,
        )

    # ----- reading ---------------------------------------------------------------------------------
    @property
    def roi(self) -> Roi | None:
        """The region of each frame the model sees (fixed at open; None: the whole frame)."""
        return self._roi

    @property
    def classes(self) -> list[str]:
        with self._lock.read():
            return list(self.gallery.names)

    def class_page(self, offset: int = 0, limit: int = 100) -> list[ClassInfo]:
        """Classes `offset` to `offset + limit` in enrolment order: name, shots, created, updated and how
        many thumbnails each has (for a list that pages through thousands of classes)."""
        with self._lock.read():
            return self.gallery.page(offset, limit)

    def shots(self, name: str) -> int:
        """How many frames the class was enrolled from (KeyError if there is no such class)."""
        with self._lock.read():
            return self.gallery.shots(name)

    def thumbnails(self, name: str) -> list[bytes]:
        """The class's JPEG thumbnails, its first enrolment's first (KeyError if there is no such class)."""
        with self._lock.read():
            return self.gallery.thumbnails(name)

    def preprocess(self, frames: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """[B, 3, S, S] float32: exactly what the backbone is fed (each frame cut to `roi` first)."""
        return preprocess_frames(frames, self.config.preprocess, self.roi)

    def features(self, frames: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        return self.backend.run(BACKBONE, {"images": self.preprocess(frames)})["features"]

    def scores(self, frames: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Exact DMF scores [B, len(classes)], columns in `classes` order."""
        feats = self.features(frames)
        with self._lock.read():
            return self._head(feats, self.gallery.bank_rows, len(self.gallery))

    def classify(self, frame: np.ndarray | Sequence[np.ndarray]) -> Prediction | list[Prediction]:
        """One frame -> Prediction; a list of frames (or a [B,H,W,3] array) -> list of Predictions."""
        # Any array but a 4-D batch is one frame, so that a bad one (HxWx4, 1-D) is refused as such.
        single = isinstance(frame, np.ndarray) and frame.ndim != 4
        pre = self.config.preprocess
        frames, views = model_views([frame] if single else frame, pre, self.roi)
        feats = self.backend.run(BACKBONE, {"images": stack_inputs(views, pre)})["features"]
        with self._lock.read():
            names = tuple(self.gallery.names)
            if not names:
                note = "no classes enrolled yet"
                empty = Prediction(None, float("nan"), {}, note, note)
                return empty if single else [empty] * len(feats)
            scores, own = self._scores_and_own(feats)
        scores = self._smooth(names, scores)
        contrast = [gate_contrast(f, v, pre) for f, v in zip(frames, views)]
        predictions = [self._decide(names, *args) for args in zip(scores, contrast, own)]
        return predictions[0] if single else predictions

    # ----- changing --------------------------------------------------------------------------------
    def enroll(self, name: str, frames: Sequence[np.ndarray] | np.ndarray) -> None:
        """Add frames as shots of `name` (a new class, or more shots of an existing one). InvalidFrame,
        with nothing enrolled, if any frame is not one or is blank to the model (`_enrollment_inputs`)."""
        name = validate_class_name(name)
        if (
            isinstance(frames, np.ndarray)
            and frames.ndim in (2, 3)
            and frames.dtype == np.uint8
            and (frames.ndim == 2 or frames.shape[2] in (1, 3))
        ):
            raise InvalidFrame("enroll takes a sequence of frames; wrap a single frame in a list")
        refuse_none(frames)
        if len(frames) == 0:
            raise InvalidFrame(f"no frames given to enrol {name!r}")
        checked, images = self._enrollment_inputs(frames)  # every frame refused or taken, nothing changed
        feats = self.backend.run(BACKBONE, {"images": images})["features"]
        self._add_shots(name, feats.astype(np.float64).sum(axis=0), len(feats), checked[0])

    def _enrollment_inputs(
        self, frames: Sequence[np.ndarray] | np.ndarray, first: int = 0
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """(the frames checked and cut to `roi`, the backbone's input [B, 3, S, S]) of frames to enrol.

        InvalidFrame for a frame that is not one, or that the open-set rule's contrast gate calls blank
        (`blank_reason`, as `classify` does): a class enrolled from blank paper, or from a card held
        outside the guide box, would match every empty scene. `first`: the first frame's number in the
        message (an enrolment's frames come one at a time).
        """
        pre = self.config.preprocess
        checked, views = model_views(frames, pre, self.roi)
        for i, (frame, view) in enumerate(zip(checked, views)):
            blank = blank_reason(self.open_set, gate_contrast(frame, view, pre))
            if blank:
                raise InvalidFrame(f"frame {first + i} is blank to the model ({blank}): {self._blank_hint()}")
        return checked, stack_inputs(views, pre)

    def _blank_hint(self) -> str:
        """What to do about a blank frame: with a guide box, the drawing is most likely outside it."""
        if self.roi is None:
            return "show the drawing (or object) itself, not blank paper or a uniform surface"
        r = self.roi
        return f"hold the drawing inside the guide box (roi {r.x:g},{r.y:g},{r.w:g},{r.h:g} of the frame)"

    def enrollment(self, name: str) -> Enrollment:
        """Enrol `name` frame by frame: `e.add(frame)` computes each frame's features as it comes,
        `e.commit()` adds them as shots, as `enroll(name, frames)` would, without holding the frames."""
        return Enrollment(self, validate_class_name(name))

    def _add_shots(self, name: str, delta: np.ndarray, shots: int, thumbnail: np.ndarray) -> None:
        """Add `shots` shots whose features sum to `delta` (float64) to `name`, with its new bank.

        Transactional: the new sum is checked and its bank computed and checked before the gallery
        changes, so a refused enrolment (huge or non-finite features, a bank that overflows) changes
        nothing and never blocks a later save.
        """
        with self._lock.write():
            g = self.gallery
            if name in g:
                row = g.index(name)
                total, count = g.feature_sum(row) + delta, int(g.counts[row]) + shots
            else:
                total, count = delta, shots
            check_feature_sum("enrolment", name, total, count)
            prototype = (total / count).astype(np.float32)[None]
            bank = self.backend.run(SUPPORT, {"prototypes": prototype})
            # Only now, with every result in hand, does the gallery change (add_shots checks the bank).
            g.add_shots(name, delta, shots, thumbnail, bank={k: bank[k][0] for k in CLASS_BANK})
            self._smoothed = None

    def remove(self, name: str) -> RemovedClass:
        """Delete a class; what comes back puts it back with `restore` (the window's undo)."""
        with self._lock.write():
            g = self.gallery
            row = g.index(name)
            removed = RemovedClass(name, g.feature_sum(row).copy(), int(g.counts[row]), g.thumbnail(name))
            g.remove(name)
            self._smoothed = None
        return removed

    def restore(self, removed: RemovedClass) -> None:
        """Enrol a removed class again, as the last class, with its shots and thumbnail."""
        name = validate_class_name(removed.name)
        prototype = (removed.feature_sum / removed.count).astype(np.float32)[None]
        bank = self.backend.run(SUPPORT, {"prototypes": prototype})
        thumb = removed.thumbnail
        picture = cv2.imdecode(np.frombuffer(thumb, np.uint8), cv2.IMREAD_COLOR) if thumb else None
        with self._lock.write():
            if name in self.gallery:
                raise GalleryError(f"cannot restore {name!r}: a class of that name exists again")
            bank_row = {k: bank[k][0] for k in CLASS_BANK}
            self.gallery.add_shots(name, removed.feature_sum, removed.count, picture, bank=bank_row)
            self._smoothed = None

    def rename(self, old: str, new: str) -> None:
        with self._lock.write():
            self.gallery.rename(old, new)
            self._smoothed = None

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Save the gallery; durable when it returns. Returns the file written.

        With no path (or the gallery's own): what changed since the last save, in one transaction, in
        time that does not grow with the class count; a gallery read from a version 1 or 2 file is
        written as version 3 beside it (its `converted_path`). Another path: a consistent snapshot
        there, and the recogniser keeps saving to its own file; a recogniser without a gallery file
        yet saves to that path from then on.
        """
        target = Path(path) if path is not None else self.gallery_path
        if target is None:
            raise ValueError("no gallery path: pass one to save() or to Recognizer.open(gallery=...)")
        with self._lock.write():  # readers never see the gallery between a change and its bookkeeping
            saved = self.gallery.save(target)
            if self.gallery.path is not None:
                self.gallery_path = self.gallery.path
        return saved

    def close(self) -> None:
        """Close the gallery's file (its WAL checkpointed: one file again). Unsaved changes are lost."""
        with self._lock.write():
            self.gallery.close()

    def __enter__(self) -> Recognizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def explain(self, frame: np.ndarray, name: str) -> Explanation:
        """What the head aligned for one frame against the enrolled class `name` (runtime/explain.py):
        where each query position read the class, each position's share of the score, and the aligned
        feature's norm. ExplanationUnavailable if the bundle was exported without explain.onnx."""
        if EXPLAIN not in self.manifest.graphs:
            raise ExplanationUnavailable(
                f"the bundle {self.bundle} was exported without explanation support (it has no "
                f"{EXPLAIN}.onnx); re-export it with dmf-export to explain its scores"
            )
        with self._lock.write():  # one session, however many threads ask first
            if self._explainer is None:
                self._explainer = OnnxRuntimeBackend(self.bundle, self.manifest, graphs=(EXPLAIN,))
        feats = self.features([frame])
        with self._lock.read():
            if not isinstance(name, str) or name not in self.gallery:
                known = ", ".join(repr(n) for n in self.gallery.names) or "none"
                raise UnknownClassError(f"no class named {name!r} is enrolled (enrolled: {known})")
            row = self.gallery.index(name)
            # explain.onnx is float32 whatever precision the bundle's own graphs and banks use.
            bank = {k: v.astype(np.float32) for k, v in self.gallery.bank_rows(slice(row, row + 1)).items()}
            jpeg = self.gallery.thumbnail(name)
        outputs = self._explainer.run(EXPLAIN, {"query_features": feats.astype(np.float32), **bank})
        return Explanation.from_outputs(
            name, self.config.preprocess, outputs, decode_thumbnail(jpeg), roi=self.roi
        )

    def head_scores(self, feats: np.ndarray, bank: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The exact head alone: [B, N] scores of backbone features against a class bank (default:
        the gallery's), in the chunks `classify` runs it. For timing the head on its own (dmf-bench)."""
        if bank is None:
            with self._lock.read():
                return self._head(feats, self.gallery.bank_rows, len(self.gallery))
        given = bank
        return self._head(
            feats, lambda rows: {k: given[k][rows] for k in CLASS_BANK}, len(bank["class_weight"])
        )

    # ----- internals -------------------------------------------------------------------------------
    def _head(
        self, feats: np.ndarray, bank_rows: Callable[[slice | np.ndarray], dict[str, np.ndarray]], n: int
    ) -> np.ndarray:
        """Exact scores [B, n] of the classes whose banks `bank_rows(rows)` gives, in chunks: only one
        chunk's banks are in memory at a time."""
        out = np.empty((len(feats), n), np.float32)
        cfg = self.config
        pair_bytes = 36 * cfg.filter_channels * cfg.feature_size**2 * 4
        step = max(1, min(HEAD_CHUNK, HEAD_CHUNK_BYTES // (max(1, len(feats)) * pair_bytes)))
        for start in range(0, n, step):
            stop = min(start + step, n)
            bank = bank_rows(slice(start, stop))
            chunk = {k: np.ascontiguousarray(bank[k]) for k in CLASS_BANK}
            out[:, start:stop] = self.backend.run(HEAD, {"query_features": feats, **chunk})["scores"]
        return out

    def shortlist_size(self, n: int) -> int | None:
        """How many classes `classify` runs the exact head on with n enrolled; None: all (exact)."""
        size = self.shortlist
        if size == "auto":
            size = AUTO_SHORTLIST if n > AUTO_EXACT_MAX else None
        return size if size and n > size else None

    def _classify_scores(self, feats: np.ndarray) -> np.ndarray:
        """Exact scores, or exact on a shortlist ranked by <mean q, w> (-inf for the rest). With a
        shortlist only the ranking vectors and the candidates' banks are read."""
        g = self.gallery
        n = len(g)
        size = self.shortlist_size(n)
        if size is None:
            return self._head(feats, g.bank_rows, n)
        coarse = coarse_scores(feats, g.class_weights())
        out = np.full((len(feats), n), -np.inf, np.float32)
        for i, row in enumerate(coarse):
            top = np.sort(np.argpartition(-row, size - 1)[:size])
            sub = g.bank_rows(top)
            out[i, top] = self._head(
                feats[i : i + 1], lambda rows, sub=sub: {k: sub[k][rows] for k in CLASS_BANK}, size
            )[0]
        return out

    def _scores_and_own(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(`_classify_scores`, each frame's own score [B]). The own score divides the best one; an
        absolute threshold has no use for it (ones). A lone frame against a gallery scored exactly has
        its own class scored in the same head calls, as one more column: one call fewer per frame."""
        if self.threshold is not None:
            return self._classify_scores(feats), np.ones(len(feats))
        n = len(self.gallery)
        if len(feats) > 1 or self.shortlist_size(n) is not None:
            return self._classify_scores(feats), own_scores(self.backend, feats)
        own_bank = self.backend.run(SUPPORT, {"prototypes": feats})

        def with_own(rows: slice) -> dict[str, np.ndarray]:  # the gallery's rows, then the frame's own
            banks = self.gallery.bank_rows(slice(rows.start, min(rows.stop, n)))
            if rows.stop <= n:
                return banks
            return {k: np.concatenate([banks[k], own_bank[k]]) for k in CLASS_BANK}

        scores = self._head(feats, with_own, n + 1)
        return scores[:, :n], scores[:, n]

    def _smooth(self, names: tuple[str, ...], scores: np.ndarray) -> np.ndarray:
        if not self.smoothing:
            return scores
        prev = self._smoothed
        smoothed = []
        for row in scores:
            if prev is not None and prev[0] == names:
                finite = np.isfinite(row) & np.isfinite(prev[1])
                row = np.where(finite, self.smoothing * prev[1] + (1 - self.smoothing) * row, row)
            prev = (names, row)
            smoothed.append(row)
        self._smoothed = prev
        return np.stack(smoothed)

    def _decide(self, names: tuple[str, ...], row: np.ndarray, contrast: float, own: float) -> Prediction:
        best = int(np.argmax(row))
        score = float(row[best])
        table = {name: float(s) for name, s in zip(names, row) if np.isfinite(s)}
        rule, name = self.open_set, names[best]
        why = refusal(rule, contrast, name, score, float(own), self.sensitivity, self.threshold)
        if why:
            return Prediction(None, score, table, why, why)
        return Prediction(names[best], score, table)

    def _complete_banks(self) -> None:
        """Compute the class banks the gallery lacks from its stored prototypes: rows added without
        one, or every row when the gallery was saved with banks of other shapes or dtypes (banks are
        derived data: a bundle of the same model with another head form or bank precision)."""
        g = self.gallery
        shapes, dtypes = self.manifest.bank_shapes, self.manifest.bank_dtypes
        if g.bank_shapes != shapes or g.bank_dtypes != dtypes:
            log.info(
                "the gallery stores class banks %s %s; this bundle's are %s %s: recomputing %d banks "
                "from the stored prototypes",
                g.bank_shapes,
                g.bank_dtypes,
                shapes,
                dtypes,
                len(g),
            )
            g.reset_banks(shapes, dtypes)
        stale = [g.index(name) for name in g.missing_banks]
        if stale:
            log.info("computing %d class banks missing from the cache", len(stale))
        for start in range(0, len(stale), BANK_BATCH):
            rows = stale[start : start + BANK_BATCH]
            bank = self.backend.run(SUPPORT, {"prototypes": g.prototypes(rows)})
            for i, row in enumerate(rows):
                g.set_bank(row, {k: bank[k][i] for k in CLASS_BANK}, touch=False)


class Enrollment:
    """Shots of one class gathered frame by frame (`Recognizer.enrollment`). It keeps the running sum of
    the frames' features and a thumbnail-sized copy of the first frame, never the frames themselves."""

    def __init__(self, rec: Recognizer, name: str) -> None:
        self.rec, self.name = rec, name
        self.shots = 0
        self.offered = 0  # frames given to `add`, refused ones included: they are numbered by it
        self._sum: np.ndarray | None = None
        self._thumbnail: np.ndarray | None = None

    def add(self, frame: np.ndarray, number: int | None = None) -> None:
        """Compute one frame's features and add them. InvalidFrame, with nothing added, for a frame that
        is not one or that is blank to the model (as `Recognizer.enroll`); its message names the frame
        by `number` (a video's frame number), or else by how many frames were offered before it."""
        self.offered += 1
        first = self.offered - 1 if number is None else number
        checked, images = self.rec._enrollment_inputs([frame], first=first)
        features = self.rec.backend.run(BACKBONE, {"images": images})["features"][0].astype(np.float64)
        self._sum = features if self._sum is None else self._sum + features
        if self._thumbnail is None:
            self._thumbnail = _shrink(checked[0], THUMBNAIL_SIZE)
        self.shots += 1

    def commit(self) -> None:
        """Add the gathered shots to the gallery (InvalidFrame if there are none)."""
        if self._sum is None or self._thumbnail is None:
            raise InvalidFrame(f"no frames given to enrol {self.name!r}")
        self.rec._add_shots(self.name, self._sum, self.shots, self._thumbnail)


def _shrink(frame: np.ndarray, side: int) -> np.ndarray:
    """The frame with its longest side at most `side` pixels (INTER_AREA, as the gallery's thumbnails)."""
    h, w = frame.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return frame.copy()
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def coarse_scores(feats: np.ndarray, class_weight: np.ndarray) -> np.ndarray:
    """The shortlist's ranking: the alignment-free meta-classifier score <mean_p q(p), w_c>, [B, N].

    einsum, not `@`: numpy's BLAS threads keep spinning after a matmul and halve the speed of the next
    frame's backbone on ONNX Runtime.
    """
    return np.einsum("bc,nc->bn", feats.mean(axis=(2, 3)), class_weight)


def describe_model(manifest: Manifest) -> str:
    cfg = manifest.model
    precision = "" if manifest.precision == "fp32" else f" {manifest.precision}"
    return (
        f"{cfg.backbone} C={cfg.channels} G={cfg.groups} k={cfg.kernel} {cfg.preprocess.image_size}px"
        f"{precision} weights {manifest.weights_sha256[:12]}"
    )


def new_gallery(manifest: Manifest) -> Gallery:
    return Gallery(
        manifest.fingerprint,
        manifest.feature_shape,
        manifest.bank_shapes,
        describe_model(manifest),
        manifest.bank_dtypes,
    )
