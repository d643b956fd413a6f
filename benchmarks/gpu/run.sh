#!/usr/bin/env bash
# The GPU work of one session in one call of the `device` tool (see benchmarks/gpu/fetch.sh first):
#   run(command="bash benchmarks/gpu/run.sh [time_to_quality args]", carry=[".whl", ".gpudata"], timeout_s=560)
# Trains with KERAS_BACKEND=jax (the machine has no TensorFlow): training speed of the paper
# configuration, then time to quality on ML-1M. BENCHMARKS.md and the logs come back in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" KERAS_BACKEND=jax SASREC_SHARED_DATA="$PWD/.gpudata" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sasrec-gpu-out}
mkdir -p "$OUT"
nvidia-smi -L
python3 -m benchmarks.train_speed --backends jax --losses bce,ce --epoch-backends jax 2>&1 | tee "$OUT/train_speed.log"
python3 -m benchmarks.time_to_quality --backend jax --work /tmp/ttq "$@" 2>&1 | tee "$OUT/time_to_quality.log"
cp BENCHMARKS.md "$OUT/"
for run in /tmp/ttq/run-*; do [ -f "$run/curve.png" ] && cp "$run/curve.png" "$OUT/$(basename "$run")-curve.png"; done
