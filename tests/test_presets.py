"""The paper presets against the official code, value by value, through `dmf-train fit --dry-run`.

Every official value below is quoted from chmxu/Dynamic-Meta-filter (the code that produced the
published numbers) as file:line at the commit named, or from the code it says it is modified from.
  args_xent.py      @ 047246809002a98044ba179a7ee89db0955f23df  (miniImageNet arguments)
  args_tiered.py    @ 5dfd5850e2a34bbc2e9d0f4d7f9cdaa63a568454  (tieredImageNet arguments)
  train.py          @ 5dfd5850e2a34bbc2e9d0f4d7f9cdaa63a568454
  train_tiered.py   @ 5dfd5850e2a34bbc2e9d0f4d7f9cdaa63a568454
  torchFewShot/data_manager.py, torchFewShot/models/resnet_drop.py, torchFewShot/models/net.py
                    @ 77d23cadbdd7d3648449996516f72aa1828ddf84
  README.md         @ 047246809002a98044ba179a7ee89db0955f23df
  The validation episodes come from torchFewShot/dataset_loader/test_loader.py, which the official
  README ("We modify our code from Cross Attention Network") takes from blue-blue272/fewshot-CAN;
  quoted there @ a71a40576fd3e2311108c35dc852df4e4dedd8ad.
"""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from dmf_deploy.train.cli import main
from dmf_deploy.train.presets import PRESETS

WARMUP_EPOCHS = 5  # train.py:80 / train_tiered.py:81 `warmup_epoch = 5`; they run max_epoch + warmup_epoch
RAMP = 20 * 2000  # resnet_drop.py:125 keep_rate = max(1 - drop_rate / (20*2000) * num_batches_tracked, ...)
DROP_RATE = 0.1  # resnet_drop.py:136 ResNet.__init__(..., drop_rate=0.1, ...); resnet12() passes no other

