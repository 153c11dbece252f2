"""DMF against the baseline a user would pick instead, and the paper's own ablations, on Omniglot.

Four models, trained from scratch with one recipe (the same conv4 backbone, data, augmentation,
episodes, seed and number of steps; only the few-shot scoring differs):

- ``dmf``: the demo model's head (dynamic sampling, meta-filter, fixed-step dopri5 x 8);
- ``static``: no dynamic sampling, the meta-filter reads the plain 3x3 neighbourhood
  (``ModelConfig(dynamic_sampling=False)``);
- ``euler1``: one Euler step in place of the ODE (``--solver euler --steps 1``);
- ``protonet``: Snell et al.'s prototypical network, scores -||q - p||^2 between the flattened
  feature maps of the query and the class prototype.

Every model keeps the global-classifier term of the DMF loss, so the few-shot term is the only
difference. Then every model is scored on the same held-out episodes (Korean and Latin, within one
alphabet, one shot, 15 queries per class) at 5 and 20 ways, error +- 95% CI, and timed classifying
one frame with 20 classes enrolled on ONNX Runtime (2 threads).

    python benchmarks/baselines.py --out runs/baselines [--models dmf,static,euler1,protonet]
        [--data-root OMNIGLOT_DIR] [--epochs 5] [--episodes-per-epoch 320] [--episodes 600]
        [--device cpu] [--threads 1] [--val-episodes 100] [--train-only | --skip-training] [--json F]

A model whose ``final.pt`` exists in --out is not trained again, so models can be trained in separate
runs (one per CPU core, --train-only) and reported together (--skip-training); a final.pt trained
with another recipe is refused. final.pt holds the last epoch's weights: training's validation on
Greek (--val-episodes) is only printed, so it may be cut short without changing the models.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmf_deploy.checkpoint import load_checkpoint_with_metadata, save_checkpoint
from dmf_deploy.model import DMFNet
from dmf_deploy.train.augment import make_example
from dmf_deploy.train.datasets import FewShotDataset, open_dataset
from dmf_deploy.train.episodes import EpisodeSampler, confidence_interval
from dmf_deploy.train.loop import Trainer
from dmf_deploy.train.presets import PRESETS, TrainSettings

DEFAULT_ROOT = Path(os.environ.get("DMF_OMNIGLOT_DIR", "omniglot"))  # the folder of the Omniglot zips
MODELS = ("dmf", "static", "euler1", "protonet", "dmf+handwriting")
# The demo model's handwriting augmentation (its second stage's), for the "dmf+handwriting" row.
HANDWRITING = {k: getattr(PRESETS["omniglot-demo-finetune"], k) for k in ("affine", "elastic", "stroke")}
QUERIES = 15  # per class, as benchmarks/demo_accuracy.py and the official protocol
EVAL_SEED = 0  # the held-out episodes every model is scored on
BATCH = 128


class ProtoNet(DMFNet):
    """The prototypical network on DMFNet's backbone: one score per (query, class), the negative
    squared Euclidean distance between flattened feature maps (Snell et al.). The DMF head's weights
    exist but are never used, so checkpoints load like any DMFNet's."""

    # True: distances between mean-pooled feature vectors instead. Training always uses the flattened
    # maps; the report also scores the trained network pooled, on Greek, to say which is stronger.
    pooled = False

    def fewshot_scores(
        self, support_feats: torch.Tensor, support_labels: torch.Tensor, query_feats: torch.Tensor
    ) -> torch.Tensor:
        protos = self.prototypes(support_feats, support_labels)
        flat = (lambda t: t.mean(dim=(2, 3))) if self.pooled else (lambda t: t.flatten(1))
        # The difference, not cdist: cdist's |a|^2 + |b|^2 - 2ab shortcut loses digits on long vectors.
        return -(flat(query_feats)[:, None] - flat(protos)[None]).square().sum(dim=2)

    def fewshot_loss(
        self,
        support_feats: torch.Tensor,
        support_labels: torch.Tensor,
        query_feats: torch.Tensor,
        query_labels: torch.Tensor,
        solver: str | None = None,
        steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.fewshot_scores(support_feats, support_labels, query_feats)
        with torch.no_grad():
            accuracy = (scores.argmax(1) == query_labels).float().mean()
        return F.cross_entropy(scores, query_labels.long()), accuracy

    def episode_scores(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        solver: str | None = None,
        steps: int | None = None,
        form: str = "factored",
    ) -> torch.Tensor:
        """What training's validation calls: the prototypical scores, never the unused DMF head."""
        feats = self.features(torch.cat([support, query], dim=0))
        return self.fewshot_scores(feats[: support.shape[0]], support_labels, feats[support.shape[0] :])


def recipe(data_root: Path, epochs: int, episodes_per_epoch: int, val_episodes: int = 100) -> TrainSettings:
    """The shared recipe: the demo preset's episodes and augmentation, shortened to fit a CPU."""
    return PRESETS["omniglot-demo"].replace(
        data_root=str(data_root),
        epochs=epochs,
        warmup_epochs=1,
        episodes_per_epoch=episodes_per_epoch,
        val_episodes=val_episodes,
        val_every=0,
        val_all_after=epochs,  # validate after the first and the last epoch only
        workers=0,
        init=None,
    )


def model_settings(name: str, base: TrainSettings) -> tuple[TrainSettings, type[DMFNet]]:
    if name == "static":
        return base.replace(dynamic_sampling=False), DMFNet
    if name == "euler1":
        return base.replace(solver="euler", steps=1), DMFNet
    if name == "dmf+handwriting":
        return base.replace(**HANDWRITING), DMFNet
    return base, ProtoNet if name == "protonet" else DMFNet


def train(name: str, base: TrainSettings, out: Path, device: torch.device) -> None:
    settings, model_type = model_settings(name, base)
    folder = out / name
    started = time.perf_counter()
    trainer = Trainer(settings, folder, device, model_type=model_type)
    last = trainer.fit(progress=False)
    minutes = (time.perf_counter() - started) / 60
    save_checkpoint(trainer.model, folder / "final.pt", settings=asdict(settings), minutes=minutes, last=last)
    print(f"{name}: trained in {minutes:.1f} min, Greek val {last['val_acc']:.2%}", flush=True)


class StaleModelError(RuntimeError):
    """A final.pt in --out was trained with other settings than this run asks for."""


def load_model(name: str, out: Path, base: TrainSettings) -> tuple[DMFNet, dict]:
    """The trained model, refused if its recipe is not this run's. The data folder, worker count and
    validation settings aside: they do not change what is learnt (validation draws no training
    randomness, and final.pt is the last epoch's weights, whatever validation said)."""
    model, meta = load_checkpoint_with_metadata(out / name / "final.pt")
    wanted = asdict(model_settings(name, base)[0])
    trained = dict(meta.get("settings") or {})
    ignored = ("data_root", "workers", "val_episodes", "val_every", "val_all_after")
    differ = sorted(k for k in wanted if k not in ignored and trained.get(k) != wanted[k])
    if differ:
        raise StaleModelError(
            f"{out / name / 'final.pt'} was trained with other settings ({', '.join(differ)}); "
            "delete it or pass the settings it was trained with"
        )
    if name == "protonet":
        proto = ProtoNet(model.config)
        proto.load_state_dict(model.state_dict())
        model = proto.eval()
    return model, meta


@torch.no_grad()
def all_features(model: DMFNet, ds: FewShotDataset) -> torch.Tensor:
    """The backbone once per image, in eval mode (BatchNorm per image), as the runtime runs it."""
    out = []
    for start in range(0, len(ds), BATCH):
        batch = [
            make_example(ds.load(i), model.config.preprocess)
            for i in range(start, min(start + BATCH, len(ds)))
        ]
        out.append(model.features(torch.from_numpy(np.stack(batch))))
    return torch.cat(out)


@torch.no_grad()
def episode_errors(
    model: DMFNet, ds: FewShotDataset, feats: torch.Tensor, n_way: int, episodes: int
) -> tuple[float, float]:
    """Error and 95% CI over `episodes` within-alphabet 1-shot episodes of seed EVAL_SEED."""
    sampler = EpisodeSampler(ds, n_way, 1, QUERIES, episodes, EVAL_SEED, within_alphabet=True)
    accuracies = []
    for ep in sampler:
        support, labels = feats[ep.support_indices], torch.from_numpy(ep.support_labels)
        query = feats[ep.query_indices]
        if isinstance(model, ProtoNet):
            scores = model.fewshot_scores(support, labels, query)
        else:
            scores = model.head_scores(query, model.class_bank(model.prototypes(support, labels)))
        accuracies.append(float((scores.argmax(1).numpy() == ep.query_labels).mean()))
    accuracy, ci = confidence_interval(accuracies)
    return 1.0 - accuracy, ci


def median_ms(call, repeats: int) -> float:
    call()  # warm-up: ONNX Runtime allocates its arenas on the first run
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def frame_latency(name: str, model: DMFNet, ds: FewShotDataset, work: Path, repeats: int) -> float:
    """Median ms to classify one frame with 20 classes enrolled, ONNX Runtime CPU, 2 threads.

    DMF models: their exported bundle through Recognizer.classify. The prototypical network: its
    exported backbone.onnx, then the 20 distances in numpy (what a runtime for it would do)."""
    import onnxruntime as ort

    from dmf_deploy.export.bundle import DEFAULT_OPSET, export_bundle
    from dmf_deploy.export.graphs import BackboneGraph, example_inputs, export_graph
    from dmf_deploy.manifest import BACKBONE, graph_io
    from dmf_deploy.preprocess import preprocess_frames
    from dmf_deploy.runtime import Recognizer

    frames = [ds.load(int(ds.indices_by_class[c][0])) for c in range(21)]
    ckpt = work / f"{name}.pt"
    save_checkpoint(model, ckpt)
    if not isinstance(model, ProtoNet):
        bundle = export_bundle(ckpt, work / name, model.config.solver, model.config.steps, explain=False)
        rec = Recognizer.open(bundle, threads=2)
        for c in range(20):
            rec.enroll(f"class {c}", [frames[c]])
        return median_ms(lambda: rec.classify(frames[20]), repeats)
    spec = graph_io(model.config)[BACKBONE]
    path = work / "protonet_backbone.onnx"
    example = example_inputs(model, graph_io(model.config))[BACKBONE]
    export_graph(BackboneGraph(model), example, spec, path, DEFAULT_OPSET)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    pre = model.config.preprocess
    run = lambda batch: session.run(None, {"images": preprocess_frames(batch, pre)})[0]  # noqa: E731
    prototypes = run(frames[:20]).reshape(20, -1)

    def classify() -> int:
        query = run([frames[20]]).reshape(1, -1)
        return int(np.argmin(((query - prototypes) ** 2).sum(axis=1)))

    return median_ms(classify, repeats)


def report(names: list[str], out: Path, base: TrainSettings, episodes: int, repeats: int) -> list[dict]:
    import tempfile

    test = open_dataset("omniglot", base.data_root, "test", rotations=False)
    val = open_dataset("omniglot", base.data_root, "val", rotations=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            model, meta = load_model(name, out, base)
            feats = all_features(model, test)
            row = {"model": name, "train minutes": meta.get("minutes")}
            for way in (5, 20):
                row[f"{way}-way error"], row[f"{way}-way ci95"] = episode_errors(
                    model, test, feats, way, episodes
                )
            val_feats = all_features(model, val)
            row["greek 20-way error"] = episode_errors(model, val, val_feats, 20, episodes)[0]
            if isinstance(model, ProtoNet):
                model.pooled = True
                row["greek 20-way error, mean-pooled"] = episode_errors(model, val, val_feats, 20, episodes)[
                    0
                ]
                model.pooled = False
            row["ms at N=20"] = frame_latency(name, model, test, Path(tmp), repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def print_table(rows: list[dict], settings: TrainSettings, episodes: int) -> None:
    print(
        f"\nconv4 {settings.width} ch, {settings.image_size} px; {settings.epochs} epochs x "
        f"{settings.steps_per_epoch()} steps of {settings.episodes_per_batch} {settings.n_way}-way episodes; "
        f"lr {settings.lr}, seed {settings.seed}, {'bf16 autocast' if settings.amp else 'fp32'} where "
        f"supported; held-out Korean + Latin, within one alphabet, 1 shot, {QUERIES} queries/class, "
        f"{episodes} episodes (seed {EVAL_SEED}, the same for every model); error +- 95% CI\n"
    )
    print("| model | 5-way error | 20-way error | Greek 20-way (val) | ms / frame at N = 20 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['5-way error']:.2%} ± {r['5-way ci95']:.2%} | "
            f"{r['20-way error']:.2%} ± {r['20-way ci95']:.2%} | {r['greek 20-way error']:.2%} | "
            f"{r['ms at N=20']:.2f} |"
        )
    for r in rows:
        if "greek 20-way error, mean-pooled" in r:
            print(
                f"\n{r['model']} scored on mean-pooled features instead (trained flattened): Greek 20-way "
                f"error {r['greek 20-way error, mean-pooled']:.2%} against {r['greek 20-way error']:.2%}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--episodes-per-epoch", type=int, default=320)
    parser.add_argument("--episodes", type=int, default=600, help="held-out episodes per task")
    parser.add_argument(
        "--val-episodes", type=int, default=100, help="Greek episodes of training's validation"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads while training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=200, help="timed frames per model")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--skip-training", action="store_true", help="report the models in --out")
    parser.add_argument("--train-only", action="store_true", help="train the missing models, no report")
    args = parser.parse_args()
    names = [m for m in args.models.split(",") if m]
    unknown = set(names) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = recipe(args.data_root, args.epochs, args.episodes_per_epoch, args.val_episodes)
    for name in names:
        if not args.skip_training and not (args.out / name / "final.pt").exists():
            train(name, base, args.out, torch.device(args.device))
    if args.train_only:
        return
    torch.set_num_threads(2)
    present = [n for n in names if (args.out / n / "final.pt").exists()]
    missing = sorted(set(names) - set(present))
    if missing:
        print(f"not trained, so not reported: {', '.join(missing)}", flush=True)
    rows = report(present, args.out, base, args.episodes, args.repeats)
    print_table(rows, base, args.episodes)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
