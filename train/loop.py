"""The training loop: the paper's loss, SGD + warm-up/cosine, optional bf16 on CUDA, DDP, resume, metrics.

Under DDP the recipe is one process's: a step takes episodes_per_batch episodes across all ranks
(episodes_per_batch / world_size each), so the step count, learning rate and episodes stay the same;
BatchNorm statistics are synced across ranks on CUDA (SyncBatchNorm is CUDA-only in PyTorch).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dmf_deploy.atomic import atomic_write_bytes
from dmf_deploy.backbones import BasicBlock
from dmf_deploy.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_checkpoint_with_metadata,
    save_checkpoint,
)
from dmf_deploy.config import ModelConfig, PreprocessConfig
from dmf_deploy.model import DMFNet

from .augment import AugmentConfig
from .datasets import FewShotDataset, open_dataset
from .episodes import EpisodeSampler, confidence_interval
from .presets import TrainSettings
from .schedule import learning_rate
from .torchdata import EpisodeBatch, EpisodeDataset, episode_loader

log = logging.getLogger("dmf_deploy.train")

# One line of metrics.jsonl per epoch (written by rank 0 only), with exactly these keys:
METRIC_KEYS = (
    "epoch",  # 1-based number of the epoch just finished
    "lr",  # learning rate of the epoch's last step
    "loss",  # mean training loss over the epoch's batches (averaged over DDP ranks)
    "global_ce",  # its global-classifier cross-entropy term
    "fewshot_ce",  # its few-shot cross-entropy term (before the 0.5-style weight)
    "accuracy",  # few-shot accuracy on the training episodes
    "val_acc",  # mean val_way-way val_shot-shot accuracy on the validation split (null: not validated)
    "val_ci95",  # its 95% confidence interval (1.96 std / sqrt(episodes)) (null: not validated)
    "episodes_per_s",  # training episodes per second, all ranks together
    "seconds",  # wall time of the epoch's training steps
    "world_size",  # number of DDP processes
)
VAL_QUERIES = 15  # queries per class in validation episodes (the official protocol's), fewer if short


class EpisodeLoss(nn.Module):
    """Batch of episodes -> mean loss. The DDP-wrapped module, so gradients sync through forward()."""

    def __init__(self, model: DMFNet, amp: bool, device_type: str = "cuda") -> None:
        super().__init__()
        self.model, self.amp, self.device_type = model, amp, device_type

    def forward(self, batch: EpisodeBatch) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            feats = self.model.features(batch.images)
        feats = feats.float()  # the head (sampling, exp, polynomial) stays in float32
        results, start = [], 0
        for s, q, s_lab, q_lab, g_lab in zip(
            batch.support_sizes,
            batch.query_sizes,
            batch.support_labels,
            batch.query_labels,
            batch.query_global_labels,
        ):
            sup, qry = feats[start : start + s], feats[start + s : start + s + q]
            results.append(self.model.loss_from_features(sup, s_lab, qry, q_lab, g_lab))
            start += s + q
        return {k: torch.stack([r[k] for r in results]).mean() for k in results[0]}


def model_config(settings: TrainSettings, num_classes: int) -> ModelConfig:
    widths = (settings.width,) * 4 if settings.backbone == "conv4" else (64, 160, 320, 640)
    return ModelConfig(
        backbone=settings.backbone,
        widths=widths,
        preprocess=PreprocessConfig(
            image_size=settings.image_size, crop_from=settings.eval_crop_from, locate=settings.locate
        ),
        groups=settings.groups,
        kernel=settings.kernel,
        dynamic_sampling=settings.dynamic_sampling,
        num_classes=num_classes,
        solver=settings.solver,
        steps=settings.steps,
    )


def augment_config(settings: TrainSettings, dataset: FewShotDataset) -> AugmentConfig:
    return AugmentConfig.for_dataset(
        dataset,
        crop=settings.crop,
        pad=settings.pad,
        pad_mode=settings.pad_mode,
        brightness=settings.color_jitter,
        contrast=settings.color_jitter,
        saturation=settings.color_jitter,
        erase_prob=settings.erase_prob,
        affine=settings.affine,
        elastic=settings.elastic,
        stroke=settings.stroke,
        camera=settings.camera,
    )


def open_splits(settings: TrainSettings) -> tuple[FewShotDataset, FewShotDataset]:
    """Both splits, checked against the episode shapes, so that bad data fails before training."""
    options: dict[str, Any] = {}
    if settings.dataset == "omniglot":
        options["rotations"] = settings.rotations
    train = open_dataset(settings.dataset, settings.data_root, "train", **options)
    val = open_dataset(
        settings.dataset,
        settings.data_root,
        "val",
        **({"rotations": False} if settings.dataset == "omniglot" else {}),
    )
    train.require_per_class(settings.k_shot + settings.q_query)
    val.require_per_class(settings.val_shot + 1)
    if train.num_classes < settings.n_way:
        raise ValueError(f"the train split has {train.num_classes} classes; {settings.n_way}-way needs more")
    if val.num_classes < settings.val_way:
        raise ValueError(f"the val split has {val.num_classes} classes; {settings.val_way}-way needs more")
    return train, val


def validation_queries(settings: TrainSettings, val: FewShotDataset) -> int:
    """Queries per class for validation: VAL_QUERIES, or fewer when the smallest class is short."""
    return max(1, min(VAL_QUERIES, int(val.counts.min()) - settings.val_shot))


@torch.no_grad()
def evaluate(
    model: DMFNet,
    dataset: FewShotDataset,
    n_way: int,
    k_shot: int,
    episodes: int,
    seed: int,
    device: torch.device,
    q_query: int = 15,
    within_alphabet: bool = False,
    solver: str | None = None,
    steps: int | None = None,
    progress: bool = False,
    workers: int = 0,
    preprocess: PreprocessConfig | None = None,
) -> tuple[float, float]:
    """Mean accuracy and 95% CI over episodes (the official protocol: seed 112, 2000 episodes, 15 queries).

    Images go through `preprocess`, by default the model's own (with its evaluation crop, if any)."""
    model.eval()
    sampler = EpisodeSampler(dataset, n_way, k_shot, q_query, episodes, seed, within_alphabet=within_alphabet)
    data = EpisodeDataset(dataset, sampler, preprocess or model.config.preprocess, augment=None)
    loader = episode_loader(data, 1, workers=workers, pin=False)
    accuracies = []
    iterator = loader
    if progress:
        from rich.progress import track

        iterator = track(loader, description=f"{n_way}-way {k_shot}-shot", total=len(sampler))
    for batch in iterator:
        batch = batch.to(device)
        s = batch.support_sizes[0]
        scores = model.episode_scores(
            batch.images[:s], batch.support_labels[0], batch.images[s:], solver, steps
        )
        accuracies.append(float((scores.argmax(1) == batch.query_labels[0]).float().mean()))
    return confidence_interval(accuracies)


