"""Training throughput (episodes per second) for conv4 and ResNet-12 on glyph episodes.

    python benchmarks/train_throughput.py [--device cuda] [--seconds 20] [--demo]

Prints one row per (backbone, AMP) with the mean over timed steps after warm-up; AMP is bf16 autocast
of the backbone, on CUDA or on the CPU. --demo times the Omniglot demo model's episodes instead
(conv4, 56x56, 20-way 1-shot, 5 queries per class, dopri5 x 8; the data is still glyphs).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dmf_deploy.train.loop import Trainer
from dmf_deploy.train.presets import TrainSettings
from dmf_deploy.train.torchdata import episode_loader


def measure(settings: TrainSettings, device: torch.device, seconds: float, warmup: int = 2) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(settings, Path(tmp), device)
        trainer.model.train()
        loader = iter(
            episode_loader(
                trainer.data, settings.episodes_per_batch, settings.workers, pin=device.type == "cuda"
            )
        )
        batches = [next(loader).to(device) for _ in range(4)]  # data loading is not timed
        done, started = 0, 0.0
        while True:
            if done == warmup:
                _sync(device)
                started = time.perf_counter()
            out = trainer.step_module(batches[done % len(batches)])
            trainer.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            trainer.optimizer.step()
            done += 1
            if done > warmup + 1:
                _sync(device)
                if time.perf_counter() - started > seconds:
                    break
        elapsed = time.perf_counter() - started
        return (done - warmup) * settings.episodes_per_batch / elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--demo", action="store_true", help="the demo model's episodes (conv4 only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    # The paper's miniImageNet episode shape: 5-way 1-shot, 6 queries per class, 84x84.
    base = TrainSettings(
        dataset="glyphs",
        n_way=5,
        k_shot=1,
        q_query=6,
        episodes_per_batch=4,
        workers=2,
        image_size=84,
        solver="rk4-38",
        steps=1,
    )
    shape = "5-way 1-shot, 6 queries/class, 84x84, rk4-38/1"
    models = [("conv4", {"width": 64, "groups": 16}), ("resnet12", {"groups": 64})]
    if args.demo:
        base = base.replace(n_way=20, q_query=5, image_size=56, solver="dopri5", steps=8)
        shape, models = "20-way 1-shot, 5 queries/class, 56x56, dopri5/8", models[:1]
    rows = []
    for backbone, extra in models:
        for amp in (False, True):
            settings = base.replace(backbone=backbone, amp=amp, **extra)
            rows.append((backbone, amp, measure(settings, device, args.seconds)))
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (2 threads)'}")
    print(f"{'backbone':<10} {'AMP':<5} {'episodes/s':>10}   ({shape})")
    for backbone, amp, rate in rows:
        print(f"{backbone:<10} {'bf16' if amp else 'off':<5} {rate:>10.2f}")


if __name__ == "__main__":
    main()
