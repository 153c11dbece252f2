"""The shortlist: rank every class by the alignment-free score <mean_p q(p), w_c>, run the exact head
on the best K only.

A constructed case fixes both rankings by hand: the real demo bundle runs the backbone and the support
graph, and a wrapper around its backend answers the head graph from a table of "exact" scores (a class
is recognised by an id written into its bank), while each class weight is set so that its cheap score
is a chosen number. Then the real bundle, unmodified: `scores()` is exact whatever the shortlist.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dmf_deploy.manifest import CLASS_BANK, HEAD, SUPPORT, read_manifest
from dmf_deploy.packaged import DEMO_BUNDLE
from dmf_deploy.runtime import Recognizer
from dmf_deploy.runtime.backends import OnnxRuntimeBackend
from dmf_deploy.runtime.recognizer import coarse_scores, new_gallery

pytestmark = pytest.mark.skipif(not (DEMO_BUNDLE / "manifest.json").is_file(), reason="no demo bundle")


class TableHead:
    """The bundle's backend, except that the head answers from a table: score(class) = exact[id], where
    id is written into the class's bank (the first value of its support_offset). Records the classes
    of every call."""

    def __init__(self, real, exact: dict[int, float]) -> None:
        self.real, self.exact, self.calls = real, exact, []
        self.name = real.name

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph != HEAD:
            return self.real.run(graph, inputs)
        offsets = inputs["support_offset"]
        ids = [int(round(v)) for v in offsets.reshape(len(offsets), -1)[:, 0]]
        self.calls.append(ids)
        row = np.array([self.exact[i] for i in ids], np.float32)
        return {"scores": np.tile(row, (len(inputs["query_features"]), 1))}


@pytest.fixture(scope="module")
def manifest():
    return read_manifest(DEMO_BUNDLE)


@pytest.fixture(scope="module")
def backend(manifest):
    return OnnxRuntimeBackend(DEMO_BUNDLE, manifest, threads=1)


def frames(count: int, seed: int) -> list[np.ndarray]:
    """Strokes on white, roughly what the demo model was trained on (Omniglot characters): three pen
    lines, 3 px wide (the demo's frame rule takes thin dark lines for ink; a filled block is not ink)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        img = np.full((64, 64, 3), 255, np.uint8)
        for _ in range(3):
            p = rng.integers(8, 56, 4)
            cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), (0, 0, 0), 3)
        out.append(img)
    return out


def constructed(manifest, backend, coarse: list[float], exact: list[float], shortlist: int | None):
    """A Recognizer whose classes c0.. have the given cheap scores and exact scores for `query`."""
    query = frames(1, seed=99)[0]
    head = TableHead(backend, dict(enumerate(exact)))
    probe = Recognizer(DEMO_BUNDLE, manifest, head, new_gallery(manifest), None)
    mean = probe.features([query]).mean(axis=(2, 3))[0]  # [C]
    gallery = new_gallery(manifest)
    shapes = gallery.bank_shapes
    for i, value in enumerate(coarse):
        row = gallery.add_shots(f"c{i}", np.zeros(gallery.feature_shape, np.float32), 1, None)
        bank = {k: np.zeros(shapes[k], np.float32) for k in CLASS_BANK}
        bank["support_offset"].flat[0] = i
        bank["class_weight"][:] = value * mean / float(mean @ mean)  # <mean q, w> = value
        gallery.set_bank(row, bank)
    rec = Recognizer(DEMO_BUNDLE, manifest, head, gallery, None, shortlist=shortlist, threshold=-1e30)
    head.calls.clear()
    return rec, head, query


COARSE = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]  # cheap ranking: c0 > c1 > ... > c5
EXACT = [1.0, 2.0, 10.0, 3.0, 4.0, 5.0]  # exact winner: c2, third under the cheap score


def test_constructed_rankings_are_what_the_recognizer_sees(manifest, backend):
    rec, head, query = constructed(manifest, backend, COARSE, EXACT, shortlist=None)
    coarse = coarse_scores(rec.features([query]), rec.gallery.bank_arrays()["class_weight"])
    np.testing.assert_allclose(coarse[0], COARSE, rtol=1e-4)
    np.testing.assert_array_equal(rec.scores([query])[0], np.float32(EXACT))


@pytest.mark.parametrize("k", [3, 4, 6])
def test_shortlist_picks_the_exact_winner_when_it_is_shortlisted(manifest, backend, k):
    rec, head, query = constructed(manifest, backend, COARSE, EXACT, shortlist=k)
    pred = rec.classify(query)
    assert pred.label == "c2"  # the exact winner, though the cheap score ranks it third
    assert pred.score == 10.0
    # Only the K best by the cheap score were run through the head, and only they are scored.
    assert sorted(i for call in head.calls for i in call) == list(range(k))
    assert pred.scores == {f"c{i}": EXACT[i] for i in range(k)}


def test_outside_the_shortlist_the_best_shortlisted_class_wins(manifest, backend):
    """The definition, not a virtue: with K = 2 the exact winner (cheap rank 2) is not looked at."""
    rec, head, query = constructed(manifest, backend, COARSE, EXACT, shortlist=2)
    pred = rec.classify(query)
    assert pred.label == "c1"
    assert set(pred.scores) == {"c0", "c1"}
    # scores() stays exact: every class, through the head.
    np.testing.assert_array_equal(rec.scores([query])[0], np.float32(EXACT))


