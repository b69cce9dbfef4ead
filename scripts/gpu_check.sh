#!/usr/bin/env bash
# On a GPU machine: the CUDA tests, then the GPU benchmark, logs and rows written to OUT_DIR.
#   bash scripts/gpu_check.sh OUT_DIR
# Packages the machine lacks (diffusers, ...) can come as wheels in .whl/ (pip download them elsewhere);
# they are installed to /tmp/site, outside the machine's own environment.
set -uo pipefail
out=${1:-gpu_out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/env.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$out/env.txt"
python3 -m pytest -p no:cacheprovider -q -rs tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" | tail -15
python3 benchmarks/gpu.py --out "$out/gpu.json" "${@:2}" 2>&1 | grep -v -e "experimental feature" -e "kept in float32" | tee "$out/gpu.log"
