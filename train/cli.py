"""`dmf-train`: train a DMF (`dmf-train --preset NAME ...`) or evaluate one (`dmf-train eval ...`).

Several GPUs: `torchrun --nproc-per-node G -m dmf_deploy.train --preset mini-1shot ...`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import click

from dmf_deploy.cli_support import CliError, DmfCommand, DmfGroup, require_extra, version_option
from dmf_deploy.config import BACKBONES, LOCATE_RULES, SOLVERS, PreprocessConfig

from .datasets import KINDS
from .fewshot import SPLITS
from .presets import OFFICIAL_EVAL_SIZES, PRESETS, resolved_settings


class DefaultToFit(DmfGroup):
    """`dmf-train --preset X` means `dmf-train fit --preset X`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help", "--version")):
            args = ["fit", *args]
        return super().parse_args(ctx, args)


@click.group("dmf-train", cls=DefaultToFit, context_settings={"help_option_names": ["-h", "--help"]})
@version_option("dmf-train")
def main() -> None:
    """Train DMF few-shot classifiers, or evaluate a checkpoint under the official protocol."""


# Names 0.2 used, kept as hidden aliases: fit and eval now share --way/--shot/--queries, and -q/--quiet
# is every command's switch for progress output.
FIT_ALIASES = {"--n-way": "--way", "--k-shot": "--shot", "--q-query": "--queries", "--no-progress": "--quiet"}


@main.command(cls=DmfCommand, aliases=FIT_ALIASES)
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="omniglot-demo",
    show_default=True,
    help="Settings to start from; every other option overrides one of them.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("runs/dmf"),
    show_default=True,
    help="Folder for best.pt, last.pt, metrics.jsonl and curves.png.",
)
@click.option("--data-root", default=None, help="Dataset folder (or the folder of the Omniglot zips).")
@click.option("--dataset", type=click.Choice(KINDS), default=None, help="Dataset kind.")
@click.option("--epochs", type=int, default=None, help="Epochs in all, warm-up included.")
@click.option(
    "--warmup-epochs", type=click.IntRange(min=0), default=None, help="Epochs of linear warm-up."
)
@click.option("--episodes-per-epoch", type=int, default=None, help="Training episodes per epoch.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (after warm-up, before the decay).")
@click.option(
    "--solver",
    type=click.Choice(SOLVERS),
    default=None,
    help="Training solver, e.g. dopri5-adaptive (the paper) or rk4-38.",
)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps of a fixed-step solver.")
@click.option("--backbone", type=click.Choice(BACKBONES), default=None, help="Feature extractor.")
@click.option("--image-size", type=int, default=None, help="Network input side in pixels.")
@click.option("--groups", type=int, default=None, help="Channel groups of the meta-filter.")
@click.option("--width", type=int, default=None, help="conv4 channel width.")
@click.option("--workers", type=int, default=None, help="Data-loading processes per rank.")
@click.option("--val-episodes", type=int, default=None, help="Episodes per validation.")
@click.option(
    "--episodes-per-batch",
    type=int,
    default=None,
    help="Episodes per optimizer step, all DDP ranks together (each rank takes its share).",
)
@click.option("--kernel", type=int, default=None, help="Meta-filter kernel: 1 or 3.")
@click.option(
    "--dynamic-sampling/--no-dynamic-sampling",
    default=None,
    help="Deformable sampling of the meta-filter (the default), or the plain 3x3 neighbourhood.",
)
@click.option("--way", "n_way", type=int, default=None, help="Classes per training episode.")
@click.option("--shot", "k_shot", type=int, default=None, help="Support images per class in an episode.")
@click.option("--queries", "q_query", type=int, default=None, help="Query images per class in an episode.")
@click.option("--seed", type=int, default=None, help="Seed of the weights, episodes and augmentation.")
@click.option(
    "--amp/--no-amp",
    default=None,
    help="bf16 autocast of the backbone (CUDA, or a CPU with bf16). Default: the preset's.",
)
@click.option(
    "--affine", type=click.FloatRange(0, 2), default=None, help="Handwriting affine strength (0: off)."
)
@click.option(
    "--elastic", type=click.FloatRange(0, 0.1), default=None, help="Elastic amplitude, fraction of the side."
)
@click.option(
    "--stroke", type=click.FloatRange(0, 1), default=None, help="Probability of a stroke-width change."
)
@click.option(
    "--camera",
    type=click.FloatRange(0, 1),
    default=None,
    help="Probability that a training image becomes a simulated webcam frame (0: off).",
)
@click.option(
    "--locate",
    type=click.Choice(LOCATE_RULES),
    default=None,
    help='Frame rule: "drawing" finds the drawing in a camera frame; "none" takes the whole frame.',
)
@click.option(
    "--init", default=None, help='Checkpoint whose weights training starts from ("demo": the packaged one).'
)
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="last.pt to continue from.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (for logs).")
@click.option(
    "--max-minutes", type=float, default=None, help="Stop after the epoch that crosses this budget."
)
@click.option("--dry-run", is_flag=True, help="Print the resolved settings and exit; reads no data.")
def fit(
    preset: str,
    out_dir: Path,
    resume: Path | None,
    device: str | None,
    quiet: bool,
    max_minutes: float | None,
    dry_run: bool,
    **overrides,
) -> None:
    """Train with a preset; any option given overrides it. The default subcommand."""
    try:
        settings = PRESETS[preset].replace(**overrides)
        if resume is not None and settings.init is not None:
            raise ValueError("--init starts a new run and --resume continues one; give one of them")
    except ValueError as exc:
        raise CliError(str(exc), exit_code=2) from None
    if dry_run:  # needs no torch
        for key, value in resolved_settings(settings).items():
            click.echo(f"{key}: {value}")
        return
    require_extra("train", "torch", "torchdiffeq", "rich")
    import torch
    import torch.distributed as dist

    from dmf_deploy.checkpoint import CheckpointError

    from .datasets import DatasetError
    from .loop import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        target = torch.device(device) if device else None
        if target is not None and target.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here (use --device cpu)")
    except (ValueError, RuntimeError) as exc:
        raise CliError(str(exc), exit_code=2) from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and (target is None or target.type == "cuda")
        backend = "nccl" if on_gpu else "gloo"  # gloo: DDP on CPUs
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # Everything that can be wrong with the data, settings or --resume file fails here, before training.
    try:
        trainer = Trainer(settings, out_dir, target)
        if resume is not None:
            trainer.resume(resume)
    except (DatasetError, CheckpointError, ValueError, FileNotFoundError) as exc:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise CliError(str(exc), exit_code=2) from None
    result = trainer.fit(progress=not quiet, max_minutes=max_minutes)
    if trainer.rank == 0 and result:
        click.echo(
            f"final: epoch {result['epoch']} val {result['val_acc']:.2%} ± {result['val_ci95']:.2%}; "
            f"best.pt and last.pt in {out_dir}"
        )
    elif trainer.rank == 0 and trainer.start_epoch >= settings.epochs:
        click.echo(f"nothing to train: {resume} already holds all {settings.epochs} epochs")
    if dist.is_initialized():
        dist.destroy_process_group()


