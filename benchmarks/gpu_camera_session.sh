#!/usr/bin/env bash
# The 0.3 demo model's GPU session (device tool; dmf_deploy/assets/README.md, stage four): stage four's
# camera fine-tune of the packaged demo.pt (its rate, epoch size and validation), for as long as a time
# budget allows rather than the ten epochs a CPU could afford. Camera frames are drawn on the CPU,
# so the data workers, not the GPU, set the pace: a probe times them first and the epoch count is sized
# to the time budget, so that the rate anneals to zero inside it.
# Expects the Omniglot zips in .data/omniglot and writes its results to $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
MINUTES=${TRAIN_MINUTES:-6}; DEVICE=${DEVICE:-cuda}; EVAL_EPISODES=${EVAL_EPISODES:-300}; EPISODES=${EPISODES_PER_EPOCH:-400}; WORKERS=${WORKERS:-$(($(nproc) - 1))}
PKG=/tmp/dmf_pkg; rm -rf $PKG; mkdir -p $PKG
# The machine has torch but no network: lay the package out by hand instead of pip install -e.
cp -r dmf_deploy $PKG/ && cp -r train $PKG/dmf_deploy/train && cp -r export $PKG/dmf_deploy/export \
  && cp -r runtime $PKG/dmf_deploy/runtime
export PYTHONPATH=$PKG
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; echo "cpus $(nproc), workers $WORKERS"
DATA=$(pwd)/.data/omniglot; cd /tmp  # leave the checkout so that $PKG is the package imported
# 1. The data pipeline's pace, episodes a second, with the preset's camera share.
RATE=$(python3 - "$DATA" "$WORKERS" "${PROBE_BATCHES:-30}" <<'PY'
import sys, time
from dmf_deploy.train.presets import PRESETS
from dmf_deploy.train.loop import open_splits, augment_config, model_config
from dmf_deploy.train.episodes import EpisodeSampler
from dmf_deploy.train.torchdata import EpisodeDataset, episode_loader
s = PRESETS["omniglot-demo-camera"].replace(data_root=sys.argv[1])
train, _ = open_splits(s)
sampler = EpisodeSampler(train, s.n_way, s.k_shot, s.q_query, 400, 0, within_alphabet=True)
data = EpisodeDataset(train, sampler, model_config(s, train.num_classes).preprocess, augment_config(s, train))
loader = iter(episode_loader(data, s.episodes_per_batch, int(sys.argv[2]), pin=False))
for _ in range(int(sys.argv[2]) + 2):  # every worker has delivered once
    next(loader)
start, n = time.perf_counter(), 0
for _ in range(int(sys.argv[3])):
    n += len(next(loader).support_sizes)
print(f"{n / (time.perf_counter() - start):.2f}")
PY
)
# 2. Epochs that fit the budget at that pace, with 15% of it kept for validation and start-up.
EPOCHS=$(python3 -c "print(max(2, int($MINUTES * 60 * 0.85 * $RATE / $EPISODES)))")
echo "data pace $RATE episodes/s -> $EPOCHS epochs of $EPISODES episodes"
python3 -m dmf_deploy.train --preset omniglot-demo-camera --init demo --data-root "$DATA" --quiet --device "$DEVICE" \
  --epochs "$EPOCHS" --episodes-per-epoch "$EPISODES" --val-episodes 60 --workers "$WORKERS" \
  --lr "${LR:-0.02}" --max-minutes "$(python3 -c "print($MINUTES + 0.5)")" --out /tmp/stage4 \
  > "$OUT/train.log" 2>&1
tail -3 "$OUT/train.log"
cp /tmp/stage4/best.pt "$OUT/best.pt"; cp /tmp/stage4/last.pt "$OUT/last.pt"
cp /tmp/stage4/metrics.jsonl "$OUT/metrics.jsonl"
# 3. Clean 20-way within-alphabet 1-shot on the test alphabets, the packaged model beside the new one
#    (torch, this GPU; the camera figures come from benchmarks/camera.py on the exported bundle).
python3 - "$DATA" "$WORKERS" "$OUT/best.pt" "$DEVICE" "$EVAL_EPISODES" <<'PY' | tee "$OUT/eval.txt"
import sys, torch
from dmf_deploy.train.presets import PRESETS
from dmf_deploy.train.loop import evaluate, initial_weights, model_config, open_splits
from dmf_deploy.train.datasets import open_dataset
s = PRESETS["omniglot-demo-camera"].replace(data_root=sys.argv[1])
train, _ = open_splits(s)
test = open_dataset("omniglot", sys.argv[1], "test")
for name in ("demo", sys.argv[3]):
    model = initial_weights(name, model_config(s, train.num_classes)).to(sys.argv[4])
    acc, ci = evaluate(model, test, 20, 1, int(sys.argv[5]), 112, torch.device(sys.argv[4]), within_alphabet=True,
                       workers=int(sys.argv[2]))
    print(f"{name}: test error {100 * (1 - acc):.2f} +- {100 * ci:.2f}%")
PY
