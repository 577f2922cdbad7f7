#!/usr/bin/env bash
# The training-step benchmark on a CUDA GPU (benchmarks/gpu.py), each run bounded to 8 minutes:
# SD1.5 architecture at 512 px, batch 4 and 16, bf16-mixed; floor, OFT-Control (paper, fast), ControlNet, peft OFT
# (paper, fast); plain, gradient checkpointing, torch.compile. Then the SDXL rows: SDXL-base-1.0 architecture at
# 1024 px, batch 1 and 4, bf16-mixed; floor, OFT-Control (paper, fast), ControlNet; plain, gradient checkpointing.
# Prints the tables and writes them into benchmarks/README.md.
#   benchmarks/gpu.sh [--no-write] [--json out.json] [--batches 4,16] ...   (both)
#   benchmarks/gpu.sh --backbone sdxl [...]                                   (one: the named backbone)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
bench() { timeout --signal=INT --kill-after=20 "${GPU_BENCH_TIMEOUT:-480}" "$PYTHON" -m benchmarks.gpu "$@"; }
if [[ " $* " == *" --backbone "* ]]; then
  bench "$@"
else
  bench "$@"
  bench --backbone sdxl "$@"
fi