@main.command("eval", cls=DmfCommand)
@click.option("--ckpt", required=True, help='Checkpoint (ours or official), or "demo".')
@click.option("--dataset", type=click.Choice(KINDS), required=True, help="Dataset kind.")
@click.option("--data-root", default=None, help="Dataset folder (or the folder of the Omniglot zips).")
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True, help="Dataset split.")
@click.option("--way", type=int, default=5, show_default=True, help="Classes per episode.")
@click.option("--shot", type=int, default=1, show_default=True, help="Support images per class.")
@click.option("--queries", type=int, default=15, show_default=True, help="Query images per class.")
@click.option(
    "--episodes", type=int, default=2000, show_default=True, help="Test episodes (the CI shrinks as 1/sqrt)."
)
@click.option("--seed", type=int, default=112, show_default=True, help="Seed of the test episodes.")
@click.option(
    "--within-alphabet", is_flag=True, help="Omniglot: all classes of an episode from one alphabet."
)
@click.option(
    "--solver",
    type=click.Choice(SOLVERS),
    default=None,
    help="Solver to evaluate with (default: the checkpoint's).",
)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps of a fixed-step solver.")
@click.option(
    "--crop-from",
    type=int,
    default=None,
    help="Resize to this side, then centre-crop the input size (0: plain resize). Default: the "
    "checkpoint's rule, or the official 92 -> 84 for --dataset tiered when it has none.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (for logs).")
def evaluate_cmd(
    ckpt: str,
    dataset: str,
    data_root: str | None,
    split: str,
    way: int,
    shot: int,
    queries: int,
    episodes: int,
    seed: int,
    within_alphabet: bool,
    solver: str | None,
    steps: int | None,
    crop_from: int | None,
    quiet: bool,
) -> None:
    """Accuracy ± 95% CI under the official protocol (2000 episodes, seed 112, 15 queries per class)."""
    require_extra("train", "torch", "torchdiffeq", "rich")
    import torch

    from dmf_deploy.checkpoint import CheckpointError, load_checkpoint

    from .datasets import DatasetError, open_dataset
    from .episodes import EpisodeSampler
    from .loop import evaluate

    try:
        model = load_checkpoint(ckpt)
        model.resolve_solver(solver, steps)  # exact on a k = 3 model fails here, not after loading data
        preprocess = evaluation_preprocess(model.config.preprocess, dataset, crop_from)
        data = open_dataset(dataset, data_root, split)
        EpisodeSampler(data, way, shot, queries, episodes, seed)  # enough classes, images, episodes?
    except (CheckpointError, DatasetError, ValueError) as exc:
        raise CliError(str(exc), exit_code=2) from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mean, ci = evaluate(
        model.to(device),
        data,
        way,
        shot,
        episodes,
        seed,
        device,
        q_query=queries,
        within_alphabet=within_alphabet,
        solver=solver,
        steps=steps,
        progress=not quiet,
        workers=min(8, os.cpu_count() or 1),
        preprocess=preprocess,
    )
    sizes = f"resize {preprocess.crop_from or preprocess.image_size}"
    if preprocess.crop_from:
        sizes += f", centre crop {preprocess.image_size}"
    click.echo(
        f"{way}-way {shot}-shot{' within-alphabet' if within_alphabet else ''} on {dataset}/{split}: "
        f"{mean:.2%} ± {ci:.2%} ({episodes} episodes, seed {seed}); inputs: {sizes}"
    )


def evaluation_preprocess(
    model_rule: PreprocessConfig, dataset: str, crop_from: int | None
) -> PreprocessConfig:
    """The model's preprocessing with the evaluation crop asked for (`--crop-from`, 0 for none), else
    its own, else tieredImageNet's official 92 -> 84 (scaled to other input sizes) for tiered data."""
    if crop_from is None and model_rule.crop_from is None and dataset == "tiered":
        big, small = OFFICIAL_EVAL_SIZES
        crop_from = round(model_rule.image_size * big / small)
    if crop_from is None:
        return model_rule
    return replace(model_rule, crop_from=crop_from or None)  # PreprocessConfig refuses one below the size


if __name__ == "__main__":
    main()
