#!/usr/bin/env bash
# A ready-GPU check in under 5 minutes on one GPU: is this node's seg fast, and does every GPU path work?
#
#   bash bench/gpu_check.sh [OUT]          (default OUT: runs/gpu_check; PYTHON=... picks the interpreter)
#
# 1. `seg synth`: 8 training and 8 held-out synthetic scans, 96 x 96 x 64;
# 2. `seg fit` for a few dozen steps, three ways: fp32; bf16-mixed + channels_last; and the same + torch.compile.
#    Patches/s = patches of the steps between a short and a longer run of the same config, divided by the
#    difference of their wall times: start-up, data caching and compilation cancel out;
# 3. `seg predict` on the held-out folder with PyTorch, then (when onnxruntime-gpu's CUDA provider is there)
#    `seg export` and `seg predict --backend onnxruntime`, with their voxel agreement;
# 4. one JSON, OUT/gpu_check.json (also printed).
# Without a GPU it refuses, in one line, with a non-zero exit (CI checks that, and that it parses).
set -euo pipefail

PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    echo "bench/gpu_check.sh: no CUDA GPU visible to $PYTHON's torch: run it on a GPU node" >&2
    exit 1
fi

OUT=${1:-runs/gpu_check}
SHORT=${GPU_CHECK_SHORT_STEPS:-10}
LONG=${GPU_CHECK_LONG_STEPS:-60}
BATCH=2
SAMPLES=2  # patches per volume: BATCH * SAMPLES patches per step
SIZE="96 96 64"  # the synthetic scans
PATCH="64, 64, 64"
CHANNELS="16, 32, 64, 128"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export WANDB_MODE=disabled
seg() { "$PYTHON" -m seg "$@"; }
now() { "$PYTHON" -c 'import time; print(time.time())'; }

seg synth --output "$OUT/data" --cases 8 --test-cases 8 --size $SIZE --seed 0 >/dev/null
cat >"$OUT/config.yaml" <<EOF
seed_everything: 0
trainer: {accelerator: gpu, devices: 1, max_epochs: -1, check_val_every_n_epoch: 1000, num_sanity_val_steps: 0,
          log_every_n_steps: 5, enable_progress_bar: false}
model: {channels: [$CHANNELS], strides: [2, 2, 2]}
data: {root: $OUT/data, patch_size: [$PATCH], batch_size: $BATCH, samples_per_volume: $SAMPLES, num_workers: 4}
overlays: {every_n_epochs: 0}
EOF

# fit_seconds NAME STEPS ARGS...: wall seconds of one `seg fit` of STEPS steps
fit_seconds() {
    local name=$1 steps=$2 start
    shift 2
    start=$(now)
    seg fit --config "$OUT/config.yaml" --logging csv --trainer.default_root_dir "$OUT/fit_${name}_$steps" \
        --trainer.max_steps "$steps" "$@" >"$OUT/fit_${name}_$steps.log" 2>&1 ||
        { echo "bench/gpu_check.sh: seg fit ($name) failed; see $OUT/fit_${name}_$steps.log" >&2; exit 1; }
    "$PYTHON" -c "import time; print(time.time() - $start)"
}

# patches_per_second NAME ARGS...
patches_per_second() {
    local name=$1 short long
    shift
    short=$(fit_seconds "$name" "$SHORT" "$@")
    long=$(fit_seconds "$name" "$LONG" "$@")
    "$PYTHON" -c "print(round(($LONG - $SHORT) * $BATCH * $SAMPLES / ($long - $short), 1))"
}

FP32=$(patches_per_second fp32 --trainer.precision 32-true)
BF16=$(patches_per_second bf16 --trainer.precision bf16-mixed --model.channels_last true)
COMPILED=$(patches_per_second compiled --trainer.precision bf16-mixed --model.channels_last true --model.compile true)
CKPT="$OUT/fit_fp32_$LONG/checkpoints/last.ckpt"

# predict_seconds NAME ARGS...: wall seconds of `seg predict` on the held-out scans, start-up included
predict_seconds() {
    local name=$1 start
    shift
    start=$(now)
    seg predict --input "$OUT/data/imagesTs" --output "$OUT/predict_$name" --device cuda "$@" \
        >"$OUT/predict_$name.log" 2>&1 ||
        { echo "bench/gpu_check.sh: seg predict ($name) failed; see $OUT/predict_$name.log" >&2; exit 1; }
    "$PYTHON" -c "import time; print(round(time.time() - $start, 2))"
}

TORCH_PREDICT=$(predict_seconds pytorch --checkpoint "$CKPT")
ORT_PREDICT=None
AGREEMENT=None
if "$PYTHON" -c 'import onnx, onnxruntime as o; assert "CUDAExecutionProvider" in o.get_available_providers()' \
        >/dev/null 2>&1; then
    seg export --checkpoint "$CKPT" --output "$OUT/model.onnx" 2>"$OUT/export.log"
    ORT_PREDICT=$(predict_seconds onnxruntime --checkpoint "$OUT/model.onnx" --backend onnxruntime)
    AGREEMENT=$("$PYTHON" - "$OUT/predict_pytorch" "$OUT/predict_onnxruntime" <<'EOF'
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

a, b = map(Path, sys.argv[1:])
pairs = [(np.asarray(nib.load(p).dataobj), np.asarray(nib.load(b / p.name).dataobj)) for p in sorted(a.glob("*.nii.gz"))]
print(sum(int((x == y).sum()) for x, y in pairs) / sum(x.size for x, _ in pairs))
EOF
)
fi

"$PYTHON" - "$OUT/gpu_check.json" <<EOF
import json, sys

import torch

import seg

report = {
    "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "seg": seg.__version__,
    "fit_steps_timed": $LONG - $SHORT, "patches_per_step": $BATCH * $SAMPLES, "patch_size": [$PATCH],
    "network": [$CHANNELS],
    "fit_patches_per_s": {"fp32": $FP32, "bf16_channels_last": $BF16, "bf16_channels_last_compile": $COMPILED},
    "predict_cases": 8, "predict_scan_size": [${SIZE// /, }],
    "predict_seconds_with_startup": {"pytorch": $TORCH_PREDICT, "onnxruntime_cuda": $ORT_PREDICT},
    "voxel_agreement_pytorch_vs_onnxruntime": $AGREEMENT,
}
with open(sys.argv[1], "w") as f:
    json.dump(report, f, indent=1)
print(json.dumps(report, indent=1))
EOF
