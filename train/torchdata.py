"""Episodes as torch tensors: images through the shared preprocessing plus augmentations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dmf_deploy.config import PreprocessConfig

from .augment import AugmentConfig, make_example
from .episodes import EpisodeSampler
from .fewshot import FewShotDataset


@dataclass
class EpisodeBatch:
    images: torch.Tensor  # [sum of (S + Q) over episodes, 3, H, W]
    support_sizes: list[int]
    query_sizes: list[int]
    support_labels: list[torch.Tensor]
    query_labels: list[torch.Tensor]
    query_global_labels: list[torch.Tensor]
    episode_ids: list[int]  # each episode's number in its sampler (for the current epoch)

    def pin_memory(self) -> EpisodeBatch:
        """Called by DataLoader(pin_memory=True); without it a custom batch type is left unpinned and the
        non_blocking copies in `to` silently become synchronous."""
        pin = lambda ts: [t.pin_memory() for t in ts]  # noqa: E731
        return EpisodeBatch(
            self.images.pin_memory(),
            self.support_sizes,
            self.query_sizes,
            pin(self.support_labels),
            pin(self.query_labels),
            pin(self.query_global_labels),
            self.episode_ids,
        )

    def to(self, device: torch.device) -> EpisodeBatch:
        move = lambda ts: [t.to(device, non_blocking=True) for t in ts]  # noqa: E731
        return EpisodeBatch(
            self.images.to(device, non_blocking=True),
            self.support_sizes,
            self.query_sizes,
            move(self.support_labels),
            move(self.query_labels),
            move(self.query_global_labels),
            self.episode_ids,
        )


class EpisodeDataset(Dataset):
    """Item i = episode i of the sampler, as tensors. Augmentation randomness is seeded by the episode."""

    def __init__(
        self,
        dataset: FewShotDataset,
        sampler: EpisodeSampler,
        preprocess: PreprocessConfig,
        augment: AugmentConfig | None,
    ) -> None:
        self.dataset, self.sampler, self.preprocess, self.augment = dataset, sampler, preprocess, augment

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, index: int):
        episode = self.sampler.episode(index)
        rng = np.random.default_rng([self.sampler.seed, self.sampler.rank, self.sampler.epoch, index, 7])
        indices = np.concatenate([episode.support_indices, episode.query_indices])
        train = self.augment is not None
        images = np.stack(
            [
                make_example(
                    self.dataset.load(int(i)), self.preprocess, rng, train=train, augment=self.augment
                )
                for i in indices
            ]
        )
        global_ids = np.asarray(episode.class_ids)[episode.query_labels]
        return (
            torch.from_numpy(images),
            len(episode.support_indices),
            torch.from_numpy(episode.support_labels),
            torch.from_numpy(episode.query_labels),
            torch.from_numpy(global_ids),
            index,
        )


def collate(items) -> EpisodeBatch:
    return EpisodeBatch(
        images=torch.cat([it[0] for it in items]),
        support_sizes=[it[1] for it in items],
        query_sizes=[len(it[3]) for it in items],
        support_labels=[it[2] for it in items],
        query_labels=[it[3] for it in items],
        query_global_labels=[it[4] for it in items],
        episode_ids=[it[5] for it in items],
    )


def episode_loader(
    data: EpisodeDataset, batches: int | list[list[int]], workers: int, pin: bool
) -> DataLoader:
    """Batches of `batches` consecutive episodes, or the given lists of episode numbers."""
    if isinstance(batches, int):
        batches = [list(range(i, min(i + batches, len(data)))) for i in range(0, len(data), batches)]
    return DataLoader(
        data,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
