#!/usr/bin/env bash
# The scaling study of issue 3 (docs/results/scaling.md): FedSA semantics on SST-2,
# N x r x rule x seed with one learning rate for every rank and rule.
#
#   benchmarks/scaling_study.sh adamw       # AdamW, lr 1e-3 (head 5e-3)
#   benchmarks/scaling_study.sh sgd-pilot   # SGD: pick one lr on the middle arm
#   benchmarks/scaling_study.sh sgd         # SGD at the pilot's lr (or SGD_LR=...)
#
# Environment: JOBS=M runs M sweep shards side by side (default 1), DEVICE=cuda puts the
# model on the GPU (default cpu), OUT_ROOT (default runs/scaling), SFEDLORA (the command,
# default .venv/bin/sfedlora). Resumable: rerun to continue; finished runs are skipped.
# On a 2-core CPU one optimizer takes about 5.4 core-hours for 2 seeds.
#
# SGD pilot: plain SGD (no momentum) with lr 0.05-0.2 left LoRA untrained here (every
# rule at the head-only baseline), so the pilot tries a ladder of LoRA learning rates on
# the middle arm only (rslora, r=16, N=5, seed 0; head lr fixed at 0.2) and keeps the one
# with the best personalised accuracy (ties: the smaller). That lr then serves every
# rank, rule and N: the study does not tune per rule.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-1}
OUT_ROOT=${OUT_ROOT:-runs/scaling}
read -r -a SFEDLORA <<<"${SFEDLORA:-.venv/bin/sfedlora}"
GRID=(--grid seed=0,1 --grid clients.num=5,10,20 --grid lora.rank=4,16,64,256
      --grid lora.scaling+lora.a_init=lora+shared,rslora+shared,sfed+shared,sfed+independent)
PILOT_LRS=0.1,0.3,1,3,10
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

pilot_lr() {  # the pilot's chosen lr, from its results table
  python3 - "$OUT_ROOT/sgd-pilot/results.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
best = max(rows, key=lambda r: (float(r["personalized_accuracy"]), -float(r["local.lr"])))
print(best["local.lr"])
EOF
}

case "${1:-adamw}" in
  adamw)
    sweep "$OUT_ROOT/adamw" local.optimizer=adamw local.lr=1e-3 local.head_lr=5e-3 "${GRID[@]}" ;;
  sgd-pilot)
    sweep "$OUT_ROOT/sgd-pilot" local.optimizer=sgd "local.head_lr=$SGD_HEAD_LR" seed=0 \
      clients.num=5 lora.rank=16 lora.scaling=rslora lora.a_init=shared \
      --grid "local.lr=$PILOT_LRS"
    echo "SGD pilot: lr $(pilot_lr)" ;;
  sgd)
    lr=${SGD_LR:-$(pilot_lr)}
    sweep "$OUT_ROOT/sgd-lr$lr" local.optimizer=sgd "local.lr=$lr" \
      "local.head_lr=$SGD_HEAD_LR" "${GRID[@]}" ;;
  *) echo "usage: $0 [adamw|sgd-pilot|sgd]" >&2; exit 2 ;;
esac
