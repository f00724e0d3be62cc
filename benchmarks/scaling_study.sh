#!/usr/bin/env bash
# The scaling study of issue 3 (docs/results/scaling.md): FedSA semantics on SST-2,
# N x r x rule x seed with one learning rate for every rank and rule.
#
#   benchmarks/scaling_study.sh adamw       # AdamW, lr 1e-3 (head 5e-3)
#   benchmarks/scaling_study.sh sgd-pilot   # SGD: pick one (lr, momentum) on the middle arm
#   benchmarks/scaling_study.sh sgd         # SGD at the pilot's choice (or SGD_LR=...)
#
# Environment: JOBS=M runs M sweep shards side by side (default 1); DEVICE=cuda puts the
# model on the GPU (default cpu); OUT_ROOT (default runs/scaling); RANKS (default
# 4,16,64,256); SFEDLORA, the command (default .venv/bin/sfedlora). Resumable: rerun to
# continue; finished runs are skipped. On a 2-core CPU one optimizer takes about 5.4
# core-hours for 2 seeds up to r=256; on one H100 with JOBS=7 per optimizer both
# optimizers up to r=1024 took about 15 minutes.
#
# SGD pilot: plain SGD with lr 0.1 to 10 left every rule at the majority-label accuracy,
# so the pilot tries (lr, momentum) pairs on the middle arm only (rslora, r=16, N=5,
# seed 0; head lr fixed at 0.2) and keeps the best personalised accuracy (ties: the
# smaller lr). That choice then serves every rank, rule and N: nothing is tuned per rule.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-1}
OUT_ROOT=${OUT_ROOT:-runs/scaling}
read -r -a SFEDLORA <<<"${SFEDLORA:-.venv/bin/sfedlora}"
GRID=(--grid seed=0,1 --grid clients.num=5,10,20 --grid "lora.rank=${RANKS:-4,16,64,256}"
      --grid lora.scaling+lora.a_init=lora+shared,rslora+shared,sfed+shared,sfed+independent)
# (lr, momentum) pairs; momentum 0.9 multiplies the step by about 10.
PILOT=1+0,1.5+0,2+0,3+0,0.05+0.9,0.1+0.9,0.2+0.9,0.3+0.9
SGD_HEAD_LR=0.2

sweep() {  # sweep OUT ARGS...: JOBS shards side by side, then one pass for the tables
  local out=$1 k pids=()
  shift
  for ((k = 0; k < JOBS; k++)); do
    OMP_NUM_THREADS=1 "${SFEDLORA[@]}" sweep configs/scaling_sst2.yaml "$@" \
      "model.device=${DEVICE:-cpu}" --out "$out" --shard "$k/$JOBS" &
    pids+=($!)
  done
  for k in "${pids[@]}"; do wait "$k"; done
  OMP_NUM_THREADS=1 "${SFEDLORA[@]}" sweep configs/scaling_sst2.yaml "$@" \
    "model.device=${DEVICE:-cpu}" --out "$out"
}

pilot_choice() {  # the pilot's best "lr momentum", from its results table
  python3 - "$OUT_ROOT/sgd-pilot/results.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
best = max(rows, key=lambda r: (float(r["personalized_accuracy"]), -float(r["local.lr"])))
print(best["local.lr"], best["local.momentum"])
EOF
}

case "${1:-adamw}" in
  adamw)
    sweep "$OUT_ROOT/adamw" local.optimizer=adamw local.lr=1e-3 local.head_lr=5e-3 "${GRID[@]}" ;;
  sgd-pilot)
    sweep "$OUT_ROOT/sgd-pilot" local.optimizer=sgd "local.head_lr=$SGD_HEAD_LR" seed=0 \
      clients.num=5 lora.rank=16 lora.scaling=rslora lora.a_init=shared \
      --grid "local.lr+local.momentum=$PILOT"
    echo "SGD pilot: lr, momentum = $(pilot_choice)" ;;
  sgd)
    read -r lr momentum <<<"${SGD_LR:+$SGD_LR ${SGD_MOMENTUM:-0}}"
    [ -n "${lr:-}" ] || read -r lr momentum <<<"$(pilot_choice)"
    sweep "$OUT_ROOT/sgd-lr$lr-m$momentum" local.optimizer=sgd "local.lr=$lr" \
      "local.momentum=$momentum" "local.head_lr=$SGD_HEAD_LR" "${GRID[@]}" ;;
  *) echo "usage: $0 [adamw|sgd-pilot|sgd]" >&2; exit 2 ;;
esac
