#!/usr/bin/env bash
# Build llama.cpp (through llama-cpp-python, from its PyPI source distribution) into a separate
# virtual environment, for `cascade bench decode --llamacpp` to time as the speed peer.
# A benchmark-only tool: never a dependency of cascade.  Takes about 10 minutes on 2 cores.
#
#   bash bench/llamacpp_venv.sh [VENV]     # default: ~/.cache/cascade/llamacpp-venv
#
# Native CPU flags (-march=native) as llama.cpp's own build uses by default: the peer runs as
# fast as it can on this machine.
set -euo pipefail
venv="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/cascade/llamacpp-venv}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "$venv/bin/python"
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >&2
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
  "$venv/bin/python" -m pip install -q --no-binary llama-cpp-python "llama-cpp-python==$version" >&2
"$venv/bin/python" -c "import llama_cpp; print(llama_cpp.__version__)" >&2
echo "$venv/bin/python"
