"""The Recognizer under concurrent use: four threads classify while a fifth enrols, renames and removes.

Real ONNX Runtime sessions on a real bundle; nothing is mocked. The writer is the only thread that
changes the gallery, so it knows every class list the gallery passes through; each result a reader
gets must carry exactly one of those lists as its columns.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bundles import export_small_bundle, relative_error  # tests/bundles.py

from dmf_deploy.runtime import Recognizer
from dmf_deploy.train.glyphs import GlyphSet

DURATION = 3.0  # seconds of concurrent traffic
READERS = 4
GLYPHS = GlyphSet(12, seed=3, image_size=48)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """Random weights (seed 1) do for concurrency; test_recognizer.py shares this bundle."""
    return export_small_bundle(tmp_path_factory, seed=1)


def test_classify_while_enrolling_and_removing(bundle, tmp_path):
    rec = Recognizer.open(bundle, backend="onnxruntime")
    rec.enroll("base 0", [GLYPHS.render(0, 1)])  # never removed: every snapshot has columns
    rec.enroll("base 1", [GLYPHS.render(1, 1), GLYPHS.render(1, 2)])

    current = list(rec.classes)
    snapshots = {tuple(current)}  # every class list the gallery has held
    lock = threading.Lock()  # guards `snapshots` (readers look at it only at the end)
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[tuple[str, ...]] = []
    counts = [0] * READERS
    writes = [0]
    frames = [GLYPHS.render(c, 100 + i) for c in range(12) for i in range(2)]

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set():
                i += 1
                name = f"w{i}"
                rec.enroll(name, [GLYPHS.render(2 + i % 10, 200 + i)])
                current.append(name)
                ops = [tuple(current)]
                if i % 3 == 0:  # more shots for an existing class: same columns
                    rec.enroll(current[-2], [GLYPHS.render(2 + (i - 1) % 10, 300 + i)])
                if i % 4 == 0:  # a rename in the middle of the list
                    old = current[2]
                    rec.rename(old, f"{old}-r")
                    current[2] = f"{old}-r"
                    ops.append(tuple(current))
                while len(current) > 6:  # remove the oldest writer class
                    rec.remove(current[2])
                    del current[2]
                    ops.append(tuple(current))
                with lock:
                    snapshots.update(ops)
                assert rec.classes == current  # the only writer: reading back gives its own list
                writes[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            stop.set()

    def reader(k: int) -> None:
        try:
            j = 0
            local: list[tuple[str, ...]] = []
            while not stop.is_set():
                j += 1
                frame = frames[(k * 7 + j) % len(frames)]
                if j % 5 == 0:  # batches too
                    preds = rec.classify([frame, frames[j % len(frames)]])
                    assert len(preds) == 2
                    local += [tuple(p.scores) for p in preds]
                    assert local[-1] == local[-2]  # one batch, one gallery state
                elif j % 7 == 0:
                    scores = rec.scores([frame])
                    assert scores.shape[0] == 1 and np.all(np.isfinite(scores))
                    local.append(("<scores>", str(scores.shape[1])))
                else:
                    pred = rec.classify(frame)
                    assert pred.label is None or pred.label in pred.scores
                    assert all(np.isfinite(v) for v in pred.scores.values())
                    local.append(tuple(pred.scores))
                counts[k] += 1
            seen.extend(local)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(READERS)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    time.sleep(DURATION)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock?)"
    if errors:
        raise errors[0]

    # The test exercised something: writes happened and every reader ran many calls.
    assert writes[0] >= 5, writes
    assert min(counts) >= 10, counts
    sizes = {len(s) for s in snapshots}
    for columns in seen:
        if columns[0] == "<scores>":
            assert int(columns[1]) in sizes
        else:
            assert columns in snapshots, f"columns {columns} never existed"
    # Readers saw the gallery change while they ran (more than one state), not one frozen state.
    assert len({c for c in seen if c[0] != "<scores>"}) >= 2

    # Nothing was corrupted on the way: a recogniser reopened from the saved gallery agrees.
    path = rec.save(tmp_path / "after.dmfg")
    again = Recognizer.open(bundle, backend="onnxruntime", gallery=path)
    assert again.classes == rec.classes == current
    got, ref = rec.scores(frames), again.scores(frames)
    assert relative_error(got, ref) <= 1e-6
