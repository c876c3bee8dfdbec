#!/usr/bin/env bash
# Real sparse training on CIFAR-10 (ResNet-20), every method, levels 0..5, then Phase 2 on the IMP levels.
# A schedule that fits a 2-core CPU machine in about twenty minutes: a stratified 10k-image training subset,
# 2 epochs per level, batch 128, cosine lr 0.1 with 30 warm-up steps, rewinding to step 10, a 2k-image test
# subset. Usage: benchmarks/imp_cifar.sh [DATA] [OUT]
set -euo pipefail
DATA=${1:-../shared/datasets/cifar10}
OUT=${2:-/tmp/edgeshift-bench/imp-resnet20}
mkdir -p "$OUT"
COMMON=(--arch resnet20 --data "$DATA" --levels 5 --epochs 2 --batch-size 128 --lr 0.1 --warmup 30
        --rewind-step 10 --train-samples 10000 --test-samples 2000 --seed 0)
for method in imp magnitude random synflow; do
  start=$(date +%s)
  edgeshift imp "${COMMON[@]}" --method "$method" --out "$OUT/$method"
  echo "method $method wall time $(( $(date +%s) - start )) s"
done
# Phase 2 on every IMP level: exact structured pruning, ONNX export, accuracy and latency through ONNX Runtime
edgeshift export "$OUT/imp" -o "$OUT/imp-portfolio.zip" --data "$DATA" --test-samples 2000 --force
