#!/bin/sh
# Installs torch into a venv, the build this machine should have, and says which:
#
#   docker/install-torch.sh VENV_PYTHON [SPEC]          (SPEC: torch==2.13.0)
#
# PyPI's torch is the CUDA build (gigabytes of CUDA libraries); the CPU build comes from
# PyTorch's own CPU index. TORCH_BUILD picks: `cpu`, `cuda` (PyPI's), or `auto` (the default:
# cuda where an NVIDIA GPU is found, else cpu). For cpu, a torch-*+cpu-*.whl in TORCH_WHEELS (a
# folder) is used first; where PyTorch's index (TORCH_CPU_INDEX) cannot be reached, pip's own
# configuration decides where the pinned version comes from. `make run` and `make test` install
# torch through this script (the image build, docker/Dockerfile, takes the CPU build its own way).
# A torch of the other build already in the venv is uninstalled first: pip would keep it.
set -eu
python=${1:?usage: install-torch.sh VENV_PYTHON [SPEC]}
spec=${2:-torch==2.13.0}
build=${TORCH_BUILD:-auto}
index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ "$build" = auto ]; then
  build=cpu
  # nvidia-smi, not /proc/driver/nvidia: a container on a GPU host sees the driver without
  # access to a GPU.
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    build=cuda
  fi
fi

install() { "$python" -m pip install --quiet --disable-pip-version-check "$@"; }
installed=$("$python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
case "$build:$installed" in
  cpu:*+cpu | cuda: | cpu: | *:) ;;
  cpu:*)
    echo "torch: replacing the installed $installed (not the CPU build)"
    "$python" -m pip uninstall --quiet -y torch
    ;;
  cuda:*+cpu)
    echo "torch: replacing the installed $installed (the CPU build)"
    "$python" -m pip uninstall --quiet -y torch
    ;;
esac

case "$build" in
  cuda)
    echo "torch: the CUDA build from PyPI ($spec) for this NVIDIA GPU (TORCH_BUILD=cpu: the CPU build)"
    install "$spec"
    ;;
  cpu)
    wheel=
    if [ -n "${TORCH_WHEELS:-}" ]; then
      wheel=$(ls "$TORCH_WHEELS"/torch-*+cpu-*.whl 2>/dev/null | head -n 1 || true)
    fi
    if [ -n "$wheel" ]; then
      echo "torch: the CPU build, from $wheel"
      install "$wheel"
    elif "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" "$index" 2>/dev/null; then
      echo "torch: the CPU build from $index ($spec; TORCH_BUILD=cuda: PyPI's CUDA build)"
      install --index-url "$index" "$spec"
    else
      echo "torch: $index cannot be reached; pip's own configuration decides where $spec comes from"
      install "$spec"
    fi
    ;;
  *)
    echo "TORCH_BUILD must be auto, cpu or cuda, not '$build'" >&2
    exit 2
    ;;
esac
"$python" -c "import torch; print('torch: installed', torch.__version__, '(CUDA ' + torch.version.cuda + ')' if torch.version.cuda else '(CPU build)')"
if [ "$build" = cpu ] && ! "$python" -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
  echo "torch: a CUDA build was installed where the CPU build was asked for" >&2
  exit 1
fi
if [ "$build" = cuda ] && ! "$python" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
  echo "torch: the CPU build was installed where the CUDA build was asked for" >&2
  exit 1
fi
