#!/usr/bin/env bash
# The GPU work of one session in one call of the `device` tool (see benchmarks/gpu/fetch.sh first):
#   run(command="bash benchmarks/gpu/run.sh", carry=[".whl", ".gpudata"], timeout_s=500)
# Trains with KERAS_BACKEND=jax (the machine has no TensorFlow). First time to quality on ML-1M for
# GPU settings in order of promise (each variant runs both cases; runs that would not fit in
# TTQ_BUDGET_S are skipped), then the training speed of the paper configuration with what is left.
# BENCHMARKS.md and results.tar.gz (logs, curves, metrics of every run) come back in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" KERAS_BACKEND=jax SASREC_SHARED_DATA="$PWD/.gpudata" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sasrec-gpu-out}
LOGS=/tmp/sasrec-gpu-logs
mkdir -p "$OUT" "$LOGS"
nvidia-smi -L
# Length bucketing compiles one XLA program per batch width (13 for maxlen 200): seconds each on a GPU
# that computes a whole epoch in about a second, so every variant but the comparison turns it off.
python3 -m benchmarks.time_to_quality --backend jax --work /tmp/ttq --budget-s "${TTQ_BUDGET_S:-270}" \
  --variant "length_bucketing=false" \
  --variant "length_bucketing=false batch_size=256 learning_rate=0.002" \
  --variant "" \
  --variant "length_bucketing=false mixed_precision=true" \
  "$@" 2>&1 | tee "$LOGS/time_to_quality.log"
cp BENCHMARKS.md "$OUT/"  # again below: what is measured comes back even if the call is cut short
timeout "${SPEED_TIMEOUT_S:-170}" python3 -m benchmarks.train_speed --backends jax --losses bce,ce --epoch-backends jax \
  2>&1 | tee "$LOGS/train_speed.log"
cp BENCHMARKS.md "$OUT/"
shopt -s nullglob
for run in /tmp/ttq/run-*; do
  mkdir -p "$LOGS/$(basename "$run")"
  cp "$run"/{curve.png,log.csv,metrics.json,config.toml} "$LOGS/$(basename "$run")/" 2>/dev/null
done
tar -czf "$OUT/results.tar.gz" -C "$LOGS" .
