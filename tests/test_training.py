"""Training, end to end on CPU: learning, exact resume, DDP over gloo, input errors, eval, metrics.

Everything here runs on glyphs (procedural, no download) with the `glyphs-smoke` preset made smaller
(conv4 width 16, 32x32 input), so the file stays within about a minute on two CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from optional_imports import torchvision_or_skip

torch = pytest.importorskip("torch")
torchvision_or_skip()
pytest.importorskip("torchdiffeq")
pytest.importorskip("matplotlib")

import torch.distributed as dist  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from dmf_deploy import load_checkpoint  # noqa: E402
from dmf_deploy.backbones import BasicBlock  # noqa: E402
from dmf_deploy.checkpoint import load_checkpoint_with_metadata  # noqa: E402
from dmf_deploy.train.cli import main  # noqa: E402
from dmf_deploy.train.loop import METRIC_KEYS, Trainer, evaluate, model_config, rank_batches  # noqa: E402
from dmf_deploy.train.presets import PRESETS, resolved_settings  # noqa: E402
from dmf_deploy.train.schedule import learning_rate  # noqa: E402

CPU = torch.device("cpu")
SMALL = {"width": 16}  # glyphs-smoke is conv4 at 32x32 with 8 groups; 16 channels is plenty for glyphs
PCT = r"(\d+\.\d+)% ± (\d+\.\d+)%"  # how dmf-train prints "accuracy ± CI"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread. These convolutions are tiny, and on a loaded 2-core machine two spinning
    OpenMP threads made the smoke run 8x slower (measured: 133 s against 17 s). One thread also gives
    the most reproducible floating-point sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----- 1. a short run learns ---------------------------------------------------------------------------
# 4 epochs x 40 episodes of 5-way 1-shot 4-query glyphs (lr 0.1), validated on 30 episodes x 75 queries
# of unseen classes. Measured while writing this test, seeds 0-5 with these settings, one thread:
#   trained:                 final val_acc 0.59-0.72 (seed 0: 0.66); loss falls by 0.48-0.70 (epoch 1->4)
#   untrained (initial net): val_acc 0.22-0.28 on the same episodes
#   lr ~ 0 (only BatchNorm statistics adapt): final val_acc 0.43-0.54; loss moves by -0.04..+0.02
# So accuracy alone cannot prove that the optimiser works (BatchNorm statistics alone lift it to ~0.5);
# the loss can. The bounds: a loss fall of >= 0.2 (less than half the smallest trained fall, 5x the
# largest drift with lr ~ 0), val_acc >= 0.45 (far above chance, 0.20, and the initial network; 0.14
# below the worst trained seed) and >= 0.15 above the initial network (trained gains are >= 0.3). The
# seed is fixed and CPU training is deterministic, so on one machine the run is the same every time;
# the margins cover another BLAS, thread count or seed.
LEARN = PRESETS["glyphs-smoke"].replace(
    epochs=4, episodes_per_epoch=40, lr=0.1, val_episodes=30, seed=0, **SMALL
)
MIN_VAL_ACC, MIN_GAIN, MIN_LOSS_FALL = 0.45, 0.15, 0.2


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One short training run shared by the learning, metrics and eval tests."""
    out = tmp_path_factory.mktemp("smoke")
    trainer = Trainer(LEARN, out, CPU)
    untrained, _ = evaluate(
        trainer.model, trainer.val_set, LEARN.val_way, LEARN.val_shot, LEARN.val_episodes, 1, CPU,
        q_query=trainer.val_queries,
    )  # fmt: skip
    final = trainer.fit(progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, trainer, untrained, final, rows


def test_short_cpu_run_learns(smoke_run):
    out, trainer, untrained, final, rows = smoke_run
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert final == rows[-1]
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - MIN_LOSS_FALL, f"loss did not fall: {losses}"
    assert rows[-1]["fewshot_ce"] < rows[0]["fewshot_ce"], "the few-shot term did not fall"
    acc = rows[-1]["val_acc"]
    assert acc >= MIN_VAL_ACC, f"validation accuracy {acc:.3f} (chance 0.20, untrained {untrained:.3f})"
    assert acc >= untrained + MIN_GAIN, f"validation accuracy {acc:.3f} vs untrained {untrained:.3f}"
    # best.pt holds the best epoch's weights and says so; its accuracy is reproducible from the file.
    model, meta = load_checkpoint_with_metadata(out / "best.pt")
    best = max(rows, key=lambda r: r["val_acc"])
    assert meta["epoch"] + 1 == best["epoch"] and meta["accuracy"] == best["val_acc"]
    again, _ = evaluate(model, trainer.val_set, 5, 1, LEARN.val_episodes, 1, CPU, q_query=trainer.val_queries)
    assert again == pytest.approx(best["val_acc"], abs=1e-6)


# ----- 6. metrics ---------------------------------------------------------------------------------------
def test_metrics_lines_have_the_documented_keys_and_curves_png_is_an_image(smoke_run):
    out, trainer, *_, rows = smoke_run
    for row in rows:
        assert set(row) == set(METRIC_KEYS)
        assert row["world_size"] == 1 and row["episodes_per_s"] > 0 and row["seconds"] > 0
        assert 0 <= row["val_acc"] <= 1 and 0 <= row["accuracy"] <= 1 and row["val_ci95"] > 0
        assert row["loss"] == pytest.approx(
            row["global_ce"] + _fewshot_weight() * row["fewshot_ce"], rel=1e-5
        )
    # the last step's rate of each epoch, from the schedule
    steps = trainer.steps_per_epoch
    for row in rows:
        expected = learning_rate(
            row["epoch"] * steps - 1, LEARN.lr, LEARN.warmup_epochs * steps, LEARN.epochs * steps
        )
        assert row["lr"] == pytest.approx(expected, rel=1e-12)
    png = cv2.imread(str(out / "curves.png"))
    assert png is not None and png.ndim == 3 and min(png.shape[:2]) > 100
    assert png.std() > 5  # something is drawn
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl"]


def _fewshot_weight() -> float:
    h = w = 32 // 8  # conv4 at 32x32 -> 4x4 maps; the default weight 0.5 hw/((h+2)(w+2))
    return 0.5 * h * w / ((h + 2) * (w + 2))


def test_validation_runs_on_the_scheduled_epochs_only(tmp_path):
    """val_every 3: epochs 1 (the first), 3 and 4 (the last) are validated, epoch 2 is not; best.pt
    comes from a validated epoch, last.pt from every epoch."""
    settings = PRESETS["glyphs-smoke"].replace(
        epochs=4, episodes_per_epoch=4, val_episodes=2, val_every=3, val_all_after=10, **SMALL
    )
    trainer = Trainer(settings, tmp_path, CPU)
    trainer.fit(progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_acc"] is not None for r in rows] == [True, False, True, True]
    assert rows[1]["val_ci95"] is None and rows[1]["loss"] > 0
    _, best = load_checkpoint_with_metadata(tmp_path / "best.pt")
    _, last = load_checkpoint_with_metadata(tmp_path / "last.pt")
    assert best["epoch"] + 1 in (1, 3, 4) and last["epoch"] == 3 and last["accuracy"] == rows[3]["val_acc"]
    assert cv2.imread(str(tmp_path / "curves.png")) is not None


def test_tiered_models_carry_the_official_evaluation_crop():
    assert model_config(PRESETS["tiered-5shot"], 351).preprocess.crop_from == 92
    assert model_config(PRESETS["mini-1shot"], 64).preprocess.crop_from is None


# ----- 2. resume ----------------------------------------------------------------------------------------
RESUME = PRESETS["glyphs-smoke"].replace(
    epochs=3, warmup_epochs=1, episodes_per_epoch=6, val_episodes=3, workers=0, seed=3, **SMALL
)


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    """(train 3 epochs) == (train k, stop, new Trainer resumes from last.pt, train to 3): same learning
    rates and bit-identical weights, momentum buffers and validation numbers. Exact equality holds on
    CPU because the episodes, augmentations and schedule are pure functions of (seed, epoch, index,
    step) and the RNG state travels in last.pt. Stopping after epoch 1 resumes right at the end of
    the warm-up, with two epochs (6 steps) of cosine decay and momentum still to go."""
    stop_after = 1
    full = Trainer(RESUME, tmp_path / "full", CPU)
    full.fit(progress=False)

    first = Trainer(RESUME, tmp_path / "parts", CPU)
    first.fit(epochs=stop_after, progress=False)  # the schedule still spans all 3 epochs
    del first
    second = Trainer(RESUME, tmp_path / "parts", CPU)
    second.resume(tmp_path / "parts" / "last.pt")
    assert second.start_epoch == stop_after
    second.fit(progress=False)

    steps = full.steps_per_epoch
    total, warmup = RESUME.epochs * steps, RESUME.warmup_epochs * steps
    expected = [learning_rate(i, RESUME.lr, warmup, total) for i in range(total)]
    assert len(full.lr_history) == total
    assert full.lr_history == expected
    # first's history was lost with it; a fresh Trainer replays it from the same pure schedule
    assert expected[: stop_after * steps] + second.lr_history == full.lr_history
    assert len(second.lr_history) == (RESUME.epochs - stop_after) * steps

    a, b = full.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ after resume: {differ[:5]}"
    mom_a = [full.optimizer.state[p]["momentum_buffer"] for p in full.model.parameters()]
    mom_b = [second.optimizer.state[p]["momentum_buffer"] for p in second.model.parameters()]
    assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b, strict=True))
    # the files agree too: last.pt weights, and every line of metrics.jsonl except the timings
    disk_a = load_checkpoint(tmp_path / "full" / "last.pt").state_dict()
    disk_b = load_checkpoint(tmp_path / "parts" / "last.pt").state_dict()
    assert all(torch.equal(disk_a[k], disk_b[k]) for k in disk_a)
    timing = {"episodes_per_s", "seconds"}
    rows_a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b) and len(rows_a) == RESUME.epochs
    assert second.best_acc == full.best_acc


