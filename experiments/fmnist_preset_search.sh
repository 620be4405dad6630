#!/usr/bin/env bash
# Which small-budget settings give recognisable 1-step Fashion-MNIST garments? Trains several
# variants of the fmnist-unet preset (docs/results.md) at the step counts 2 CPU cores manage in
# about 30 minutes, in parallel on one GPU (the same math as the CPU, fp32): one run folder and
# one log per variant under OUT_DIR, then "done NAME" or "FAILED NAME" per variant.
#   bash experiments/fmnist_preset_search.sh [FASHION_MNIST_ROOT] [OUT_DIR]     # repo root
# FASHION_MNIST_ROOT (or $FMNIST_ROOT): the folder of the IDX files; default: the preset's own
# (the Debian package dataset-fashion-mnist). OUT_DIR defaults to runs/preset-search.
# PYTHON (python3), TRIAL_TIMEOUT (300 s per variant) and EXTRA_SETS (e.g. train.steps=2, for a
# smoke run) adjust it.
set -u
root=${1:-${FMNIST_ROOT:-}}; out=${2:-runs/preset-search}
mkdir -p "$out"
base=(--preset fmnist-unet --set train.progress=false
      --set train.sample_every=0 --set train.checkpoint_every=100000)
[ -n "$root" ] && base+=(--set data.options.root="$root")
run() {  # name, then overrides
  local name=$1; shift
  local args=()
  for o in "$@"; do args+=(--set "$o"); done
  for o in ${EXTRA_SETS:-}; do args+=(--set "$o"); done  # after the variant's own settings
  timeout "${TRIAL_TIMEOUT:-300}" "${PYTHON:-python3}" -m meanflow.cli train "${base[@]}" "${args[@]}" --out "$out/$name" \
    >"$out/$name.log" 2>&1 && echo "done $name" || echo "FAILED $name (see $out/$name.log)"
}
run F-1400                                                                  &
run F-2800-b32     train.steps=2800 train.batch_size=32                     &
run F-p1-f25       objective.p=1.0 objective.fraction_r_neq_t=0.25          &
run F-cifar        objective.mu=-2.0 objective.sigma=2.0 objective.fraction_r_neq_t=0.75 &
run F-lr2e-3       optim.lr=2e-3                                            &
run A-800          'model.options={channels: 32, channel_mult: [1, 2, 2], blocks_per_res: 1, attn_resolutions: [], emb_mult: 4, dropout: 0.0}' train.steps=800 &
run G-1000         'model.options={channels: 16, channel_mult: [1, 2, 4], blocks_per_res: 2, attn_resolutions: [7], emb_mult: 8, dropout: 0.0}' train.steps=1000 &
run FM-1400        objective.kind=flow_matching 'train.sample_steps=[1, 2, 10]' &
wait
