#!/usr/bin/env bash
# The checks only a CUDA GPU can run (../shared/GPU.md), as one script for a lent device:
#   bash tools/gpu_check.sh [OUT_DIR]      (OUT_DIR defaults to $OUT, else gpu_out)
# 1. what the machine has; 2. the engine table at paper-256 (eager, autocast, CUDA graphs);
# 3. the gpu-marked tests; 4. a short 256-px training in bf16 and fp16 (steps/s, finite
# losses); 5. the same training under torchrun (DDP over every GPU, nccl); 6. the
# torch.compile rows of the engine table. Each part logs to OUT_DIR (a log per part, the
# training's log.csv appended to its log) and the script goes on after a failure, so one run
# reports everything it could. GPU_CHECK_SECONDS (default 540) bounds the whole script: each
# part gets its own limit or what is left, and parts that would get under 20 s are skipped.
set -u
OUT_DIR="${1:-${OUT:-gpu_out}}"
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d)"  # run folders: checkpoints stay out of OUT_DIR
PY="${PYTHON:-python3}"
export PYTHONPATH="$(printf '%s:' packages/*/src)${PYTHONPATH:-}" PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
status=0
step() {  # step NAME LIMIT_S CMD...: run under a time limit, log, remember a failure
    local name="$1" limit="$2"; shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "== $name: skipped (${left} s left)" | tee -a "$OUT_DIR/summary.txt"
        status=1
        return
    fi
    echo "== $name (limit ${limit} s): $*" | tee -a "$OUT_DIR/summary.txt"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT_DIR/summary.txt"
    tail -n 30 "$OUT_DIR/$name.log"
    [ "$rc" -eq 0 ] || status=1
}
step env 30 "$PY" -c "import torch, onnxruntime; print(torch.__version__, torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', torch.cuda.device_count(), \
onnxruntime.__version__, onnxruntime.get_available_providers())"
BENCH=(tools/bench_sampling.py --presets paper-256 --batch 16 --no-onnx --repeat 5 --steps 4 --paper-steps 2)
step bench_paper256 200 "$PY" "${BENCH[@]}"
step gpu_tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests packages
DATA="${NUDIFF_SHARED:-../shared}/data/monuseg-train"
if [ ! -d "$DATA/instance_maps" ]; then  # a device machine without ../shared: procedural tiles
    DATA="$WORK/synthetic_tiles"
    "$PY" -c "from nudiff_postproc import write_synthetic_dataset as w; w('$DATA', 8, size=1000)"
fi
TRAIN=(-m nudiff_structure.cli --quiet train --data "$DATA" --preset paper-256 --batch 4 --device cuda)
for precision in bf16 fp16; do
    step "train_${precision}" 75 "$PY" "${TRAIN[@]}" --out "$WORK/run_${precision}" --steps 300 --save-every 300 \
        --precision "$precision"
    cat "$WORK/run_${precision}/log.csv" >>"$OUT_DIR/train_${precision}.log" 2>/dev/null
done
GPUS=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
step train_torchrun 75 "$PY" -m torch.distributed.run --nproc_per_node "$GPUS" "${TRAIN[@]}" \
    --out "$WORK/run_ddp" --steps 100 --save-every 100 --precision bf16
cat "$WORK/run_ddp/log.csv" >>"$OUT_DIR/train_torchrun.log" 2>/dev/null
step bench_compile 240 "$PY" "${BENCH[@]}" --compile --only compile
rm -rf "$WORK"
exit $status