def test_resume_refuses_a_checkpoint_without_training_state_or_of_another_model(smoke_run, tmp_path):
    out, *_ = smoke_run
    trainer = Trainer(LEARN, tmp_path, CPU)
    with pytest.raises(ValueError, match="no training state"):
        trainer.resume(out / "best.pt")
    other = Trainer(LEARN.replace(width=8), tmp_path, CPU)
    with pytest.raises(ValueError, match="different model"):
        other.resume(out / "last.pt")
    result = _fit(["--resume", str(out / "best.pt")], tmp_path / "cli")
    _assert_refused(result, tmp_path / "cli", "no training state")
    # a finished run resumed again has nothing left to do, and says so
    result = _fit(["--resume", str(out / "last.pt")], tmp_path / "done")
    assert result.exit_code == 0 and "nothing to train" in result.output, result.output
    assert not list(tmp_path.glob("done/*"))  # and writes nothing


# ----- 3. DDP on CPU (gloo, 2 processes) ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_ddp_on_cpu_with_gloo_writes_one_checkpoint_set(tmp_path):
    out = tmp_path / "ddp"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "dmf_deploy.train", "--preset", "glyphs-smoke", "--device", "cpu", "--out", str(out),
        "--epochs", "1", "--episodes-per-epoch", "8", "--val-episodes", "4", "--width", "16",
        "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "world_size 2" in log
    # rank 0 alone logs, evaluates, saves and prints (each rank's stderr reaches this log)
    assert log.count("final: epoch 1") == 1 and log.count('"world_size": 2') == 1
    # one set of files, written once by rank 0: no per-rank copies, no temporary leftovers
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["world_size"] == 2 and rows[0]["epoch"] == 1
    # the checkpoint holds the plain model, not the DDP wrapper (no "module." prefix)
    model, meta = load_checkpoint_with_metadata(out / "last.pt")
    assert not any(k.startswith("module.") for k in model.state_dict())
    assert meta["resume"]["epoch"] == 0 and meta["settings"]["episodes_per_epoch"] == 8
    assert not list(tmp_path.glob("**/*.tmp*"))


