#!/usr/bin/env bash
# One command on a CUDA machine with the stock PyTorch wheel: export resnet18, efficientnet_b0 and a CaSE
# efficientnet_b0 bundle, compare torch-CUDA (FP32, TF32, fp16 / bf16 autocast) and ONNX Runtime CUDA (with
# fsdeploy[gpu]) against ONNX Runtime on the CPU, CUDA-event latency at batch 1 / 16 / 64; under 4 minutes.
#   bash scripts/gpu_check.sh [--out result.json]
#   bash scripts/gpu_check.sh --dry-run     # every step on this CPU at 32 px (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 240 python -m fsdeploy.bench.gpu_check "$@"