# One row per dataset. 1-shot values are the argument defaults; 5-shot runs set --nExemplars 5 and
# --groups on the command line (README.md:32 and :38 "--groups {64/160/320/640} --nExemplars {1/5}").
OFFICIAL = {
    "mini": {
        "lr": 0.35,  # args_xent.py:29 '--lr' default=0.35
        "weight_decay": 5e-4,  # args_xent.py:31 '--weight-decay' default=5e-04
        "max_epoch": 90,  # args_xent.py:34 '--max-epoch' default=90
        "stepsize": 60,  # args_xent.py:38 '--stepsize' default=[60] (only used to pick validation epochs)
        "train_batch": 4,  # args_xent.py:41 '--train-batch' default=4 (episodes per step)
        "test_batch": 4,  # args_xent.py:43 '--test-batch' default=4 (episodes per backbone pass)
        "groups_1shot": 64,  # args_xent.py:50 '--groups' default=64
        "kernel": 1,  # args_xent.py:51 '--kernel' default=1
        "n_way": 5,  # args_xent.py:62 '--nKnovel' default=5
        "k_shot": 1,  # args_xent.py:64 '--nExemplars' default=1
        "train_queries": 6 * 5,  # args_xent.py:67 '--train_nTestNovel' default=6 * 5 (all classes)
        "train_epoch_size": 1200,  # args_xent.py:69 '--train_epoch_size' default=1200
        "test_queries": 15 * 5,  # args_xent.py:71 '--nTestNovel' default=15 * 5
        "epoch_size": 2000,  # args_xent.py:73 '--epoch_size' default=2000 (validation episodes)
        "image_size": 84,  # args_xent.py:19 / :21 '--height' / '--width' default=84
        # args_xent.py:13 '--load' default=True -> data_manager.py:23 branch: RandomCrop(84, padding=8)
        # (:25), ColorJitter(0.4, 0.4, 0.4) (:26), RandomHorizontalFlip (:27), RandomErasing(0.5) (:30);
        # the test transform (:33-36) only normalises: no resize, no crop.
        "crop": "pad",
        "pad": 8,
        "jitter": 0.4,
        "erase": 0.5,
        "eval_crop_from": None,
    },
    "tiered": {
        "lr": 0.05,  # args_tiered.py:29 '--lr' default=0.05
        "weight_decay": 5e-4,  # args_tiered.py:31 '--weight-decay' default=5e-04
        "max_epoch": 80,  # args_tiered.py:34 '--max-epoch' default=80
        "stepsize": 60,  # args_tiered.py:38 '--stepsize' default=[60]
        "train_batch": 4,  # args_tiered.py:43 '--train-batch' default=4
        "test_batch": 4,  # args_tiered.py:45 '--test-batch' default=4
        "groups_1shot": 64,  # args_tiered.py:53 '--groups' default=64
        "kernel": 1,  # args_tiered.py:54 '--kernel' default=1
        "n_way": 5,  # args_tiered.py:65 '--nKnovel' default=5
        "k_shot": 1,  # args_tiered.py:67 '--nExemplars' default=1
        "train_queries": 6 * 5,  # args_tiered.py:70 '--train_nTestNovel' default=6 * 5
        "train_epoch_size": 13980,  # args_tiered.py:72 '--train_epoch_size' default=13980
        "test_queries": 15 * 5,  # args_tiered.py:74 '--nTestNovel' default=15 * 5
        "epoch_size": 2000,  # args_tiered.py:76 '--epoch_size' default=2000
        "image_size": 84,  # args_tiered.py:19 / :21 '--height' / '--width' default=84
        # args_tiered.py:12 '--load' default=False, :13 '--cifar' -> data_manager.py:52 `else` branch:
        # RandomResizedCrop((84, 84)) (:54), ColorJitter(0.4, 0.4, 0.4) (:55), RandomHorizontalFlip
        # (:56), RandomErasing(0.5) (:59); test transform Resize((92, 92)) (:63), CenterCrop((84, 84)) (:64).
        "crop": "resized",
        "pad": None,
        "jitter": 0.4,
        "erase": 0.5,
        "eval_crop_from": 92,
    },
}
VAL_SEED = 112  # CAN test_loader.py:67 `seed = 112` (random.seed, np.random.seed), episodes drawn once at :73


def official_validation_epochs(max_epoch: int, stepsize: int) -> list[int]:
    """1-based epochs after which the official loop validates: train.py:89 / train_tiered.py:92
    `if epoch == 0 or epoch > (args.stepsize[0]-1) or (epoch + 1) % 10 == 0` over
    range(max_epoch + warmup_epoch) (train.py:84 / train_tiered.py:85)."""
    return [
        e + 1 for e in range(max_epoch + WARMUP_EPOCHS) if e == 0 or e > stepsize - 1 or (e + 1) % 10 == 0
    ]


def expected_settings(family: str, shots: int) -> dict[str, object]:
    o = OFFICIAL[family]
    epochs = o["max_epoch"] + WARMUP_EPOCHS
    steps = o["train_epoch_size"] // o["train_batch"]  # drop_last=True, batch_size=train_batch
    validations = official_validation_epochs(o["max_epoch"], o["stepsize"])
    # net.py:172-173: one backbone pass per batch of episodes; resnet_drop.py:100 counts every pass,
    # training and validation alike.
    passes = epochs * steps + len(validations) * math.ceil(o["epoch_size"] / o["test_batch"])
    expected = {
        "backbone": "resnet12",
        "lr": o["lr"],
        "weight_decay": o["weight_decay"],
        "epochs": epochs,
        "warmup_epochs": WARMUP_EPOCHS,
        "episodes_per_batch": o["train_batch"],
        "episodes_per_epoch": o["train_epoch_size"],
        "steps_per_epoch": steps,
        "total_steps": epochs * steps,
        "warmup_steps": WARMUP_EPOCHS * steps,
        "kernel": o["kernel"],
        "n_way": o["n_way"],
        "k_shot": shots,
        "q_query": o["train_queries"] // o["n_way"],
        "val_way": o["n_way"],
        "val_shot": shots,
        "val_episodes": o["epoch_size"],
        "val_seed": VAL_SEED,
        "validation_epochs": validations,
        "image_size": o["image_size"],
        "crop": o["crop"],
        "color_jitter": o["jitter"],
        "erase_prob": o["erase"],
        "eval_crop_from": o["eval_crop_from"],
        "amp": False,  # train.py / train_tiered.py train(): plain fp32, no autocast or GradScaler
        "dropblock_passes": passes,
        "final_drop_rate": DROP_RATE * min(1.0, passes / RAMP),
    }
    if o["pad"] is not None:
        expected["pad"] = o["pad"]
    if shots == 1:
        expected["groups"] = o["groups_1shot"]
    return expected


