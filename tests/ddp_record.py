"""Train a tiny glyphs run and write what this process did to OUT/rank<R>.json.

Run alone (one process) or under `torchrun --nproc-per-node 2` (gloo, CPU) by
tests/test_training.py::test_two_gloo_ranks_take_one_process_steps_and_episodes.
Usage: python ddp_record.py OUT '{"episodes_per_epoch": 8, ...}'
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dmf_deploy.train.loop import Trainer
from dmf_deploy.train.presets import PRESETS


def main() -> None:
    out, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    settings = PRESETS["glyphs-smoke"].replace(**overrides)
    trainer = Trainer(settings, out / "run", torch.device("cpu"))
    trainer.fit(progress=False)
    record = {
        "world_size": trainer.world,
        "lr_history": trainer.lr_history,
        "last_epoch_episodes": trainer.epoch_episodes,
        # the classes of every episode of the last epoch, as this process's sampler draws them
        "last_epoch_classes": [ep.class_ids.tolist() for ep in trainer.sampler],
        "weights": float(sum(p.double().sum() for p in trainer.model.parameters())),
    }
    (out / f"rank{trainer.rank}.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
