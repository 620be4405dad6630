#!/usr/bin/env bash
# Which small-budget settings give recognisable 1-step Fashion-MNIST garments? Runs several
# variants of the fmnist-unet preset at the step counts 2 CPU cores manage in ~30 minutes, in
# parallel on one GPU (same math as the CPU, fp32), and tars their sample grids.
#   bash experiments/fmnist_preset_search.sh ROOT_OF_FASHION_MNIST OUT_DIR
set -u
root=${1:-/usr/share/datasets/fashion-mnist}; out=${2:-runs/preset-search}
mkdir -p "$out"
base=(--preset fmnist-unet --set data.options.root="$root" --set train.progress=false
      --set train.sample_every=0 --set train.checkpoint_every=100000)
for o in ${EXTRA_SETS:-}; do base+=(--set "$o"); done   # e.g. EXTRA_SETS=train.steps=2
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
run A-800          'model.options={channels: 32, channel_mult: [1, 2, 2], blocks_per_res: 1, attn_resolutions: [], emb_dim: 128, dropout: 0.0}' train.steps=800 &
run G-1000         'model.options={channels: 16, channel_mult: [1, 2, 4], blocks_per_res: 2, attn_resolutions: [7], emb_dim: 128, dropout: 0.0}' train.steps=1000 &
run FM-1400        objective.kind=flow_matching 'train.sample_steps=[1, 2, 10]' &
wait
