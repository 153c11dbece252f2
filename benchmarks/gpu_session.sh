#!/usr/bin/env bash
# The one prepared GPU session (device tool; see README "Training the demo model"):
#   1. CUDA training throughput, AMP off/on, conv4 and ResNet-12;
#   2. the Omniglot demo model, two input sizes trained side by side on one GPU;
#   3. 20-way within-alphabet 1-shot on the held-out test alphabets for both.
# Expects the Omniglot zips in .data/omniglot and writes its results to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PKG=/tmp/dmf_pkg; rm -rf $PKG; mkdir -p $PKG
# The machine has torch but no network: lay the package out by hand instead of pip install -e.
cp -r dmf_deploy $PKG/ && cp -r train $PKG/dmf_deploy/train && cp -r export $PKG/dmf_deploy/export \
  && cp -r runtime $PKG/dmf_deploy/runtime
export PYTHONPATH=$PKG
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
if [ -z "${SKIP_THROUGHPUT:-}" ]; then
  timeout 120 python3 benchmarks/train_throughput.py --seconds 8 > "$OUT/throughput.txt" 2>&1
  tail -6 "$OUT/throughput.txt"
fi
# `python -m` puts the working directory first on sys.path; leave the checkout so $PKG is imported.
DATA=$(pwd)/.data/omniglot; cd /tmp
COMMON="--preset omniglot-demo --data-root $DATA --no-progress --workers 7 --epochs 30
  --episodes-per-epoch 800 --val-episodes 150 --max-minutes ${TRAIN_MINUTES:-4.5}"
python3 -m dmf_deploy.train $COMMON --out /tmp/run56 --image-size 56 > "$OUT/train56.log" 2>&1 &
python3 -m dmf_deploy.train $COMMON --out /tmp/run84 --image-size 84 > "$OUT/train84.log" 2>&1 &
wait
for size in 56 84; do
  tail -2 "$OUT/train$size.log"
  cp /tmp/run$size/best.pt "$OUT/best$size.pt"; cp /tmp/run$size/metrics.jsonl "$OUT/metrics$size.jsonl"
  (python3 -m dmf_deploy.train eval --ckpt /tmp/run$size/best.pt --dataset omniglot --data-root $DATA \
    --split test --way 20 --shot 1 --within-alphabet --episodes 400 2>&1 | tail -1 | sed "s/^/size $size: /" \
    >> "$OUT/eval.txt") &
done
wait
cat "$OUT/eval.txt"
