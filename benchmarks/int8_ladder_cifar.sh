#!/usr/bin/env bash
# Issue 15: the ladder of a portfolio made from a trained ResNet-20 on CIFAR-10: dense, 2 and 3 residual blocks
# removed (layer pruning, bn-scale criterion, fine-tuned 3 epochs on all 50k images at lr 0.01), and an INT8
# variant of each in the host profile's format. Accuracy on the full 10k test split through ONNX Runtime; the
# ladder from the export's interleaved timing, then re-measured by `bench` (interleaved, under host).
# About 45 minutes on 2 cores from scratch (10 training epochs, 2 x 3 fine-tuning epochs), minutes once trained.
# Usage: benchmarks/int8_ladder_cifar.sh [DATA] [OUT]
set -euo pipefail
DATA=${1:-../shared/datasets/cifar10}
OUT=${2:-/tmp/edgeshift-bench/ladder}
mkdir -p "$OUT"
DENSE="$OUT/resnet20-dense.pt"
[ -f "$DENSE" ] || edgeshift train --arch resnet20 --data "$DATA" --epochs 10 --out "$DENSE"
for n in 2 3; do
  [ -f "$OUT/lp$n.pt" ] || edgeshift layerprune "$DENSE" --criterion bn-scale --remove "$n" --epochs 3 \
    --data "$DATA" --out "$OUT/lp$n.pt" --json "$OUT/lp$n.json"
done
edgeshift export "$DENSE" "$OUT/lp2.pt" "$OUT/lp3.pt" --data "$DATA" --test-samples 10000 --int8 --profile host \
  -o "$OUT/resnet20.zip" --force
edgeshift inspect "$OUT/resnet20.zip"
edgeshift bench "$OUT/resnet20.zip" --profile host --save --json "$OUT/bench.json"
