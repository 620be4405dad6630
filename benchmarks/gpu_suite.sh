#!/usr/bin/env bash
# The GPU benchmark suite: MeanFlow/FM training-step cost per du/dt strategy (step_cost.py) and
# 1-NFE sampling throughput (sample_speed.py), most important first, within a time budget.
#
#   OUT=DIR bash benchmarks/gpu_suite.sh [BUDGET_S]     # from the repository root
#
# BUDGET_S (default 500, so that one 9-minute device call also covers start-up and the final
# table) bounds the whole run: every item runs in its own process under
# `timeout`, an item is skipped when too little budget is left for it, and the skipped items
# are listed at the end. Results: $OUT/bench.jsonl (one JSON object per measurement, written as
# it finishes), $OUT/bench.log (everything printed), $OUT/table.txt (the final table).
# OUT defaults to runs/gpu-suite (in the repository). PYTHON (default: python on PATH) runs the
# scripts. REPEATS (10) and WARMUP (3) set the timed and untimed steps.
#
# Order: (a) eager fp32 unet-cifar10 b128, all strategies; (a2) the attention-JVP
# microbenchmark (math path vs the chunked JVP function vs the Triton JVP kernel, 256/1024/4096
# tokens, bf16 and fp32; then the Triton kernel's time as a multiple of the fused SDPA forward,
# bf16, against the target of at most 3× that forward; triton is skipped with a note where it
# is missing);
# (b) unet eager bf16; (c) eager fp32 and bf16 dit-b/2 b64, then split/forward_ad with the
# chunked JVP attention (--jvp-attention chunked); (d) compiled bf16 unet-cifar10 and dit-b/2:
# flow matching, then one strategy per process, torch.compile(model) and the whole loss
# compiled (order and reasons below); (e) 1-NFE sampling speed, eager then bf16 compiled;
# (g) training (DDP, FSDP2) and sampling under torchrun over NCCL, with the ranks' replicas
# checked bit-identical and sharded samples against one process's (needs two GPUs); (f)
# dit-b/2 at batch 256, eager, if time is left. It ends with the table of
# benchmarks/summarize.py.
#
# Without CUDA it stops with a message; SUITE_CPU_SMOKE=1 instead runs the same items on toy
# CPU sizes (to test this script; SMOKE_UNET=mlp SMOKE_DIT=mlp makes that quicker).

set -u -o pipefail

BUDGET=${1:-${BUDGET:-500}}
OUT=${OUT:-runs/gpu-suite}
mkdir -p "$OUT"
JSON=$OUT/bench.jsonl
LOG=$OUT/bench.log
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python || command -v python3)}
REPEATS=${REPEATS:-10}
WARMUP=${WARMUP:-3}
START=$SECONDS
SKIPPED=()
PROBLEMS=()

say() { echo "$*" | tee -a "$LOG"; }
suite_record() {  # item status seconds note
    printf '{"bench": "suite", "item": "%s", "status": "%s", "seconds": %s, "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" >> "$JSON"
}

say "# gpu_suite $(date -Is 2>/dev/null || date) budget ${BUDGET}s OUT=$OUT repeats $REPEATS warmup $WARMUP"
{ command -v nvidia-smi >/dev/null && nvidia-smi -L; } 2>&1 | tee -a "$LOG" || say "(nvidia-smi not available)"
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "cuda available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:  # noqa: BLE001
    print("triton not importable:", exc)
EOF

DEV=()
UNET=unet-cifar10; UNET_B=128
DIT=dit-b/2; DIT_B=64; DIT_B_BIG=256
CUNET=unet-cifar10; CDIT=dit-b/2          # compiled items
SUNET_B=512; SDIT_B=256                   # sampling batches
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [ "${SUITE_CPU_SMOKE:-0}" != 1 ]; then
        say "CUDA is not available here: nothing measured. This suite is for the GPU machine" \
            "(set SUITE_CPU_SMOKE=1 to run its items on toy CPU sizes)."
        exit 2
    fi
    say "SUITE_CPU_SMOKE=1: toy CPU sizes, timings meaningless"
    DEV=(--device cpu --threads 1)
    UNET=${SMOKE_UNET:-unet-small}; UNET_B=2; DIT=${SMOKE_DIT:-dit-s/2}; DIT_B=2; DIT_B_BIG=4
    CUNET=mlp; CDIT=mlp; SUNET_B=4; SDIT_B=4
    REPEATS=1; WARMUP=1
fi