class Trainer:
    """`model_type`: DMFNet or a subclass with another few-shot loss (benchmarks/baselines.py's
    prototypical network, single-process only: DDP would wait for its unused DMF head's gradients);
    it is built from the settings' ModelConfig."""

    def __init__(
        self,
        settings: TrainSettings,
        out_dir: Path,
        device: torch.device | None = None,
        model_type: type[DMFNet] = DMFNet,
    ) -> None:
        self.settings, self.out_dir = settings, Path(out_dir)
        self.rank, self.world = _dist_info()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device is None:
            device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        elif device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)  # `--device cuda` under torchrun: one GPU per rank
        self.device = device
        self.train_set, self.val_set = open_splits(settings)  # bad data fails here, before any training
        self.val_queries = validation_queries(settings, self.val_set)
        # Built now (and discarded) so that a validation split that cannot give the episodes fails here.
        EpisodeSampler(
            self.val_set,
            settings.val_way,
            settings.val_shot,
            self.val_queries,
            settings.val_episodes,
            within_alphabet=settings.val_within_alphabet,
        )
        self.batches = rank_batches(settings, self.rank, self.world)  # refuses a batch ranks cannot split
        torch.manual_seed(settings.seed)
        self.model = model_type(model_config(settings, self.train_set.num_classes)).to(device)
        if self.world > 1 and device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif self.world > 1 and self.rank == 0:
            log.warning("DDP on %s: BatchNorm statistics are per rank (SyncBatchNorm needs CUDA)", device)
        if settings.init is not None:
            self.model.load_state_dict(initial_weights(settings.init, self.model.config).state_dict())
        self.loss = EpisodeLoss(self.model, amp=bf16_autocast(settings.amp, device), device_type=device.type)
        self.step_module: nn.Module = self.loss
        if self.world > 1:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.loss, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=True,
            weight_decay=settings.weight_decay,
        )
        # Every rank draws the same episodes (rank 0's stream) and trains on its share of each step.
        self.sampler = EpisodeSampler(
            self.train_set,
            settings.n_way,
            settings.k_shot,
            settings.q_query,
            settings.episodes_per_epoch,
            settings.seed,
            within_alphabet=settings.within_alphabet,
        )
        self.data = EpisodeDataset(
            self.train_set,
            self.sampler,
            self.model.config.preprocess,
            augment_config(settings, self.train_set),
        )
        self.steps_per_epoch = settings.steps_per_epoch()
        self.start_epoch, self.best_acc = 0, -1.0
        self.lr_history: list[float] = []  # one rate per optimizer step taken
        self.epoch_episodes: list[list[int]] = []  # episode numbers of each step of the last epoch, this rank

    # ----- persistence -----------------------------------------------------------------------------
    def resume(self, path: Path) -> None:
        """Continue from a last.pt: weights, optimizer (momentum), RNG state, epoch and best accuracy.

        The learning rate is a pure function of the global step, so (train k epochs, resume, train to
        N) gives the same rates and, on a deterministic device, the same weights as training to N.
        """
        model, meta = load_checkpoint_with_metadata(path)
        state = meta.get("resume")
        if not state:
            raise ValueError(f"{path} holds no training state to resume from (use last.pt)")
        if model.config != self.model.config:
            raise ValueError(
                f"{path} was trained with a different model ({model.config}); "
                f"these settings build {self.model.config}"
            )
        self.model.load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)  # dropout / DropBlock masks
        self.start_epoch, self.best_acc = int(state["epoch"]) + 1, float(state["best_acc"])
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    def _save(self, name: str, epoch: int, val: tuple[float, float] | None, with_state: bool) -> None:
        meta: dict[str, Any] = {
            "dataset": self.settings.dataset,
            "epoch": epoch,
            "accuracy": val[0] if val else None,  # None: this epoch was not validated
            "accuracy_ci95": val[1] if val else None,
            "validation": f"{self.settings.val_way}-way {self.settings.val_shot}-shot",
            "settings": asdict(self.settings),
        }
        if with_state:
            meta["resume"] = {
                "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "epoch": epoch,
                "best_acc": self.best_acc,
            }
        save_checkpoint(self.model, self.out_dir / name, **meta)

    # ----- the loop --------------------------------------------------------------------------------
    def fit(
        self, epochs: int | None = None, progress: bool = True, max_minutes: float | None = None
    ) -> dict[str, Any]:
        """Train to the end of the schedule; `max_minutes` stops early, after the epoch that crosses it."""
        s = self.settings
        total_epochs = s.epochs if epochs is None else epochs
        total_steps, warmup = s.epochs * self.steps_per_epoch, s.warmup_epochs * self.steps_per_epoch
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            log.info(
                "training on %s, world_size %d, %d train classes",
                self.device,
                self.world,
                self.train_set.num_classes,
            )
        last: dict[str, Any] = {}
        deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
        for epoch in range(self.start_epoch, total_epochs):
            if deadline is not None and time.monotonic() > deadline:
                log.info("time budget of %.1f min reached; stopping before epoch %d", max_minutes, epoch + 1)
                break
            self.sampler.set_epoch(epoch)
            self.model.train()
            started, sums, count, episodes = time.perf_counter(), {}, 0, 0
            loader = episode_loader(self.data, self.batches, s.workers, pin=self.device.type == "cuda")
            self.epoch_episodes = []
            batches = enumerate(loader)
            if progress and self.rank == 0:
                from rich.progress import track

                batches = track(
                    batches, total=self.steps_per_epoch, description=f"epoch {epoch + 1}/{total_epochs}"
                )
            for i, batch in batches:
                lr = learning_rate(epoch * self.steps_per_epoch + i, s.lr, warmup, total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.lr_history.append(lr)
                out = self.step_module(batch.to(self.device))
                self.optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                self.optimizer.step()
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                count += 1
                episodes += len(batch.support_sizes)  # the last batch may be short
                self.epoch_episodes.append(batch.episode_ids)
            metrics = _all_reduce_mean(
                {k: v / max(count, 1) for k, v in sums.items()}, self.device, self.world
            )
            elapsed = time.perf_counter() - started
            episodes_per_s = self.world * episodes / elapsed
            validate = s.validates_after(epoch + 1)  # by the schedule alone, so that resuming is exact
            if self.rank == 0:
                val = self._validate() if validate else None
                last = {
                    "epoch": epoch + 1,
                    "lr": lr,
                    **metrics,
                    "val_acc": val[0] if val else None,
                    "val_ci95": val[1] if val else None,
                    "episodes_per_s": episodes_per_s,
                    "seconds": elapsed,
                    "world_size": self.world,
                }
                if val is not None and val[0] > self.best_acc:
                    self.best_acc = val[0]
                    self._save("best.pt", epoch, val, with_state=False)
                self._save("last.pt", epoch, val, with_state=True)
                self._log(last)
            if validate:  # on every rank, so that all keep the same DropBlock rate
                count_dropblock_passes(self.model, -(-s.val_episodes // s.episodes_per_batch))
            if self.world > 1:
                dist.barrier()
        return last

    def _validate(self) -> tuple[float, float]:
        s = self.settings
        return evaluate(
            self.model,
            self.val_set,
            s.val_way,
            s.val_shot,
            s.val_episodes,
            seed=s.val_seed,
            device=self.device,
            q_query=self.val_queries,
            within_alphabet=s.val_within_alphabet,
            workers=s.workers,
        )

    def _log(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        log.info(line)
        path = self.out_dir / "metrics.jsonl"
        previous = path.read_bytes() if path.exists() else b""
        atomic_write_bytes(path, previous + line.encode() + b"\n")
        plot_metrics(path, self.out_dir / "curves.png")


def bf16_autocast(amp: bool, device: torch.device) -> bool:
    """Whether `amp` really autocasts the backbone to bf16 here: on CUDA, and on CPUs with bf16
    instructions (AVX-512 BF16, AMX). Elsewhere bf16 would be emulated or unsupported: fp32, said once."""
    if not amp:
        return False
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
        return True
    log.warning("--amp: no bf16 support on %s; training in fp32", device)
    return False


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (its own check; False where torch lacks it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def initial_weights(ckpt: str, config: ModelConfig) -> DMFNet:
    """The checkpoint `ckpt` ("demo": the packaged one) that training starts from: weights only, a fresh
    optimizer and schedule. It must build the network `config` builds, global classifier included;
    the solver and its steps may differ, and so may the preprocessing's `locate` rule (fine-tuning a
    model for camera frames)."""
    try:
        model = load_checkpoint(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"--init {ckpt}: {exc}") from exc
    ours, theirs = config.to_dict(), model.config.to_dict()
    for side in (ours, theirs):
        side["preprocess"].pop("locate", None)
    differ = sorted(
        key
        for key in set(ours) | set(theirs)
        if key not in ("solver", "steps", "rtol", "atol") and ours.get(key) != theirs.get(key)
    )
    if differ:
        details = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ)
        raise ValueError(f"--init {ckpt}: not the network these settings build ({details})")
    return model


def rank_batches(settings: TrainSettings, rank: int, world: int) -> list[list[int]]:
    """Episode numbers this rank trains on, step by step: its contiguous share of each step's episodes."""
    per_step, total = settings.episodes_per_batch, settings.episodes_per_epoch
    if world > 1 and (per_step % world or total % per_step):
        raise ValueError(
            f"{world} DDP ranks share each step's {per_step} episodes: episodes_per_batch must be a "
            f"multiple of the world size and episodes_per_epoch ({total}) a multiple of episodes_per_batch"
        )
    share = per_step // world
    return [
        list(range(first + rank * share, min(first + (rank + 1) * share, total)))
        for first in range(0, total, per_step)
    ]


def count_dropblock_passes(model: nn.Module, passes: int) -> None:
    """Advance the DropBlock ramp by `passes` backbone passes made outside training.

    The official ResNet-12 counts every forward pass, evaluation included, and ramps the drop rate
    over 40,000 of them; ours counts training passes, so validation passes are added here.
    """
    for block in model.modules():
        if isinstance(block, BasicBlock) and block.drop_rate > 0:
            block.num_batches_tracked += passes


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_mean(values: dict[str, float], device: torch.device, world: int) -> dict[str, float]:
    if world == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return {k: float(v) / world for k, v in zip(keys, tensor.tolist())}


def plot_metrics(jsonl: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["loss"] for r in rows], label="loss")
    ax_loss.plot(epochs, [r["fewshot_ce"] for r in rows], label="few-shot CE")
    ax_loss.plot(epochs, [r["global_ce"] for r in rows], label="global CE")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    validated = [r for r in rows if r["val_acc"] is not None]
    val_epochs = [r["epoch"] for r in validated]
    acc = np.array([r["val_acc"] for r in validated])
    ci = np.array([r["val_ci95"] for r in validated])
    ax_acc.plot(epochs, [r["accuracy"] for r in rows], label="train episodes")
    ax_acc.plot(val_epochs, acc, marker=".", label="validation")
    ax_acc.fill_between(val_epochs, acc - ci, acc + ci, alpha=0.3)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png)
