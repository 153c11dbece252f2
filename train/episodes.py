"""N-way K-shot episode sampling over a FewShotDataset, reproducible from a seed.

Episode i of (seed, rank, epoch) is drawn from its own generator, so an episode can be regenerated
on its own (e.g. by a DataLoader worker). `rank` selects an independent stream; the trainer draws one
stream on every DDP rank and splits each step's episodes between the ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .fewshot import DatasetError, FewShotDataset

# The official DMF evaluation protocol (chmxu/Dynamic-Meta-filter).
OFFICIAL_TEST_EPISODES = 2000
OFFICIAL_TEST_SEED = 112
OFFICIAL_TEST_QUERIES = 15


@dataclass(frozen=True)
class Episode:
    """Indices into the dataset, grouped class by class; labels are 0..N-1 within the episode."""

    support_indices: np.ndarray  # [N*K]
    support_labels: np.ndarray  # [N*K]
    query_indices: np.ndarray  # [N*Q]
    query_labels: np.ndarray  # [N*Q]
    class_ids: np.ndarray  # [N] dataset class of episode label 0..N-1

    @property
    def n_way(self) -> int:
        return len(self.class_ids)


class EpisodeSampler:
    """Iterates `episodes` episodes of n_way classes, k_shot support and q_query query images each.

    within_alphabet draws all N classes from one class group (the Omniglot alphabet). Call
    `set_epoch` between epochs to get fresh episodes, as with torch's DistributedSampler.
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        n_way: int,
        k_shot: int,
        q_query: int,
        episodes: int,
        seed: int = 0,
        *,
        rank: int = 0,
        within_alphabet: bool = False,
    ) -> None:
        if n_way < 1 or k_shot < 1 or q_query < 1 or episodes < 1:
            raise DatasetError(
                f"n_way, k_shot, q_query and episodes must be >= 1, got {n_way}, {k_shot}, "
                f"{q_query}, {episodes}"
            )
        if seed < 0 or rank < 0:
            raise DatasetError(f"seed and rank must be >= 0, got {seed} and {rank}")
        dataset.require_per_class(k_shot + q_query)
        if n_way > dataset.num_classes:
            raise DatasetError(
                f"{n_way}-way episodes need {n_way} classes; split {dataset.name!r} has {dataset.num_classes}"
            )
        self.dataset = dataset
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.episodes = episodes
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.within_alphabet = within_alphabet
        self._pools: list[np.ndarray] = [np.arange(dataset.num_classes)]
        if within_alphabet:
            groups = dataset.classes_by_group()
            self._pools = [ids for ids in groups.values() if len(ids) >= n_way]
            if not self._pools:
                largest = max(groups, key=lambda g: len(groups[g]))
                raise DatasetError(
                    f"{n_way}-way within-alphabet episodes need an alphabet with {n_way} classes; the "
                    f"largest in {dataset.name!r} is {largest!r} with {len(groups[largest])}"
                )

    def __len__(self) -> int:
        return self.episodes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def episode(self, index: int) -> Episode:
        rng = np.random.default_rng([self.seed, self.rank, self.epoch, index])
        # Alphabets are picked uniformly (not by size), as in Lake's within-alphabet runs.
        pool = self._pools[rng.integers(len(self._pools))] if len(self._pools) > 1 else self._pools[0]
        class_ids = rng.choice(pool, size=self.n_way, replace=False)
        support, query = [], []
        for cls in class_ids:
            picked = rng.choice(
                self.dataset.indices_by_class[cls], size=self.k_shot + self.q_query, replace=False
            )
            support.append(picked[: self.k_shot])
            query.append(picked[self.k_shot :])
        labels = np.arange(self.n_way)
        return Episode(
            support_indices=np.concatenate(support),
            support_labels=np.repeat(labels, self.k_shot),
            query_indices=np.concatenate(query),
            query_labels=np.repeat(labels, self.q_query),
            class_ids=np.asarray(class_ids, dtype=np.int64),
        )

    def __iter__(self) -> Iterator[Episode]:
        for index in range(self.episodes):
            yield self.episode(index)


def official_test_sampler(
    dataset: FewShotDataset, n_way: int, k_shot: int, *, within_alphabet: bool = False
) -> EpisodeSampler:
    """The paper's test protocol: 2000 episodes, seed 112, 15 queries per class."""
    return EpisodeSampler(
        dataset,
        n_way,
        k_shot,
        OFFICIAL_TEST_QUERIES,
        OFFICIAL_TEST_EPISODES,
        OFFICIAL_TEST_SEED,
        within_alphabet=within_alphabet,
    )


def confidence_interval(accuracies: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(mean, 1.96 * std / sqrt(n)) over per-episode accuracies; std with ddof=0, as the official code."""
    acc = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    if acc.size == 0:
        raise ValueError("confidence_interval needs at least one accuracy")
    return float(acc.mean()), float(1.96 * acc.std() / np.sqrt(acc.size))
