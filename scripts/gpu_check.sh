#!/usr/bin/env bash
# On a GPU machine: the CUDA tests, then the GPU benchmark, logs and rows written to OUT_DIR.
#   bash scripts/gpu_check.sh OUT_DIR
# Packages the machine lacks (diffusers, ...) can come as wheels in .whl/ (pip download them elsewhere);
# they are installed to /tmp/site, outside the machine's own environment. For the benchmark's kernel rows too:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#       --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --pre -d .whl \
#       diffusers==0.42.1 av==18.1.0 torchao flash-attn-4          # 46 MB
# flash-attn-4 (pure Python) also needs nvidia-cutlass-dsl, whose CUDA 13 libraries wheel alone is 92 MB (4.8.1):
# past what a 64 MiB carry takes, so its row is an error row unless the GPU machine can install it.
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
