#!/usr/bin/env bash
# The prepared GPU check (issue 25): one command on one GPU machine, <= ~8 minutes, installing nothing beyond
# `make setup`. Runs the gpu-marked tests, bench_model.py at base and large (bf16, batch 64, ours vs transformers,
# natural and equal lengths, tokens/s, MFU), bench_memory.py (batch_size auto at base and large: measured memory per
# image, the pick, the batch-size table for 24-141 GB cards), bench_run.py on base random models (batch_size auto),
# and writes one summary table and every log under OUT_DIR. A failing or timed-out step is recorded and the script
# goes on to the table.
#
#   bash bench/gpu_check.sh OUT_DIR
#   CAPFILT_GPU_CHECK_CPU=1 bash bench/gpu_check.sh OUT_DIR   # the same steps, tiny and on CPU (CI smoke test)
# Step timeouts sum to 480 s (env 20, tests 90, base 90, large 120, memory 50, run 110), plus `make setup` if needed.
set -euo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=.venv/bin/python
CPU=${CAPFILT_GPU_CHECK_CPU:-0}
STATUS="$OUT/status.txt"
: >"$STATUS"

step() {  # step NAME TIMEOUT_S CMD...: run with a timeout, log to OUT/NAME.log, record the exit status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS rc=0
    echo "== $name (timeout ${limit}s): $*" | tee -a "$OUT/commands.txt"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$STATUS"
    tail -n 15 "$OUT/$name.log" || true
}

if [ ! -x "$PY" ]; then
    step setup 240 make setup
fi

if [ "$CPU" = 1 ]; then
    DEV=cpu DTYPE=fp32 BATCH=2 SIZES="tiny" REPS=1 NCAP=2
    RUN_ARGS=(--tiny --config configs/capfilt_tiny.yaml --device cpu --samples 64 --shards 2 --batch-size 8)
    MEM_ARGS=(--sizes tiny --device cpu)
    TESTS=(tests/test_bench.py -m "gpu or not gpu" -k "not smoke")
else
    DEV=cuda DTYPE=bf16 BATCH=64 SIZES="base large" REPS=2 NCAP=1
    RUN_ARGS=(--random-size base --config configs/capfilt.yaml --device cuda --samples 2048 --shards 8 --batch-size auto)
    MEM_ARGS=(--sizes base large --device cuda)
    TESTS=(-m gpu tests/)
fi

step env 20 bash -c "nvidia-smi || echo 'no nvidia-smi'; $PY -c 'import torch, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\"); print(\"transformers\", transformers.__version__)'"
step gpu_tests 90 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
for size in $SIZES; do
    limit=90
    [ "$size" = large ] && limit=120
    step "bench_model_$size" "$limit" "$PY" bench/bench_model.py --size "$size" --batch "$BATCH" --dtype "$DTYPE" \
        --device "$DEV" --reps "$REPS" --num-captions "$NCAP" --texts 2 --lengths both
done
step bench_memory 50 "$PY" bench/bench_memory.py "${MEM_ARGS[@]}"
step bench_run 110 "$PY" bench/bench_run.py "${RUN_ARGS[@]}"

# the summary: every bench_model row (size, task, img/s, ratio, tok/s, MFU), the run-vs-loop ratio, step statuses
{
    echo "# capfilt GPU check, $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'), mode $([ "$CPU" = 1 ] && echo cpu-smoke || echo gpu)"
    head -n 1 "$OUT/env.log" 2>/dev/null || true
    grep -h "^torch" "$OUT/env.log" 2>/dev/null || true
    for size in $SIZES; do
        echo
        echo "## bench_model.py --size $size --dtype $DTYPE --batch $BATCH"
        sed -n '/^task /,$p' "$OUT/bench_model_$size.log" 2>/dev/null || echo "(no table: see bench_model_$size.log)"
    done
    echo
    echo "## bench_memory.py (batch_size auto; MB per image, the pick, the batch on other cards)"
    grep -v '^#' "$OUT/bench_memory.log" 2>/dev/null | grep -E '^(size|tiny|base|large)' \
        || tail -n 5 "$OUT/bench_memory.log" 2>/dev/null || true
    echo
    echo "## bench_run.py (capfilt run vs the bare stage loop)"
    grep -E '"(ratio|bare|capfilt_run|batch_size)[^"]*"' "$OUT/bench_run.log" 2>/dev/null \
        || tail -n 5 "$OUT/bench_run.log" 2>/dev/null || true
    echo
    echo "## steps"
    cat "$STATUS"
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