DDP_RUN = {"episodes_per_batch": 4, "episodes_per_epoch": 8, "epochs": 2, "val_episodes": 2, "width": 8}


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_two_gloo_ranks_take_one_process_steps_and_episodes(tmp_path):
    """N ranks reproduce one process's recipe: 4 episodes per step across both ranks (2 each), the
    same number of optimizer steps at the same learning rates, and between them the same episodes."""
    script, settings = str(Path(__file__).with_name("ddp_record.py")), json.dumps(DDP_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, script, str(tmp_path / "one"), settings], env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-4000:]
    port = _free_port()
    two = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            script, str(tmp_path / "two"), settings,
        ],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert single["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]
    steps = DDP_RUN["epochs"] * DDP_RUN["episodes_per_epoch"] // DDP_RUN["episodes_per_batch"]
    assert len(single["lr_history"]) == steps  # 2 epochs x 2 steps of 4 episodes
    for rank in ranks:
        assert rank["lr_history"] == single["lr_history"]  # same steps, same rates
        assert rank["last_epoch_classes"] == single["last_epoch_classes"]  # the same episode stream
    # step by step, rank 0 took the first two of the single process's four episodes, rank 1 the rest
    assert single["last_epoch_episodes"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    shares = zip(ranks[0]["last_epoch_episodes"], ranks[1]["last_epoch_episodes"], strict=True)
    assert [a + b for a, b in shares] == single["last_epoch_episodes"]
    assert all(len(step) == 2 for r in ranks for step in r["last_epoch_episodes"])
    # DDP kept the two replicas identical (summed weights agree to float64 rounding of equal tensors)
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_an_odd_split_of_episodes_over_ranks_is_refused():
    with pytest.raises(ValueError, match="multiple of the world size"):
        rank_batches(PRESETS["mini-1shot"], rank=0, world=3)
    with pytest.raises(ValueError, match="multiple of episodes_per_batch"):
        rank_batches(PRESETS["mini-1shot"].replace(episodes_per_epoch=1202), rank=1, world=2)
    assert rank_batches(PRESETS["mini-1shot"], rank=1, world=4)[:2] == [[1], [5]]


# ----- DropBlock ramp: every backbone pass counts, validation included, as in the official code ----------
def test_dropblock_ramp_counts_validation_passes(tmp_path):
    """1 epoch = 1 training step (2 episodes) + validation of 3 episodes, counted as ceil(3 / 2) = 2
    passes (the official test loader feeds episodes_per_batch episodes a pass). BatchNorm's own
    counters see the training steps only. ResNet-12 at 16x16 keeps this to a few seconds."""
    settings = PRESETS["glyphs-smoke"].replace(
        backbone="resnet12", image_size=16, groups=64, q_query=1, episodes_per_batch=2,
        episodes_per_epoch=2, epochs=2, warmup_epochs=1, val_episodes=3,
    )  # fmt: skip
    trainer = Trainer(settings, tmp_path, CPU)
    trainer.fit(progress=False)
    blocks = [m for m in trainer.model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 4
    assert [int(b.num_batches_tracked) for b in blocks] == [2 * (1 + 2)] * 4
    assert int(blocks[0].bn1.num_batches_tracked) == 2
    resolved = resolved_settings(settings)
    assert resolved["dropblock_passes"] == 6 and resolved["final_drop_rate"] == pytest.approx(0.1 * 6 / 40000)


# ----- 4. bad input fails before training, with exit code 2 and a clear message -------------------------
def _write_folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                assert cv2.imwrite(str(root / split / name / f"{i:03d}.png"), image)
    return root


def _fit(args: list[str], out: Path):
    base = ["--preset", "glyphs-smoke", "--device", "cpu", "--no-progress", "--width", "16"]
    return CliRunner().invoke(main, [*base, "--out", str(out), *args])


def _assert_refused(result, out: Path, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.output.startswith("dmf-train: error: "), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # nothing written: training never started


def test_wrong_dataset_path_is_refused_before_training(tmp_path):
    out = tmp_path / "out"
    result = _fit(["--dataset", "folder", "--data-root", str(tmp_path / "nonexistent")], out)
    _assert_refused(result, out, str(tmp_path / "nonexistent"), "does not exist")


def test_class_with_fewer_images_than_shots_plus_queries_is_refused(tmp_path):
    classes = {f"c{i}": 7 for i in range(5)}
    root = _write_folder(tmp_path / "data", {"train": {**classes, "short": 2}, "val": classes})
    out = tmp_path / "out"
    result = _fit(["--dataset", "folder", "--data-root", str(root), "--k-shot", "1", "--q-query", "6"], out)
    _assert_refused(result, out, "'short' has 2 images", "7 are needed")


@pytest.mark.parametrize("val", ["missing", "empty"])
def test_empty_or_missing_split_is_refused(tmp_path, val):
    classes = {f"c{i}": 7 for i in range(5)}
    layout = {"train": classes, **({"val": {}} if val == "empty" else {})}
    root = _write_folder(tmp_path / "data", layout)
    if val == "empty":
        (root / "val" / "no_images_here").mkdir()
    out = tmp_path / "out"
    result = _fit(["--dataset", "folder", "--data-root", str(root)], out)
    _assert_refused(result, out, str(root / "val"), "does not exist" if val == "missing" else "is empty")


def test_short_validation_classes_do_not_crash_after_the_first_epoch(tmp_path):
    """Validation used 15 queries per class while the check at start-up asked for only val_shot + 1
    images: 5-image validation classes passed it and then crashed at the end of epoch 1. Validation now
    uses as many queries as the smallest class allows."""
    classes = {f"c{i}": 5 for i in range(5)}
    root = _write_folder(tmp_path / "data", {"train": classes, "val": classes})
    out = tmp_path / "out"
    result = _fit(
        ["--dataset", "folder", "--data-root", str(root), "--epochs", "1", "--episodes-per-epoch", "2",
         "--val-episodes", "2", "--image-size", "24"],
        out,
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "last.pt").is_file()


@pytest.mark.parametrize(
    ("device", "fragment"),
    [
        ("nonsense", "nonsense"),
        pytest.param(
            "cuda",
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
        ),
    ],
)
def test_bad_device_is_refused_before_training(tmp_path, device, fragment):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--preset", "glyphs-smoke", "--device", device, "--out", str(out)])
    _assert_refused(result, out, fragment)


def test_bad_resume_file_is_refused_before_training(tmp_path):
    out = tmp_path / "out"
    result = _fit(["--epochs", "1", "--resume", str(tmp_path / "missing.pt")], out)
    _assert_refused(result, out, "missing.pt", "does not exist")


# ----- 5. dmf-train eval --------------------------------------------------------------------------------
def test_eval_prints_accuracy_and_ci_for_our_checkpoint(smoke_run):
    out, trainer, *_ = smoke_run
    args = ["eval", "--ckpt", str(out / "best.pt"), "--dataset", "glyphs", "--split", "test"]
    result = CliRunner().invoke(main, [*args, "--episodes", "20"])
    assert result.exit_code == 0, (result.output, result.exception)
    line = result.output.strip().splitlines()[-1]
    assert "5-way 1-shot on glyphs/test" in line and "(20 episodes, seed 112)" in line
    mean, ci = (float(v) / 100 for v in re.search(PCT, line).groups())
    # Unseen glyph classes; chance is 0.20. This checks that eval runs the protocol and prints the numbers,
    # with a loose bound (test_short_cpu_run_learns is the one that shows learning).
    assert mean > 0.35 and 0 < ci < 0.2


def test_eval_works_for_an_official_checkpoint(tmp_path):
    """An official ResNet-12 checkpoint (random weights, official key names, legacy format) evaluates at
    84x84. ResNet-12 is slow on CPU, hence 2 episodes of 2-way 1-shot 1-query (about 2 s)."""
    tc = pytest.importorskip("test_checkpoint")
    state = tc.add_official_head(tc.official_base_state(seed=5), groups=64, kernel=1, feature_rms=1.0, seed=6)
    path = tc.save_official(tmp_path / "best_model.pth.tar", state)
    args = ["eval", "--ckpt", str(path), "--dataset", "glyphs", "--split", "test", "--episodes", "2"]
    result = CliRunner().invoke(main, [*args, "--way", "2", "--queries", "1"])
    assert result.exit_code == 0, (result.output, result.exception)
    line = result.output.strip().splitlines()[-1]
    assert "2-way 1-shot on glyphs/test" in line and "(2 episodes, seed 112)" in line
    mean, ci = (float(v) / 100 for v in re.search(PCT, line).groups())
    assert mean * 4 == pytest.approx(round(mean * 4), abs=1e-3) and ci >= 0  # 2 episodes x 2 queries


def test_eval_on_tiered_data_resizes_then_centre_crops_as_the_official_test(smoke_run, tmp_path):
    """--dataset tiered adds the official 92 -> 84 crop, scaled to this 32-pixel model (round(32 *
    92 / 84) = 35), unless --crop-from says otherwise; other data keep the model's plain resize."""
    out, *_ = smoke_run
    root = _write_folder(tmp_path / "tiered", {"test": {f"c{i}": 2 for i in range(2)}})
    base = ["eval", "--ckpt", str(out / "best.pt"), "--data-root", str(root), "--episodes", "2"]
    base += ["--way", "2", "--queries", "1"]
    cases = [
        (["--dataset", "tiered"], "inputs: resize 35, centre crop 32"),
        (["--dataset", "tiered", "--crop-from", "0"], "inputs: resize 32"),
        (["--dataset", "folder"], "inputs: resize 32"),
        (["--dataset", "folder", "--crop-from", "40"], "inputs: resize 40, centre crop 32"),
    ]
    for args, expected in cases:
        result = CliRunner().invoke(main, [*base, *args])
        assert result.exit_code == 0, (args, result.output, result.exception)
        assert result.output.strip().splitlines()[-1].endswith(expected), (args, result.output)
    result = CliRunner().invoke(main, [*base, "--dataset", "tiered", "--crop-from", "20"])
    assert result.exit_code == 2 and "crop_from must be >= image_size 32" in result.output, result.output


def test_eval_refuses_bad_requests_before_evaluating(smoke_run, tmp_path):
    out, *_ = smoke_run
    ckpt = str(out / "best.pt")
    cases = [
        (["--ckpt", str(tmp_path / "nope.pt"), "--dataset", "glyphs"], "does not exist"),
        (["--ckpt", ckpt, "--dataset", "folder", "--data-root", str(tmp_path / "x")], "does not exist"),
        (["--ckpt", ckpt, "--dataset", "glyphs", "--way", "50"], "50-way"),
        (["--ckpt", ckpt, "--dataset", "glyphs", "--queries", "30"], "are needed"),
    ]
    for args, fragment in cases:
        result = CliRunner().invoke(main, ["eval", *args, "--episodes", "2"])
        assert result.exit_code == 2 and result.output.startswith("dmf-train: error: "), (args, result.output)
        assert fragment in result.output, (args, result.output)
    result = CliRunner().invoke(main, ["eval", "--ckpt", ckpt, "--dataset", "glyphs", "--solver", "nonsense"])
    assert result.exit_code == 2 and "'nonsense' is not one of" in result.output, result.output
