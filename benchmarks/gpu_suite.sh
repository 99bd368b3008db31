#!/usr/bin/env bash
# The GPU figures BENCHMARKS.md asks for, in one call sized for a short device lease (at most 9.5 minutes
# on an H100/H200 after start-up: each step has its own time limit): GPT-B study decoding at batch 64 and
# 256 with CFG (compiled, CUDA graphs, bf16; images/s, Engram overhead, fraction of the bandwidth floor),
# a bf16 compiled train step (tokens/s, MFU, Engram overhead), host-table overhead, then the `gpu`-marked
# tests. Each benchmark's JSON line goes to $OUT/<name>.json, its log to $OUT/<name>.log; a failed or
# timed-out step does not stop the others.
#
#   OUT=results bash benchmarks/gpu_suite.sh            # on the GPU machine, from the repository root
#   DEVICE=cpu SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/gpu bash benchmarks/gpu_suite.sh  # dry run on CPU
#
# Dependencies beyond torch, lightning, timm and numpy: if ./.gpu_wheels holds wheels (made here with
#   pip download -d .gpu_wheels --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       webdataset torch-fidelity diffusers 'jsonargparse[signatures]' safetensors pytest hypothesis
# ) they are installed offline first.
set -u
OUT=${OUT:-gpu_results}
DEVICE=${DEVICE:-cuda}  # the scripts' --accelerator: cuda or cpu
SMOKE=${SMOKE:-0}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

if [ -d .gpu_wheels ]; then
    "$PYTHON" -m pip install -q --no-index --find-links .gpu_wheels webdataset torch-fidelity diffusers \
        'jsonargparse[signatures]' safetensors pytest hypothesis > "$OUT/pip.log" 2>&1 \
        || echo "pip: see $OUT/pip.log"
fi

if [ "$SMOKE" = 1 ]; then  # the same commands on a tiny model, to check the script itself
    MODEL=(--size gpt-small --engram small --grid 8)
    BATCHES=(2 4); TRAIN_BATCH=2; REPEATS=1; PRECISION=32-true; BANDWIDTH_MIB=64
else
    MODEL=(--size gpt-b --engram study)
    BATCHES=(64 256); TRAIN_BATCH=32; REPEATS=3; PRECISION=bf16-true; BANDWIDTH_MIB=2048
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the last line (the JSON) apart
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
    echo "$name: exit $rc"
}

for batch in "${BATCHES[@]}"; do
    step "decode_b$batch" 150 "$PYTHON" benchmarks/decode_cache.py "${MODEL[@]}" --accelerator "$DEVICE" \
        --precision "$PRECISION" --batch "$batch" --compile true --skip_recompute true --repeats "$REPEATS" \
        --bandwidth_mib "$BANDWIDTH_MIB"
done
step train 120 "$PYTHON" benchmarks/train_step.py "${MODEL[@]}" --accelerator "$DEVICE" \
    --precision "$PRECISION" --batch "$TRAIN_BATCH" --compile true --repeats "$((REPEATS * 3))"
step host_tables 60 "$PYTHON" benchmarks/host_tables.py "${MODEL[@]}" --accelerator "$DEVICE" \
    --precision "$PRECISION" --batch "${BATCHES[0]}" --repeats "$REPEATS"
if [ "$SMOKE" != 1 ]; then
    step pytest_gpu 90 "$PYTHON" -m pytest -m gpu tests/sample/test_sampling.py \
        tests/engram_vision/test_host_table.py tests/train/test_lit_ar.py
fi
