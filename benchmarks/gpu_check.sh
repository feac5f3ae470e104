#!/usr/bin/env bash
# The GPU check: one prepared script, at most about 8 minutes on one GPU (H100 class), for a device machine.
#
#   bash benchmarks/gpu_check.sh --prepare   # here: copy what it needs of ../shared into .device/shared
#                                            # (ignored by git; carry ".device" to the device machine)
#   bash benchmarks/gpu_check.sh             # there, in the repository root; results in $OUT (or gpu_check_out)
#
# 1. CUDA parity of the five mmdetection R2-101 detectors against the CPU fixtures (benchmarks/gpu_parity.py);
# 2. detector latency at 800x1333 (Faster / Mask R2-101; eager and optimised) in fp32, fp16 and bf16 autocast
#    (benchmarks/detector.py);
# 3. one AMP training step of Faster and Mask R2-101 at 800x1333, batch 2, with peak memory against
#    mmdetection's published 7.4 / 7.9 GB (benchmarks/train.py), which also writes the GPU rows of
#    docs/training.md's table into $OUT/training.train-table.md.
# Each step has its own time limit, so a slow or failing step does not cost the others.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
    src=${RES2DET_SHARED:-../shared}/reference
    dst=.device/shared/reference
    mkdir -p "$dst/parity" "$dst/layouts"
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
    cp "$src/check_parity.py" "$src/seeded_weights.py" "$dst/"
    cp "$src/parity/det_input_1199x800.png" "$dst/parity/"
    for m in faster_rcnn_r2_101_fpn_2x_coco mask_rcnn_r2_101_fpn_2x_coco cascade_rcnn_r2_101_fpn_20e_coco \
             cascade_mask_rcnn_r2_101_fpn_20e_coco htc_r2_101_fpn_20e_coco; do
        cp "$src/parity/$m.pt" "$dst/parity/"
        cp "$src/layouts/$m.json" "$dst/layouts/"
    done
    du -sh .device
    exit 0
fi
export RES2DET_SHARED=${RES2DET_SHARED:-$PWD/.device/shared}
export RES2DET_CACHE=${RES2DET_CACHE:-/tmp/res2det-cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "!! $name exited $rc"; status=1; }
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
MODELS="faster_rcnn_r2_101_fpn_2x_coco mask_rcnn_r2_101_fpn_2x_coco"
step parity 150 "$PY" benchmarks/gpu_parity.py --json "$OUT/parity.json"
step latency_fp32 80 "$PY" benchmarks/detector.py --device cuda --models $MODELS --json "$OUT/latency_fp32.json"
step latency_fp16 80 "$PY" benchmarks/detector.py --device cuda --amp --amp-dtype fp16 --models $MODELS \
    --json "$OUT/latency_fp16.json"
step latency_bf16 80 "$PY" benchmarks/detector.py --device cuda --amp --amp-dtype bf16 --models $MODELS \
    --json "$OUT/latency_bf16.json"
cp docs/training.md "$OUT/training.train-table.md"
step train_amp 120 "$PY" benchmarks/train.py --device cuda --amp --batch 2 --size 800x1333 --models $MODELS \
    --json "$OUT/train.json" --readme "$OUT/training.train-table.md"
exit $status
