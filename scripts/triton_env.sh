#!/usr/bin/env bash
# The serving virtual environment for `fsdeploy triton`: PyTriton's bundled tritonserver + Python backend,
# tritonclient, and what the Python-backend models import (numpy<2, ONNX Runtime, Pillow).
# Why a separate venv: nvidia-pytriton pins numpy<2, and its Python backend stub garbles BYTES tensors
# with numpy 2, while fsdeploy's own environment uses numpy 2. fsdeploy itself is not installed here:
# the repository's model.py files put this checkout on sys.path (recorded at export).
# Usage: bash scripts/triton_env.sh [VENV]   (default .venv-triton; FSDEPLOY_TRITON_VENV overrides too)
# Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${FSDEPLOY_TRITON_VENV:-.venv-triton}}"
PY="${PYTHON:-python}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# same interpreter version as fsdeploy's: the server picks the backend stub for it
"$VENV/bin/python" -m pip install -q \
  "nvidia-pytriton==0.7.0" "tritonclient[http]>=2.50" "numpy>=1.24,<2" "onnxruntime>=1.18,<1.33" "pillow>=10"
"$VENV/bin/python" - <<'PY'
import numpy, onnxruntime, PIL
import tritonclient.http
from pathlib import Path
import pytriton
server = Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
assert server.is_file(), f"PyTriton wheel has no tritonserver at {server}"
print(f"triton env ready: numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__}, pillow {PIL.__version__}, {server}")
PY