# run_item NAME MIN_S CAP_S RESERVE_S CMD...: run CMD under `timeout`, with at most CAP_S
# seconds and never into the last RESERVE_S seconds of the budget; skip it when less than MIN_S
# would be left.
run_item() {
    local name=$1 min=$2 cap=$3 reserve=$4
    shift 4
    local left=$((BUDGET - (SECONDS - START) - reserve))
    if ((left < min)); then
        SKIPPED+=("$name")
        say "-- skip $name: ${left}s left for it, needs ${min}s"
        suite_record "$name" SKIPPED 0 "budget"
        return
    fi
    local limit=$((left < cap ? left : cap))
    say ""
    say "== [t=$((SECONDS - START))s] $name (timeout ${limit}s)"
    say "   $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | grep --line-buffered -v '^USDT:' | tee -a "$LOG"
    local rcs=("${PIPESTATUS[@]}")
    local rc=${rcs[0]} took=$((SECONDS - t0))
    if ((rc == 124 || rc == 137)); then
        PROBLEMS+=("$name: TIMEOUT after ${took}s")
        suite_record "$name" TIMEOUT "$took" "killed after ${limit}s"
    elif ((rc != 0)); then
        PROBLEMS+=("$name: exit $rc after ${took}s")
        suite_record "$name" "EXIT$rc" "$took" "see bench.log"
    fi
    say "== $name: exit $rc in ${took}s"
}

STEP=(benchmarks/step_cost.py "${DEV[@]}" --repeats "$REPEATS" --json "$JSON")
EAGER=(--warmup "$WARMUP")
SAMPLE=(benchmarks/sample_speed.py "${DEV[@]}" --repeats "$REPEATS" --json "$JSON")
R=40  # seconds kept free during (d) for the eager sampling items of (e)

