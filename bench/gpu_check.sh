#!/usr/bin/env bash
# The prepared GPU check (issue 25): one command on one GPU machine, <= ~8 minutes, installing nothing. Runs the gpu-marked tests, bench_model.py at base and large (bf16, batch 64, ours vs transformers,
# natural and equal lengths, tokens/s, MFU), bench_memory.py (batch_size auto at base and large: measured memory per
# image, the pick, the batch-size table for 24-141 GB cards), bench_run.py on base random models (batch_size auto),
# and writes one summary table and every log under OUT_DIR. A failing or timed-out step is recorded and the script
# goes on to the table.
#
#   bash bench/gpu_check.sh OUT_DIR
#   CAPFILT_GPU_CHECK_CPU=1 bash bench/gpu_check.sh OUT_DIR   # the same steps, tiny and on CPU (CI smoke test)
#   CAPFILT_PY=python3 bash bench/gpu_check.sh OUT_DIR        # this interpreter, not .venv's
# Step timeouts sum to 480 s (env 20, tests 90, base 90, large 120, memory 50, run 110).
#
# The interpreter: CAPFILT_PY, else .venv/bin/python (`make setup`), else python3 when its torch sees CUDA (a GPU
# machine's image, which cannot reach a package registry: the project runs from this checkout via PYTHONPATH, and
# needs only torch, transformers, safetensors, huggingface_hub, pyarrow, pillow, fsspec, pyyaml, click, pytest, and
# webdataset: `make gpu-wheels` puts its wheels in .whl/, which this script installs into /tmp/capfilt_site).
# Without Ray there, bench_run.py measures one actor's pipeline in-process (--no-ray) instead of `capfilt run`.
set -euo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
CPU=${CAPFILT_GPU_CHECK_CPU:-0}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STATUS="$OUT/status.txt"
: >"$STATUS"

step() {  # step NAME TIMEOUT_S CMD...: run with a timeout, log to OUT/NAME.log, record the exit status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS rc=0
    echo "== $name (timeout ${limit}s): $*"
    echo "\$ $*" >"$OUT/$name.log"  # each log starts with its command (at most 8 files come back from a GPU machine)
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$STATUS"
    tail -n 15 "$OUT/$name.log" || true
}

if [ -n "${CAPFILT_PY:-}" ]; then
    PY=$CAPFILT_PY
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PY=python3
else
    step setup 240 make setup
    PY=.venv/bin/python
fi
if ! "$PY" -c 'import webdataset' 2>/dev/null && compgen -G '.whl/*.whl' >/dev/null; then  # `make gpu-wheels`
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/capfilt_site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/capfilt_site"
fi
NO_RAY=()
"$PY" -c 'import ray' 2>/dev/null || NO_RAY=(--no-ray)

if [ "$CPU" = 1 ]; then
    DEV=cpu DTYPE=fp32 BATCH=2 SIZES="tiny" REPS=1 NCAP=2
    RUN_ARGS=(--tiny --config configs/capfilt_tiny.yaml --device cpu --samples 64 --shards 2 --batch-size 8)
    MEM_ARGS=(--sizes tiny --device cpu)
    TESTS=(tests/test_bench.py tests/test_memory.py -m "gpu or not gpu" -k "not smoke and not pads")
else
    DEV=cuda DTYPE=bf16 BATCH=64 SIZES="base large" REPS=2 NCAP=1
    RUN_ARGS=(--random-size base --config configs/capfilt.yaml --device cuda --samples 2048 --shards 8 --batch-size auto)
    MEM_ARGS=(--sizes base large --device cuda)
    TESTS=(-m gpu tests/test_bench.py tests/test_generate.py tests/test_memory.py)  # the gpu tests' files only
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
step bench_run 110 "$PY" bench/bench_run.py "${RUN_ARGS[@]}" "${NO_RAY[@]}"

# the summary: every bench_model row (size, task, img/s, ratio, tok/s, MFU), the run-vs-loop ratio, step statuses
{
    echo "# capfilt GPU check, $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'), mode $([ "$CPU" = 1 ] && echo cpu-smoke || echo gpu)"
    sed -n 2p "$OUT/env.log" 2>/dev/null || true
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
    grep -E '"(mode|ratio|bare|capfilt_run|actor|batch_size)[^"]*"' "$OUT/bench_run.log" 2>/dev/null \
        || tail -n 5 "$OUT/bench_run.log" 2>/dev/null || true
    echo
    echo "## steps"
    cat "$STATUS"
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
