#!/usr/bin/env bash
# Everything one lent GPU session measures, in one call (from the repository root):
#   1. the Fashion-MNIST preset search (experiments/fmnist_preset_search.sh), in parallel;
#   2. the training loop on CUDA with train.compile and bf16 (its start-up du/dt check);
#   3. the benchmark suite (benchmarks/gpu_suite.sh) with the time that is left.
#   OUT=DIR bash experiments/gpu_session.sh [TOTAL_S]
# TOTAL_S (default 540) bounds the whole call. Logs, the runs' metrics (runs.tgz, without
# weights) and the suite's results land in $OUT (default runs/gpu-session). FMNIST_ROOT: the
# folder of Fashion-MNIST's IDX train files (default .fmnist in the repository: a copy of the
# Debian package dataset-fashion-mnist's files, for a machine without it). The runs themselves
# go to WORK (default: a new temporary folder). PYTHON (python3) runs everything.
set -u
TOTAL=${1:-540}
OUT=${OUT:-runs/gpu-session}; mkdir -p "$OUT"
FMNIST_ROOT=${FMNIST_ROOT:-.fmnist}
export PYTHONPATH=src PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
T0=$SECONDS
nvidia-smi -L
work=${WORK:-$(mktemp -d)}; mkdir -p "$work"
TRIAL_TIMEOUT=170 timeout 190 bash experiments/fmnist_preset_search.sh "$FMNIST_ROOT" "$work/search" \
    > "$OUT/search.log" 2>&1
cat "$OUT/search.log"
for f in "$work"/search/*/metrics.jsonl; do echo "$f: $(tail -n 1 "$f")"; done >> "$OUT/search.log"
echo "search took $((SECONDS - T0)) s"
t1=$SECONDS
timeout 150 $PYTHON -m meanflow.cli train --preset fmnist-unet --set data.options.root="$FMNIST_ROOT" \
    --set train.steps=40 --set train.compile=true --set train.amp=bf16 --set train.log_every=10 \
    --set train.progress=false --set train.sample_count=16 --out "$work/compile-check" \
    > "$OUT/loop_checks.log" 2>&1
echo "compile+bf16 loop check rc=$? in $((SECONDS - t1)) s" | tee -a "$OUT/loop_checks.log"
cat "$work/compile-check/metrics.jsonl" >> "$OUT/loop_checks.log" 2>/dev/null
tail -n 5 "$OUT/loop_checks.log"
(cd "$work" && tar czf - --exclude='*.safetensors' search compile-check) > "$OUT/runs.tgz"
left=$((TOTAL - (SECONDS - T0)))
echo "benchmark suite budget ${left} s"
OUT=$OUT bash benchmarks/gpu_suite.sh "$left"
