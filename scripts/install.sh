#!/usr/bin/env bash
# Install sibylq with its extras into the active Python environment:
#   scripts/install.sh                         # everything: llama, openai, server, redis-server, dev
#   scripts/install.sh openai                  # a remote-API worker or producer only
# Set CMAKE_ARGS yourself to build llama.cpp another way (e.g. -DGGML_CUDA=on for GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-llama,openai,server,redis-server,dev}"

if [[ ",$extras," == *",llama,"* || ",$extras," == *",server,"* ]]; then
  export CMAKE_ARGS="${CMAKE_ARGS:-$(scripts/llama_cmake_args.sh)}"
  echo "llama-cpp-python CMAKE_ARGS: ${CMAKE_ARGS:-(default native build)}"
fi
python -m pip install -e ".[${extras}]"

if [[ ",$extras," == *",llama,"* ]] && ! python scripts/check_llama.py; then
  # pip reuses a cached llama-cpp-python wheel whatever CMAKE_ARGS say: one built for
  # another CPU crashes at the first decode. Rebuild it for this one.
  echo "llama-cpp-python does not run on this CPU; rebuilding it (a few minutes)"
  version=$(python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
  python -m pip cache remove 'llama_cpp_python*' || true
  python -m pip install --force-reinstall --no-deps "llama-cpp-python==${version}"
  python scripts/check_llama.py
fi
echo "sibylq installed."
