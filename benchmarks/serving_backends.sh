#!/bin/bash
# Serving cost of each model on both backends (torch, onnxruntime), one request on one pinned core.
#   benchmarks/serving_backends.sh OUT [MODEL ...]
# Trains each model 1 epoch on ML-1M (users 1–2999) under `temporal` (weights do not change the
# cost), exports it with --onnx, then runs `prerank bench-serve` alternating the two backends twice
# on core 1 (taskset); results and the summary README go to OUT. Resumable: a model whose artifact
# exists is not retrained.
set -euo pipefail
out=$1; shift
models=${*:-two_tower dat tarq inttower fit ranktower cold}
data="--dataset ml-1m --data-dir ../shared/data/ml-1m --ratings-file ratings-partial-users0001-2999/ratings.dat.gz"
mkdir -p "$out/runs"
for model in $models; do
  run="$out/runs/$model"
  if [ ! -d "$run/artifact" ]; then
    .venv/bin/prerank train $data --protocol temporal --model "$model" --epochs 1 --threads 1 --no-progress \
      --out "$run" --overwrite > "$out/runs/$model.train.log" 2>&1
    .venv/bin/prerank export --checkpoint "$run/checkpoint.pt" --out "$run/artifact" --onnx >> "$out/runs/$model.train.log" 2>&1
  fi
  for round in 1 2; do
    for backend in torch onnxruntime; do
      taskset -c 1 .venv/bin/prerank bench-serve "$run/artifact" --backend "$backend" --out "$out/round$round" > /dev/null
    done
  done
  echo "$model done (load $(cut -d' ' -f1 /proc/loadavg))"
done