def dry_run(*args: str) -> dict[str, str]:
    result = CliRunner().invoke(main, [*args, "--dry-run"])
    assert result.exit_code == 0, (result.output, result.exception)
    return dict(line.split(": ", 1) for line in result.output.strip().splitlines())


def parse(text: str) -> object:
    """A printed value back to Python: numbers, None, booleans, and "1,10,60-62" ranges as lists."""
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    if "," in text or ("-" in text and text[0].isdigit()):
        out: list[int] = []
        for part in text.split(","):
            first, _, last = part.partition("-")
            out += range(int(first), int(last or first) + 1)
        return out
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@pytest.mark.parametrize(
    ("preset", "family", "shots"),
    [
        ("mini-1shot", "mini", 1),
        ("mini-5shot", "mini", 5),
        ("tiered-1shot", "tiered", 1),
        ("tiered-5shot", "tiered", 5),
    ],
)
def test_dry_run_prints_the_official_recipe(preset: str, family: str, shots: int) -> None:
    printed = {k: parse(v) for k, v in dry_run("fit", "--preset", preset).items()}
    for key, value in expected_settings(family, shots).items():
        assert printed[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    if shots == 5:
        assert printed["groups"] in (64, 160, 320, 640)  # README.md:32 / :38 "--groups {64/160/320/640}"


def test_official_schedule_figures_the_issue_quotes() -> None:
    """Sanity of the table itself against the figures worked out by hand from it."""
    tiered = expected_settings("tiered", 1)
    assert (tiered["total_steps"], tiered["warmup_steps"], tiered["steps_per_epoch"]) == (297075, 17475, 3495)
    mini = expected_settings("mini", 1)
    assert (mini["total_steps"], len(mini["validation_epochs"])) == (28500, 42)
    # counting training passes only, miniImageNet would end at drop rate 0.1 * 28500 / 40000 = 0.071
    assert mini["final_drop_rate"] == pytest.approx(0.1)
    assert round(0.1 * 28500 / RAMP, 3) == 0.071


def test_dry_run_applies_overrides_and_fit_is_the_default_subcommand() -> None:
    printed = dry_run("--preset", "tiered-1shot", "--epochs", "3", "--amp")
    assert printed["epochs"] == "3" and printed["amp"] == "True" and printed["total_steps"] == str(3 * 3495)
    assert printed["validation_epochs"] == "1,3"  # the first and the last epoch


@pytest.mark.parametrize("preset", ["omniglot-demo", "omniglot-demo-finetune", "glyphs-smoke"])
def test_demo_and_smoke_presets_keep_the_cheap_validation(preset: str) -> None:
    settings = PRESETS[preset]
    assert settings.val_episodes <= 150
    assert settings.validation_epochs() == list(range(1, settings.epochs + 1))


def test_every_fit_option_has_help_text() -> None:
    fit = main.commands["fit"]
    missing = [p.name for p in fit.params if not getattr(p, "help", None)]
    assert not missing, missing
