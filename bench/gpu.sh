#!/usr/bin/env bash
# One prepared GPU benchmark (NVIDIA H100/H200): SD 1.5 architecture, random weights (nothing is downloaded),
# fp16, 512x512, 30 ddim steps, batch 1 and 8, here vs diffusers, eager and with torch.compile; prints a table.
# Made to finish in under 10 minutes: bench/gpu_bench.py starts no new configuration after --budget-s.
#
#   bash bench/gpu.sh                 # from anywhere; PYTHON=/path/to/python to pick the interpreter
#
# It needs a CUDA build of torch already installed. If diffusers/transformers (test-only dependencies) or the
# project's small runtime packages are missing, it pip-installs them at the versions pyproject.toml pins
# (pip packages only; no model weights, no other downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" - <<'PYCHECK'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU visible to torch {torch.__version__}: this benchmark needs one")
print(f"torch {torch.__version__} sees {torch.cuda.get_device_name()}")
PYCHECK

missing=()
"$PY" -c "import diffusers" 2>/dev/null || missing+=("diffusers==0.36.0")        # pyproject dev extra pin
"$PY" -c "import transformers" 2>/dev/null || missing+=("transformers==4.57.6")  # pyproject dev extra pin
for pkg in safetensors PIL numpy yaml; do
    "$PY" -c "import $pkg" 2>/dev/null || missing+=("$(case $pkg in PIL) echo pillow;; yaml) echo pyyaml;; *) echo $pkg;; esac)")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing missing pip packages: ${missing[*]}"
    "$PY" -m pip install -q "${missing[@]}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" bench/gpu_bench.py --budget-s "${BUDGET_S:-480}" "$@"
