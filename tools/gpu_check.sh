#!/usr/bin/env bash
# The checks only a CUDA GPU can run (../shared/GPU.md), as one script for a lent device:
#   bash tools/gpu_check.sh [OUT_DIR]      (OUT_DIR defaults to $OUT, else gpu_out)
# 1. what the machine has; 2. the gpu-marked tests; 3. the engine table at paper-256;
# 4. a short 256-px training in bf16 and fp16 (steps/s, finite losses), and two DDP ranks
#    under torchrun when the machine has two GPUs. Each part logs to OUT_DIR and the
#    script goes on after a failure, so one run reports everything it could.
set -u
OUT_DIR="${1:-${OUT:-gpu_out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$(printf '%s:' packages/*/src)${PYTHONPATH:-}"
status=0
step() {  # step NAME CMD...: run, log, remember a failure
    local name="$1"; shift
    echo "== $name: $*" | tee -a "$OUT_DIR/summary.txt"
    local t0=$SECONDS
    "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT_DIR/summary.txt"
    tail -n 25 "$OUT_DIR/$name.log"
    [ "$rc" -eq 0 ] || status=1
}
step env "$PY" -c "import torch, onnxruntime; print(torch.__version__, torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', torch.cuda.device_count(), \
onnxruntime.__version__, onnxruntime.get_available_providers())"
step gpu_tests "$PY" -m pytest -q -m gpu -p no:cacheprovider tests packages
step bench_paper256 "$PY" tools/bench_sampling.py --presets paper-256 --batch 16 --compile --no-onnx \
    --repeat 5 --steps 4 --paper-steps 2 --json "$OUT_DIR/bench_paper256.json"
DATA="${NUDIFF_SHARED:-../shared}/data/monuseg-train"
if [ ! -d "$DATA/instance_maps" ]; then  # a device machine without ../shared: procedural tiles
    DATA="$OUT_DIR/synthetic_tiles"
    "$PY" -c "from nudiff_postproc import write_synthetic_dataset as w; w('$DATA', 8, size=1000)"
fi
for precision in bf16 fp16; do
    step "train_${precision}" "$PY" -m nudiff_structure.cli --quiet train --data "$DATA" \
        --out "$OUT_DIR/run_${precision}" --preset paper-256 --steps 300 --batch 4 --save-every 300 \
        --precision "$precision" --device cuda
    [ -f "$OUT_DIR/run_${precision}/log.csv" ] && tail -n 3 "$OUT_DIR/run_${precision}/log.csv"
done
if "$PY" -c "import sys, torch; sys.exit(torch.cuda.device_count() < 2)"; then
    step ddp_two_gpus "$PY" -m torch.distributed.run --nproc_per_node 2 -m nudiff_structure.cli --quiet train \
        --data "$DATA" --out "$OUT_DIR/run_ddp" --preset paper-256 --steps 100 --batch 4 --save-every 100
fi
exit $status
