#!/usr/bin/env bash
# The scaling study of issue 3 (docs/results/scaling.md): FedSA semantics on SST-2,
# N x r x rule x seed, once with AdamW and once with SGD (one learning rate per
# optimizer for every rank and rule). Resumable: rerun to continue where it stopped.
# The two sweeps run side by side, one core each (about 2.8 core-hours each on a 2-core
# CPU machine; seed 0 comes first). SGD uses the METHODS.md pilot's lr 0.2 (a first try
# at lr 0.05 with momentum 0.9 left LoRA all but untrained in 10 rounds: every rule gave
# the same accuracy at N=5, r=4).
set -euo pipefail
cd "$(dirname "$0")/.."
GRID=(--grid seed=0,1 --grid clients.num=5,10,20 --grid lora.rank=4,16,64,256
      --grid lora.scaling+lora.a_init=lora+shared,rslora+shared,sfed+shared,sfed+independent)
# (overrides come before the options: argparse reads positionals first)
OMP_NUM_THREADS=1 .venv/bin/sfedlora sweep configs/scaling_sst2.yaml \
  local.optimizer=adamw local.lr=1e-3 local.head_lr=5e-3 \
  "${GRID[@]}" --out runs/scaling/adamw &
OMP_NUM_THREADS=1 .venv/bin/sfedlora sweep configs/scaling_sst2.yaml \
  local.optimizer=sgd local.lr=0.2 local.head_lr=0.2 \
  "${GRID[@]}" --out runs/scaling/sgd &
wait
