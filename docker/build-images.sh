#!/bin/sh
# Builds both images from the repository root, and prints their sizes and build times:
#
#   docker/build-images.sh [NAME]       NAME:latest (every backend) and NAME:llama (slim); hearth
#
# The full image's torch is the CPU build from PyTorch's CPU index. Where this machine cannot
# reach that index, the CPU wheel that pip's own configuration finds here (pip download
# torch==2.13.0) goes into docker/wheels/ and the build installs it; a wheel that is not a CPU
# build is refused, so a CUDA torch never ends up in the image unnoticed.
set -eu
name=${1:-hearth}
cd "$(dirname "$0")/.."
index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python

torch_version=2.13.0  # as the Makefile's TORCH and the Dockerfile's TORCH_SPEC
if ! ls docker/wheels/torch-"$torch_version"+cpu-*.whl >/dev/null 2>&1 \
   && ! "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" "$index" 2>/dev/null; then
  echo "build-images: $index cannot be reached; the torch wheel comes from pip's configuration"
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --python-version 3.11 --platform manylinux_2_28_x86_64 --only-binary=:all: \
    --dest docker/wheels "torch==$torch_version"
  if ! ls docker/wheels/torch-"$torch_version"+cpu-*.whl >/dev/null 2>&1; then
    rm -f docker/wheels/torch-*.whl  # not a CPU build: never sent to a build
    echo "build-images: pip found no CPU build of torch==2.13.0 (only $(ls docker/wheels))" >&2
    exit 1
  fi
fi

log=$(mktemp /tmp/hearth-build-XXXXXX)
trap 'rm -f "$log"' EXIT
build() {  # TARGET TAG
  started=$(date +%s)
  if ! docker build -f docker/Dockerfile --target "$1" -t "$2" \
       --build-arg TORCH_INDEX_URL="$index" . > "$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "build-images: building $2 failed" >&2
    exit 1
  fi
  echo "built $2 in $(( $(date +%s) - started )) s: $(docker image inspect -f '{{.Size}}' "$2" \
    | awk '{printf "%.2f GB (%d MB)", $1 / 1e9, $1 / 1e6}')"
}
build llama "$name:llama"
build full "$name:latest"
