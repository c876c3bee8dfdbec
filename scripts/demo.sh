#!/usr/bin/env bash
# The whole pipeline on one small model: sparse training (IMP levels), exact structured pruning + ONNX export
# into one portfolio, an on-device benchmark, a load-trace simulation that switches, and a report.
# Usage: scripts/demo.sh [DATA] [ARCH] [OUT]   (DATA: 'generated' or a dataset folder)
set -euo pipefail
DATA=${1:-generated}
ARCH=${2:-resnet20}
OUT=${3:-out/demo}
ES=${EDGESHIFT:-edgeshift}
METHOD=${METHOD:-synflow}  # prunes whole paths, so levels differ in structure even on easy data
mkdir -p "$OUT"
if [ "$DATA" = generated ]; then SAMPLES=(); else SAMPLES=(--train-samples 5000 --test-samples 1000); fi
echo "== 1/5 sparse training: $ARCH on $DATA, $METHOD levels 0..4 -> $OUT/run"
$ES imp --arch "$ARCH" --data "$DATA" --method "$METHOD" --levels 4 --epochs 3 --batch-size 64 --lr 0.05 --warmup 20 \
  --rewind-step 5 "${SAMPLES[@]}" --out "$OUT/run"
echo "== 2/5 exact structured pruning, ONNX export, profiling -> $OUT/portfolio.zip"
$ES export "$OUT/run" -o "$OUT/portfolio.zip" --data "$DATA" --test-samples 500 --iterations 50 --force
echo "== 3/5 benchmark on this machine (profile host) -> $OUT/bench.json"
$ES bench "$OUT/portfolio.zip" --profile host --json "$OUT/bench.json" --csv "$OUT/bench.csv"
echo "== 4/5 a load trace that rises and falls, replayed against the qps-trend policy"
printf "time_s,rps,cpu_share\n0,20,1\n10,400,1\n20,1500,0.6\n30,400,1\n40,20,1\n" > "$OUT/trace.csv"
$ES simulate "$OUT/portfolio.zip" --trace "$OUT/trace.csv" --policy qps-trend --json "$OUT/simulate.json"
echo "== 5/5 report -> $OUT/portfolio.md, $OUT/portfolio.png"
$ES report "$OUT/portfolio.zip" -o "$OUT"
echo "== summary"
$ES inspect "$OUT/portfolio.zip"
echo "everything is in $OUT"
