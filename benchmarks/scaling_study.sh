#!/usr/bin/env bash
# The scaling study of issue 3 (docs/results/scaling.md): FedSA semantics on SST-2,
# N x r x rule x seed with one learning rate for every rank and rule. Resumable: rerun to
# continue where it stopped (finished runs are skipped). About 5.4 core-hours per
# optimizer and 2 seeds on a 2-core CPU machine; seed 0 comes first.
#
# SGD: lr 0.2 (the METHODS.md pilot's) and lr 0.05 with momentum 0.9 both left LoRA
# untrained here (seed 0, N in {5, 10}, every rank and rule: personalised accuracy equal
# to the head-only baseline, 0.764 / 0.774), so the SGD sweep waits for a pilot that picks
# one learning rate at which the middle rule (rslora, r=16) learns; run it with
#   SGD_LR=<lr> benchmarks/scaling_study.sh sgd
set -euo pipefail
cd "$(dirname "$0")/.."
GRID=(--grid seed=0,1 --grid clients.num=5,10,20 --grid lora.rank=4,16,64,256
      --grid lora.scaling+lora.a_init=lora+shared,rslora+shared,sfed+shared,sfed+independent)
case "${1:-adamw}" in
  adamw) OPT=(local.optimizer=adamw local.lr=1e-3 local.head_lr=5e-3) ;;
  sgd) OPT=(local.optimizer=sgd "local.lr=${SGD_LR:?set SGD_LR}" "local.head_lr=${SGD_LR}") ;;
  *) echo "usage: $0 [adamw|sgd]" >&2; exit 2 ;;
esac
OMP_NUM_THREADS=1 .venv/bin/sfedlora sweep configs/scaling_sst2.yaml "${OPT[@]}" "${GRID[@]}" \
  --out "runs/scaling/${1:-adamw}${SGD_LR:+-lr$SGD_LR}"
