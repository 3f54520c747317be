#!/usr/bin/env bash
# The image's install steps, in one place: the Dockerfile runs this script, and `make test` runs
# it in CI on a clean venv, so the recipe is exercised where images cannot be built.
#
#   docker/install.sh VENV_DIR
#
# TORCH_INDEX_URL: where the CPU build of torch comes from (the Dockerfile sets PyTorch's CPU
# index; empty means pip's own sources). PIP_NO_CACHE: set to build llama-cpp-python afresh
# (pip's wheel cache ignores CMAKE_ARGS).
set -euo pipefail

target=${1:?usage: docker/install.sh VENV_DIR}
source_dir=$(cd "$(dirname "$0")/.." && pwd)
torch_spec=${TORCH_SPEC:-torch==2.13.0}

python3 -m venv "$target"
pip=("$target/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip

# CPU torch first, pinned, so nothing after it pulls a multi-GB CUDA build.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" install --quiet --index-url "$TORCH_INDEX_URL" "$torch_spec"
else
  "${pip[@]}" install --quiet "$torch_spec"
fi

# A portable llama.cpp: no -march=native, so the image runs on any x86-64 with AVX2.
cache=()
[ -n "${PIP_NO_CACHE:-}" ] && cache=(--no-cache-dir)
CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS:-}" "${pip[@]}" install --quiet "${cache[@]}" \
  "llama-cpp-python>=0.3.36,<0.4"

# Hearth itself with every backend, installed (not editable) as in the image.
"${pip[@]}" install --quiet "${source_dir}[all]"

find "$target" -name '__pycache__' -type d -prune -exec rm -rf {} +
echo "installed Hearth into $target ($(du -sh "$target" | cut -f1))"