def test_a_batch_gets_a_shortlist_per_frame(manifest, backend):
    """A batch of frames: each frame gets its own shortlist (here all the same query)."""
    rec, head, query = constructed(manifest, backend, COARSE, EXACT, shortlist=3)
    preds = rec.classify([query, query, query])
    assert [p.label for p in preds] == ["c2"] * 3


# ----- the real bundle, unmodified ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def enrolled(manifest, backend):
    """40 classes enrolled from one stroke image each, through the real graphs."""
    gallery = new_gallery(manifest)
    rec = Recognizer(DEMO_BUNDLE, manifest, backend, gallery, None)
    feats = rec.features(frames(40, seed=1))
    bank = backend.run(SUPPORT, {"prototypes": feats})
    for i, f in enumerate(feats):
        row = gallery.add_shots(f"class {i}", f, 1, None)
        gallery.set_bank(row, {k: bank[k][i] for k in CLASS_BANK})
    return gallery


def test_scores_are_exact_with_a_shortlist(manifest, backend, enrolled):
    queries = frames(6, seed=2)
    exact = Recognizer(DEMO_BUNDLE, manifest, backend, enrolled, None)
    short = Recognizer(DEMO_BUNDLE, manifest, backend, enrolled, None, shortlist=4)
    ref = exact.scores(queries)
    got = short.scores(queries)
    assert got.shape == (6, 40)
    np.testing.assert_array_equal(got, ref)


def test_shortlist_on_the_real_bundle_agrees_where_the_winner_is_shortlisted(manifest, backend, enrolled):
    queries = frames(6, seed=2)
    k = 8
    short = Recognizer(DEMO_BUNDLE, manifest, backend, enrolled, None, shortlist=k, threshold=-1e30)
    exact = short.scores(queries)
    feats = short.features(queries)
    coarse = coarse_scores(feats, enrolled.bank_arrays()["class_weight"])
    names = enrolled.names
    for q, pred in enumerate(short.classify(queries)):
        top = np.argsort(-coarse[q])[:k]
        assert {names[i] for i in top} == set(pred.scores)  # the K best by the cheap score
        for i in top:  # shortlisted scores are the exact ones (same head, a subset of classes)
            assert pred.scores[names[i]] == pytest.approx(float(exact[q, i]), rel=1e-5, abs=1e-6)
        winner = int(exact[q].argmax())
        if winner in top:
            assert pred.label == names[winner]
        else:
            assert pred.label == names[top[np.argmax(exact[q, top])]]


# ----- shortlist="auto" and the head's chunking -------------------------------------------------------------
def test_auto_is_exact_up_to_a_class_count_then_a_shortlist(manifest, backend, monkeypatch):
    import inspect

    from dmf_deploy.runtime import recognizer

    assert inspect.signature(Recognizer.open).parameters["shortlist"].default == "auto"
    monkeypatch.setattr(recognizer, "AUTO_EXACT_MAX", 5)
    monkeypatch.setattr(recognizer, "AUTO_SHORTLIST", 3)
    rec, head, query = constructed(manifest, backend, COARSE, EXACT, shortlist="auto")
    assert [rec.shortlist_size(n) for n in (1, 5, 6, 100)] == [None, None, 3, 3]
    pred = rec.classify(query)  # 6 classes > 5: the best 3 by the cheap score, c2 among them
    assert pred.label == "c2" and len(pred.scores) == 3
    assert sorted(i for call in head.calls for i in call) == [0, 1, 2]

    rec, head, query = constructed(manifest, backend, COARSE[:5], EXACT[:5], shortlist="auto")
    assert len(rec.classify(query).scores) == 5  # 5 classes: exact
    assert sorted(i for call in head.calls for i in call) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("bad", [-1, "all", 2.5, True])
def test_shortlist_values_are_checked(manifest, backend, bad):
    with pytest.raises(ValueError, match="shortlist must be"):
        Recognizer(DEMO_BUNDLE, manifest, backend, new_gallery(manifest), None, shortlist=bad)


def test_head_chunks_do_not_change_scores(manifest, backend, enrolled, monkeypatch):
    """The head runs in chunks of classes sized by a byte budget; any chunking gives the same scores."""
    from dmf_deploy.runtime import recognizer

    queries = frames(3, seed=4)
    rec = Recognizer(DEMO_BUNDLE, manifest, backend, enrolled, None)
    whole = rec.scores(queries)
    calls = []
    real_run = backend.run

    def counting(graph, inputs):
        if graph == HEAD:
            calls.append(len(inputs["class_weight"]))
        return real_run(graph, inputs)

    monkeypatch.setattr(backend, "run", counting)
    monkeypatch.setattr(recognizer, "HEAD_CHUNK_BYTES", 1 << 20)  # 1 MiB: a few classes per call
    chunked = rec.scores(queries)
    assert len(calls) > 5 and sum(calls) == 40
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6 * float(np.abs(whole).max()))
