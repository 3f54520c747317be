#!/bin/sh
# The last build step of an image's venv:
#
#   finish-venv.sh VENV_DIR MODULE...
#
# Bytecode, compiled now: the image's unprivileged user cannot write it later, and without it
# every backend start imports from source (9.5 s against 4.1 s for the main imports). Only for
# Hearth's own packages and what importing MODULEs (the backends, their engines) loads: bytecode
# for every file in the full image's venv would be 295 MB. unchecked-hash: it is used whatever
# the files' times are after COPY. Then the files nothing loads go: torch's C++ headers, tests
# and test binaries.
set -eu
venv=${1:?usage: finish-venv.sh VENV_DIR MODULE...}
shift
"$venv/bin/python" - "$@" <<'PY'
import importlib
import py_compile
import sys
import sysconfig
from pathlib import Path

sys.dont_write_bytecode = True  # only the unchecked-hash bytecode below
site = Path(sysconfig.get_paths()["purelib"]).resolve()
for name in sys.argv[1:]:
    importlib.import_module(name)
files = {
    Path(module.__file__).resolve()
    for module in list(sys.modules.values())
    if getattr(module, "__file__", None) and module.__file__.endswith(".py")
}
for package in ("gateway", "backends", "protos"):
    files.update((site / package).rglob("*.py"))
compiled = 0
for path in sorted(files):
    if site in path.parents:
        py_compile.compile(
            str(path), quiet=1, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH
        )
        compiled += 1
print(f"finish-venv: bytecode for {compiled} files")
PY
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$site/torch/include" "$site/torch/test"
if [ -d "$site/torch/bin" ]; then  # test binaries and protoc; torch_shm_manager is used
  find "$site/torch/bin" -type f ! -name torch_shm_manager -delete
fi
rm -rf /root/.cache/pip
echo "finish-venv: $(du -sh "$venv" | cut -f1)"