# (a)-(c): eager, all strategies in one process per configuration
run_item a-unet-fp32 20 100 0 $PY "${STEP[@]}" "${EAGER[@]}" --model $UNET --batch $UNET_B
ATT=(benchmarks/attention_jvp.py --json "$JSON" --triton auto)
if ((${#DEV[@]})); then ATT+=(--device cpu --threads 1 --tokens 64 128 --repeats 1)
else ATT+=(--device cuda --heads 12 --head-dim 64 --tokens 256 1024 4096 --batch 64 16 4); fi
run_item a2-attention-jvp-bf16 10 60 0 $PY "${ATT[@]}" --dtype bf16
run_item a2-attention-jvp-fp32 10 60 0 $PY "${ATT[@]}" --dtype fp32
run_item a2-attention-triton-ratio 10 60 0 $PY "${ATT[@]}" --dtype bf16 --triton-ratio
run_item b-unet-bf16 15 80 0 $PY "${STEP[@]}" "${EAGER[@]}" --model $UNET --batch $UNET_B --amp bf16
run_item c-dit-fp32 20 90 0 $PY "${STEP[@]}" "${EAGER[@]}" --model $DIT --batch $DIT_B
run_item c-dit-bf16 15 80 0 $PY "${STEP[@]}" "${EAGER[@]}" --model $DIT --batch $DIT_B --amp bf16
run_item c-dit-fp32-chunked 15 60 0 $PY "${STEP[@]}" "${EAGER[@]}" --model $DIT --batch $DIT_B --jvp-attention chunked --strategies split,forward_ad
run_item c-unet-fp32-chunked 15 60 0 $PY "${STEP[@]}" "${EAGER[@]}" --model $UNET --batch $UNET_B --jvp-attention chunked --strategies split,forward_ad
if ((${#DEV[@]} == 0)); then  # the Triton kernel needs CUDA
    run_item c-dit-bf16-triton 15 60 0 $PY "${STEP[@]}" "${EAGER[@]}" --model $DIT --batch $DIT_B --amp bf16 --jvp-precision amp --jvp-attention triton --strategies split,forward_ad
fi

# (d): compiled bf16, one process per strategy (a compile crash or hang loses only that
# strategy); flow matching first, then the strategies reuse its record (--fm-ref; a
# loss-scope strategy compares with the model-scope FM). On CPU, passing forward-AD duals into
# a compiled *model* raised or lost the tangent (split, forward_ad) or ran eagerly (func),
# while compiling the whole loss (--compile-scope loss) ran split compiled, so the loss scope
# comes early.
C_UNET=($PY "${STEP[@]}" --model $CUNET --amp bf16 --compile --fm-ref "$JSON")
C_DIT=($PY "${STEP[@]}" --model $CDIT --amp bf16 --compile --fm-ref "$JSON")
[ "$CUNET" = mlp ] || C_UNET+=(--batch $UNET_B)
[ "$CDIT" = mlp ] || C_DIT+=(--batch $DIT_B)
LOSS=(--compile-scope loss)
run_item d-unet-compiled-fm 40 150 $R "${C_UNET[@]}" --strategies none
run_item d-unet-compiled-split 40 150 $R "${C_UNET[@]}" --strategies split
run_item d-unet-losscompiled-split 40 180 $R "${C_UNET[@]}" "${LOSS[@]}" --strategies split
run_item d-unet-losscompiled-func 40 180 $R "${C_UNET[@]}" "${LOSS[@]}" --strategies func
run_item d-dit-compiled-fm 40 150 $R "${C_DIT[@]}" --strategies none
run_item d-dit-losscompiled-split 40 180 $R "${C_DIT[@]}" "${LOSS[@]}" --strategies split
run_item d-dit-compiled-split 40 150 $R "${C_DIT[@]}" --strategies split
run_item d-unet-compiled-forward_ad 40 150 $R "${C_UNET[@]}" --strategies forward_ad
run_item d-dit-compiled-forward_ad 40 150 $R "${C_DIT[@]}" --strategies forward_ad
run_item d-unet-compiled-func 40 150 $R "${C_UNET[@]}" --strategies func
run_item d-dit-compiled-func 40 150 $R "${C_DIT[@]}" --strategies func
run_item d-dit-losscompiled-func 40 180 $R "${C_DIT[@]}" "${LOSS[@]}" --strategies func

# (e): sampling throughput, eager (fp32 and bf16) then compiled
run_item e-sample-unet-eager 10 45 0 $PY "${SAMPLE[@]}" --warmup "$WARMUP" --model $UNET --batch $SUNET_B
run_item e-sample-dit-eager 10 45 0 $PY "${SAMPLE[@]}" --warmup "$WARMUP" --model $DIT --batch $SDIT_B
run_item e-sample-unet-compiled 40 120 0 $PY "${SAMPLE[@]}" --compile on --amp bf16 --model $CUNET --batch $SUNET_B
run_item e-sample-dit-compiled 40 120 0 $PY "${SAMPLE[@]}" --compile on --amp bf16 --model $CDIT --batch $SDIT_B

# (g): `meanflow train` and `sample` under torchrun, NCCL over this machine's GPUs (gloo on two
# CPU ranks in the smoke). NCCL refuses two ranks on one GPU, so one GPU skips it with a note.
# DDP, then FSDP2 (train.fsdp): 40 steps of the 8-Gaussian MLP at a global batch of 256, where
# the loop checks at every checkpoint (each 20 steps) that the ranks' replicas are bit-identical
# and stops with an error when they are not; then 64 one-step samples drawn by the ranks
# against the same 64 drawn by one process (their largest difference goes to bench.jsonl).
if ((${#DEV[@]})); then NP=2; TDEV=cpu
else NP=$($PY -c "import torch; print(torch.cuda.device_count())"); TDEV=cuda; fi
if ((NP < 2)); then
    SKIPPED+=("g-nccl")
    say "-- skip g-nccl: ${NP} GPU here, and NCCL needs two (two ranks may not share a GPU)"
    suite_record g-nccl SKIPPED 0 "one GPU"
else
    G=$(mktemp -d "$OUT/g-XXXXXX")   # its own folder, so that a second call with the same OUT runs it too
    RUN=($PY -m torch.distributed.run --standalone --nproc_per_node "$NP" -m meanflow.cli)
    TRAIN=(train --data 8gaussians --steps 40 --batch-size 256 --set "train.device=$TDEV"
           --set train.checkpoint_every=20 --set train.progress=false)
    run_item g-ddp 30 120 0 "${RUN[@]}" "${TRAIN[@]}" --out "$G/ddp"
    run_item g-fsdp 30 120 0 "${RUN[@]}" "${TRAIN[@]}" --set train.fsdp=true --out "$G/fsdp"
    run_item g-sample-ranks 20 60 0 "${RUN[@]}" sample "$G/ddp" --num-samples 64 \
        --device "$TDEV" --out "$G/ranks.npz"
    run_item g-sample-one 10 60 0 $PY -m meanflow.cli sample "$G/ddp" --n 64 \
        --device "$TDEV" --out "$G/one.npz"
    run_item g-sample-compare 5 30 0 $PY - "$G" "$NP" "$JSON" <<'PYEOF'
import json, sys
import numpy as np
out, ranks, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
a = np.load(f"{out}/ranks.npz")["samples"]
b = np.load(f"{out}/one.npz")["samples"]
diff = float(np.abs(a.astype(np.float64) - b).max())
print(f"{ranks} ranks against one process, 64 one-step samples: max |difference| {diff:.3g}")
with open(path, "a") as f:
    f.write(json.dumps({"bench": "sharded_sampling", "ranks": ranks, "n": len(a),
                        "max_abs_diff": diff}) + "\n")
PYEOF
fi

# (f): the DiT at the paper's batch, if time is left
run_item f-dit-bf16-b256 30 120 0 $PY "${STEP[@]}" "${EAGER[@]}" --model $DIT --batch $DIT_B_BIG --amp bf16
run_item f-dit-fp32-b256 30 120 0 $PY "${STEP[@]}" "${EAGER[@]}" --model $DIT --batch $DIT_B_BIG

say ""
say "# done in $((SECONDS - START))s of ${BUDGET}s"
((${#SKIPPED[@]})) && say "# skipped (budget): ${SKIPPED[*]}"
for p in "${PROBLEMS[@]}"; do say "# problem: $p"; done
$PY benchmarks/summarize.py "$JSON" 2>&1 | tee "$OUT/table.txt" | tee -a "$LOG"
exit 0
