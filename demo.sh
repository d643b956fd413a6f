#!/usr/bin/env bash
# The main job end to end on the embedded synthetic data (run by `make demo`).
set -euo pipefail
out=${1:-demo}
port=${2:-8500}
mkdir -p "$out"

echo "== 1/6 synthetic interaction log (users follow latent item chains)"
sasrec synth --out "$out/log.csv" --seed 0

echo "== 2/6 prepare: clean, 5-core, vocabulary, leave-one-out split"
sasrec prepare --format csv --input "$out/log.csv" --out "$out/dataset" \
  --user-col user_id --item-col item_id --time-col timestamp

echo "== 3/6 train SASRec (configs/demo.toml) and evaluate on the test split"
sasrec train --data "$out/dataset" --out "$out/run" --config configs/demo.toml --quiet

echo "== 4/6 export a SavedModel version"
rm -rf "$out/models"
sasrec export --run "$out/run" --model-base "$out/models/demo"

echo "== 5/6 serve it over gRPC on port $port"
sasrec serve --model-base "$out/models/demo" --port "$port" --metrics-port -1 > "$out/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  python -m serving.client health "localhost:$port" >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { cat "$out/server.log"; exit 1; }
  sleep 0.5
done

echo "== 6/6 recommend the next items after the last 10 events of user 1"
history=$(python -c "import csv,sys; r=[row['item_id'] for row in csv.DictReader(open(sys.argv[1])) if row['user_id']=='1']; print(','.join(r[-10:]))" "$out/log.csv")
sasrec recommend --target "localhost:$port" --history "$history" -k 10
