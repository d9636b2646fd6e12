#!/usr/bin/env bash
# Install Google's qwix (PyPI `qwix`) into a private folder, for bench/qwix_peer.py to compare our
# PTQ (RTN, GPTQ, AWQ) with qwix's on the same calibration and evaluation.
# A benchmark-only peer: never a dependency of cascade, never installed into the main environment.
# `--no-deps --target`: qwix's requirements (jax, jaxlib, flax>=0.12, numpy, opt_einsum, absl-py)
# are taken from the environment that runs the bench, as they are; nothing there is upgraded.
# Idempotent: does nothing when that version is already in the folder.
#
#   bash bench/qwix_setup.sh [DIR]      # default: ~/.cache/cascade/qwix-lib; prints DIR
#
# QWIX_VERSION picks the version (default 0.1.8, the newest the mirror served when this was written;
# checked to import with jax 0.10.2 / flax 0.12).  bench/qwix_peer.py looks in the same default
# folder, or in $CASCADE_QWIX_LIB.
set -euo pipefail
dir="${1:-${CASCADE_QWIX_LIB:-${XDG_CACHE_HOME:-$HOME/.cache}/cascade/qwix-lib}}"
version="${QWIX_VERSION:-0.1.8}"
python="${PYTHON:-python3}"

installed() {
  [ -f "$dir/qwix/version.py" ] && [ -d "$dir/qwix-$version.dist-info" ]
}

if ! installed; then
  mkdir -p "$dir"
  # --upgrade: replace an older copy in the folder (only the folder is touched)
  "$python" -m pip install -q --no-deps --upgrade --target "$dir" "qwix==$version" >&2
fi
# qwix imports from the running environment: check that its requirements are there (not installed here)
PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" "$python" - <<'EOF' >&2
import jax, flax
import qwix
from qwix._src.core import qarray  # noqa: F401  RTN (qarray.quantize / dequantize)
from qwix.contrib import awq_core, gptq_core, padded_ptq  # noqa: F401
print(f"qwix {qwix.__version__} (jax {jax.__version__}, flax {flax.__version__}) from {qwix.__file__}")
EOF
echo "$dir"
