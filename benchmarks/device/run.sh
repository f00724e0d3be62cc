#!/bin/bash
# The GPU figures of docs/results/batched.md, on a lent device machine, in one call:
#   (here)  .venv/bin/python benchmarks/device/prepare.py
#   (tool)  run  command="bash benchmarks/device/run.sh"  carry=[".device"]  timeout_s=540
# Rows go to $OUT (the tool brings them back); copy them into docs/results/batched/ and
# print the tables with benchmarks/batched.py --report. Each benchmark has its own time
# limit, so a slow one leaves the others' rows. PEAK_TFLOPS is the card's dense FP32
# peak (H100 SXM and H200: 67), which utilisation is measured against.
# A dry run here, on the CPU with small K and the project's own environment:
#   PYTHON=.venv/bin/python DEVICE=cpu WHEELS=no MINILM_KS=1,2 SMOLLM2_KS=1 \
#       bash benchmarks/device/run.sh
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
PEAK_TFLOPS=${PEAK_TFLOPS:-67}
MINILM_KS=${MINILM_KS:-1,4,16,64,128}
SMOLLM2_KS=${SMOLLM2_KS:-1,4,16}
mkdir -p "$OUT"
if [ "${WHEELS:-yes}" = yes ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .device/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
export SFEDLORA_DATA=$PWD/.device/data PYTHONUNBUFFERED=1
"$PYTHON" benchmarks/device/random_models.py .device/models /tmp/models || exit 1

timeout 240 "$PYTHON" benchmarks/batched.py --workload minilm --ks "$MINILM_KS" --steps 2 \
    --peak-tflops "$PEAK_TFLOPS" --save "$OUT/minilm-$DEVICE.json" \
    model.name=/tmp/models/minilm model.device="$DEVICE"
timeout 200 "$PYTHON" benchmarks/batched.py --workload smollm2 --ks "$SMOLLM2_KS" --steps 1 \
    --peak-tflops "$PEAK_TFLOPS" --save "$OUT/smollm2-$DEVICE.json" \
    model.name=/tmp/models/smollm2 model.device="$DEVICE"
"$PYTHON" benchmarks/batched.py --report "$OUT"/*-"$DEVICE".json
