#!/usr/bin/env bash
# The SD1.5-architecture training-step benchmark on a CUDA GPU (benchmarks/gpu.py), bounded to 8 minutes:
# 512 px, batch 4 and 16, bf16-mixed; floor, OFT-Control (paper, fast), ControlNet, peft OFT (paper, fast);
# plain, gradient checkpointing, torch.compile. Prints the table and writes it into benchmarks/README.md.
#   benchmarks/gpu.sh [--no-write] [--json out.json] [--batches 4,16] ...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec timeout --signal=INT --kill-after=20 "${GPU_BENCH_TIMEOUT:-480}" "$PYTHON" -m benchmarks.gpu "$@"
