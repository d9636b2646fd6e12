#!/usr/bin/env bash
# Check and time the Pallas dequant-matmul kernel on a GPU (or TPU): run from a checkout on a
# machine with jax[cuda12] (or jax[tpu]) installed, after `pip install -e '.[test]'`.
#
#   bash bench/gpu.sh [OUT_DIR]          # default: bench/results
#
# 1. The kernel's tests compiled for the accelerator (Triton on NVIDIA, Mosaic on TPU), not in
#    interpret mode: every spec against the float64 reference.
# 2. `cascade bench matmul` on the 7B shapes, float32 dot vs the reference xla backend vs pallas,
#    batches 1-64, into OUT_DIR/matmul-<platform>.json.
# 3. `cascade bench decode` of the default large model at fp32/int8/int4 (auto-selected backend).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
platform="$(python -c 'import jax; print(jax.default_backend())')"
if [ "$platform" = "cpu" ]; then
  echo "error: no GPU/TPU visible to jax (jax.default_backend() is cpu); install jax[cuda12] or jax[tpu]" >&2
  exit 1
fi
echo "== pallas kernel tests on $platform (compiled, not interpreted)" >&2
CASCADE_PALLAS_INTERPRET=0 python -m pytest -q tests/quant/test_kernels_pallas.py tests/quant/test_dequant_matmul.py
echo "== bench matmul: f32 vs xla vs pallas" >&2
cascade bench matmul --out "$out/matmul-$platform.json"   # every backend that runs each spec, side by side
echo "== bench decode: default-large" >&2
cascade bench decode default-large --spec fp32,int8,int4-g32 --out "$out/decode-default-large-$platform.json"
