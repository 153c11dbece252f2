"""Episode sampling: sizes, labels, reproducibility, DDP ranks, within-alphabet episodes, the CI."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dmf_deploy.train.datasets import DatasetError, FewShotDataset, open_dataset
from dmf_deploy.train.episodes import Episode, EpisodeSampler, confidence_interval, official_test_sampler
from dmf_deploy.train.glyphs import glyph_dataset

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_DIR = Path(os.environ.get("DMF_OMNIGLOT_DIR", REPO.parent / "shared" / "data" / "omniglot"))
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT_DIR / "images_background_small1.zip").is_file(),
    reason=f"Omniglot small background zips not found in {OMNIGLOT_DIR} (set DMF_OMNIGLOT_DIR)",
)


def _grouped(num_classes: int = 12, per_class: int = 25) -> FewShotDataset:
    # Labels only: sampling never loads pixels. Images are shuffled so indices are not class-major.
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    groups = [f"alpha{c % 3}" for c in range(num_classes)]
    names = [f"c{c}" for c in range(num_classes)]
    return FewShotDataset("toy", names, labels, lambda i: np.zeros((4, 4, 3), np.uint8), class_groups=groups)


def _check(ep: Episode, data: FewShotDataset, n: int, k: int, q: int) -> None:
    assert ep.support_indices.shape == ep.support_labels.shape == (n * k,)
    assert ep.query_indices.shape == ep.query_labels.shape == (n * q,)
    assert ep.class_ids.shape == (n,) and len(set(ep.class_ids.tolist())) == n
    assert ep.n_way == n
    assert np.bincount(ep.support_labels, minlength=n).tolist() == [k] * n
    assert np.bincount(ep.query_labels, minlength=n).tolist() == [q] * n
    assert ep.support_labels.min() == 0 and ep.support_labels.max() == n - 1
    assert not set(ep.support_indices.tolist()) & set(ep.query_indices.tolist())
    assert len(set(ep.query_indices.tolist())) == n * q
    # every index really belongs to the class its episode label names
    assert np.array_equal(data.labels[ep.support_indices], ep.class_ids[ep.support_labels])
    assert np.array_equal(data.labels[ep.query_indices], ep.class_ids[ep.query_labels])


def _same(a: Episode, b: Episode) -> bool:
    return all(
        np.array_equal(getattr(a, f), getattr(b, f))
        for f in ("support_indices", "support_labels", "query_indices", "query_labels", "class_ids")
    )


def test_episode_sizes_and_labels():
    data = _grouped()
    sampler = EpisodeSampler(data, n_way=5, k_shot=3, q_query=4, episodes=30, seed=1)
    episodes = list(sampler)
    assert len(episodes) == len(sampler) == 30
    for ep in episodes:
        _check(ep, data, 5, 3, 4)
    assert len({tuple(ep.class_ids.tolist()) for ep in episodes}) > 20  # classes vary across episodes


def test_episodes_are_reproducible_and_seeded():
    data = _grouped()
    a = list(EpisodeSampler(data, 5, 1, 15, 10, seed=3))
    b = list(EpisodeSampler(data, 5, 1, 15, 10, seed=3))
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert all(_same(x, y) for x, y in zip(a, list(EpisodeSampler(data, 5, 1, 15, 10, seed=3)), strict=True))
    c = list(EpisodeSampler(data, 5, 1, 15, 10, seed=4))
    assert not any(_same(x, y) for x, y in zip(a, c, strict=True))
    ranked = EpisodeSampler(data, 5, 1, 15, 10, seed=3, rank=1)
    assert not any(_same(x, y) for x, y in zip(a, ranked, strict=True))  # DDP ranks differ
    sampler = EpisodeSampler(data, 5, 1, 15, 10, seed=3)
    assert _same(sampler.episode(7), a[7])  # random access agrees with iteration
    sampler.set_epoch(1)
    assert not _same(sampler.episode(7), a[7])
    sampler.set_epoch(0)
    assert _same(sampler.episode(7), a[7])


def test_official_test_sampler():
    data = glyph_dataset(10, 20, seed=0)
    sampler = official_test_sampler(data, n_way=5, k_shot=5)
    assert (len(sampler), sampler.seed, sampler.q_query) == (2000, 112, 15)
    _check(sampler.episode(1999), data, 5, 5, 15)
    with pytest.raises(DatasetError, match=r"class 'glyph0000' has 20 images but 21 are needed"):
        EpisodeSampler(data, 5, 5, 16, 10)


def test_sampler_errors():
    data = glyph_dataset(4, 3)
    with pytest.raises(DatasetError, match=r"5-way episodes need 5 classes; split 'glyphs' has 4"):
        EpisodeSampler(data, 5, 1, 1, 10)
    with pytest.raises(DatasetError, match=r"has 3 images but 4 are needed"):
        EpisodeSampler(data, 2, 2, 2, 10)
    with pytest.raises(DatasetError, match=r"must be >= 1"):
        EpisodeSampler(data, 2, 0, 2, 10)
    with pytest.raises(DatasetError, match=r"no class groups"):
        EpisodeSampler(data, 2, 1, 1, 10, within_alphabet=True)


def test_within_alphabet_toy():
    data = _grouped()  # 3 groups of 4 classes
    for ep in EpisodeSampler(data, 4, 1, 2, 50, seed=5, within_alphabet=True):
        assert len({data.class_groups[c] for c in ep.class_ids}) == 1
    with pytest.raises(DatasetError, match=r"5-way within-alphabet.*'alpha0' with 4"):
        EpisodeSampler(data, 5, 1, 1, 10, within_alphabet=True)


def test_confidence_interval():
    acc = np.array([0.5, 0.7, 0.6, 0.8])
    mean, ci = confidence_interval(acc)
    assert mean == pytest.approx(0.65)
    assert ci == pytest.approx(1.96 * np.sqrt(np.mean((acc - 0.65) ** 2)) / 2)
    assert confidence_interval([0.9] * 5) == (pytest.approx(0.9), 0.0)
    with pytest.raises(ValueError):
        confidence_interval([])


@needs_omniglot
def test_within_alphabet_omniglot():
    test = open_dataset("omniglot", OMNIGLOT_DIR, "test", rotations=True)
    sampler = EpisodeSampler(test, n_way=20, k_shot=1, q_query=1, episodes=40, seed=0, within_alphabet=True)
    alphabets = set()
    for ep in sampler:
        _check(ep, test, 20, 1, 1)
        groups = {test.class_groups[c] for c in ep.class_ids}
        assert len(groups) == 1
        alphabets |= groups
        assert all(test.class_names[c].startswith(next(iter(groups)) + "/") for c in ep.class_ids)
    assert alphabets == {"Korean", "Latin"}
    plain = open_dataset("omniglot", OMNIGLOT_DIR, "test")  # 66 classes, but Korean has only 40
    with pytest.raises(DatasetError, match=r"50-way within-alphabet.*'Korean' with 40"):
        official_test_sampler(plain, n_way=50, k_shot=1, within_alphabet=True)
    val = open_dataset("omniglot", OMNIGLOT_DIR, "val")
    assert len(official_test_sampler(val, n_way=20, k_shot=5, within_alphabet=True)) == 2000
