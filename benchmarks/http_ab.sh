#!/bin/bash
# Server CPU per request of two source trees' HTTP path, alternating old/new in one run.
#   benchmarks/http_ab.sh OLD_SRC NEW_SRC ARTIFACT OUT [ROUNDS]
# e.g. git worktree add /tmp/old <commit>; benchmarks/http_ab.sh /tmp/old/src src runs/tt/artifact /tmp/ab
# Each round runs `prerank load-test` (3,000 requests of 1,000 candidates, concurrency 8, one
# torch thread) from each tree in turn; prints throughput, server and client CPU per request,
# latency and the 1-minute load average, and writes OUT/results.tsv.
set -euo pipefail
old=$1 new=$2 artifact=$3 out=$4 rounds=${5:-3}
mkdir -p "$out"
printf "round\ttree\tload_1min\trps\tserver_cpu_ms\tclient_cpu_ms\tp50_ms\tp99_ms\tstatus_5xx\n" > "$out/results.tsv"
for round in $(seq "$rounds"); do
  for side in old new; do
    src=$old; [ "$side" = new ] && src=$new
    PYTHONPATH=$src .venv/bin/python -m prerank load-test "$artifact" --requests 3000 --concurrency 8 \
      --out "$out/${side}_$round" > /dev/null 2>&1
    load=$(cut -d' ' -f1 /proc/loadavg)
    .venv/bin/python - "$out/${side}_$round/two_tower.load.json" "$round" "$side" "$load" >> "$out/results.tsv" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("\t".join(map(str, [sys.argv[2], sys.argv[3], sys.argv[4], round(r["throughput_rps"], 1),
                          round(r["server_cpu_ms_per_request"], 3), round(r["client_cpu_ms_per_request"], 3),
                          round(r["latency"]["p50_ms"], 2), round(r["latency"]["p99_ms"], 2), r["status_5xx"]])))
PY
  done
done
column -t "$out/results.tsv"
