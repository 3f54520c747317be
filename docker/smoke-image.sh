#!/usr/bin/env bash
# Runs an image as a home server would and checks what its users rely on:
#
#   docker/smoke-image.sh IMAGE [full|llama]
#
# - first start installs the default models into a fresh volume, then /readyz answers through the
#   published port (loopback only), and the HEALTHCHECK (on HEARTH_PORT, here not 8080, and deaf
#   to proxy settings) says healthy;
# - the web UI's page is served at /;
# - chat and embeddings answer (and, on the full image, speech heard back by a transcription);
# - no process in the container runs as root; the bytecode is there (imports are not slowed);
# - `docker stop` during a stream lets the stream finish and the container exit 0 within 5 s,
#   and does the same during the first start's model install;
# - a /models folder the container's user cannot write stops it with a message saying what to
#   chown, not a traceback;
# - a backend run from the image on "another machine" (a container on a network of its own,
#   with the models volume read-only) serves a model the gateway places there (placement:
#   static), reached with the token.
#
# Everything it makes (containers, volumes) is removed at the end. Prints the image's size, its
# first start time and the stop times.
set -euo pipefail
image=${1:?usage: smoke-image.sh IMAGE [full|llama]}
kind=${2:-full}
run_id=hearth-smoke-$$
key=smoke-$$-key
port_inside=9090
failures=0
made_containers=()
made_volumes=()
made_networks=()
scratch=$(mktemp -d /tmp/hearth-smoke-XXXXXX)

cleanup() {
  for c in "${made_containers[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
  for v in "${made_volumes[@]}"; do docker volume rm -f "$v" >/dev/null 2>&1 || true; done
  for n in "${made_networks[@]}"; do docker network rm "$n" >/dev/null 2>&1 || true; done
  rm -rf "$scratch"
}
trap cleanup EXIT

ok() { echo "ok: $*"; }
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
now() { date +%s.%N; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

start() {  # NAME VOLUME [docker run options...]: a detached container on a loopback port
  local name=$1 volume=$2
  shift 2
  docker volume create "$volume" >/dev/null
  made_volumes+=("$volume")
  made_containers+=("$name")
  docker run -d --name "$name" -v "$volume:/models" -p "127.0.0.1::$port_inside" \
    -e HEARTH_PORT=$port_inside -e HEARTH_API_KEYS="$key" "$@" "$image" >/dev/null
}

url() { echo "http://$(docker port "$1" "$port_inside/tcp" | head -n 1)"; }

api() {  # CONTAINER PATH [curl options...]
  local name=$1 path=$2
  shift 2
  curl -sS --noproxy '*' --max-time 120 -H "Authorization: Bearer $key" "$@" "$(url "$name")$path"
}

stopped_within() {  # CONTAINER LIMIT WHAT: docker stop, timed; exit code 0
  local name=$1 limit=$2 what=$3 began took code
  began=$(now)
  docker stop "$name" >/dev/null
  took=$(seconds_since "$began")
  code=$(docker inspect -f '{{.State.ExitCode}}' "$name")
  if awk -v t="$took" -v l="$limit" 'BEGIN { exit !(t <= l) }' && [ "$code" = 0 ]; then
    ok "docker stop $what: exit 0 after $took s"
  else
    fail "docker stop $what: exit $code after $took s (limit $limit s)"
    docker logs --tail 20 "$name" >&2 || true
  fi
}

echo "image $image ($kind): $(docker image inspect -f '{{.Size}}' "$image" \
  | awk '{printf "%.2f GB", $1 / 1e9}')"

# First start: the default models installed into a fresh volume, then ready. -------------------
main=$run_id-main
began=$(now)
start "$main" "$run_id-models" --health-interval 2s --health-start-period 1s
ready=
for _ in $(seq 1 600); do
  if curl -fsS --noproxy '*' --max-time 2 "$(url "$main")/readyz" >/dev/null 2>&1; then
    ready=1
    break
  fi
  if [ "$(docker inspect -f '{{.State.Running}}' "$main")" != true ]; then
    break
  fi
  sleep 1
done
if [ -z "$ready" ]; then
  docker logs --tail 40 "$main" >&2
  fail "not ready after first start"
  exit 1
fi
ok "first start (default models installed, then serving): $(seconds_since "$began") s"

health=
for _ in $(seq 1 30); do
  health=$(docker inspect -f '{{.State.Health.Status}}' "$main")
  [ "$health" = healthy ] && break
  sleep 1
done
[ "$health" = healthy ] && ok "HEALTHCHECK healthy on HEARTH_PORT=$port_inside" \
  || fail "HEALTHCHECK says $health"
if docker exec -e HTTP_PROXY=http://127.0.0.1:9 -e http_proxy=http://127.0.0.1:9 "$main" \
  python /usr/local/bin/hearth-healthcheck; then
  ok "the healthcheck ignores proxy settings"
else
  fail "the healthcheck went through a proxy"
fi

# The web UI: the page and its script come from the installed package. ------------------------
page=$(curl -sS --noproxy '*' --max-time 10 -H 'Accept: text/html' "$(url "$main")/")
script=$(curl -sS --noproxy '*' --max-time 10 -o /dev/null -w '%{http_code}' "$(url "$main")/ui/app.js")
if echo "$page" | grep -q '/ui/app.js' && [ "$script" = 200 ]; then
  ok "the web UI is served at /"
else
  fail "the web UI: / gave ${page:0:80}, /ui/app.js $script"
fi

# The API. -------------------------------------------------------------------------------------
answer=$(api "$main" /v1/chat/completions -H 'content-type: application/json' \
  -d '{"model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0,
       "messages": [{"role": "user", "content": "Say hello."}]}')
if echo "$answer" | python3 -c 'import json, sys; assert json.load(sys.stdin)["choices"][0]["message"]["content"]'; then
  ok "chat"
else
  fail "chat: $answer"
fi
if [ "$kind" = full ]; then
  embedder=all-minilm-l6-v2 width=384  # Transformers, on torch
else  # llama.cpp's embeddings, from the chat model's GGUF: a model YAML written into the volume
  embedder=smollm2-embeddings width=576
  docker exec "$main" sh -c 'printf "%s\n" "name: smollm2-embeddings" "backend: llama" "embeddings: true" \
    "model: smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" \
    > /models/smollm2-embeddings.yaml'
fi
answer=$(api "$main" /v1/embeddings -H 'content-type: application/json' \
  -d "{\"model\": \"$embedder\", \"input\": \"a home server\"}")
if echo "$answer" | python3 -c "import json, sys; assert len(json.load(sys.stdin)['data'][0]['embedding']) == $width"; then
  ok "embeddings ($embedder)"
else
  fail "embeddings: $answer"
fi
if [ "$kind" = full ]; then
  # The voice half: the image's own Piper voice says it, its Whisper hears it.
  api "$main" /v1/audio/speech -H 'content-type: application/json' -o "$scratch/speech.wav" \
    -d '{"model": "joe-us-piper", "input": "The quick brown fox jumps over the lazy dog.",
         "response_format": "wav"}'
  if head -c 4 "$scratch/speech.wav" | grep -q RIFF; then
    ok "speech: $(wc -c < "$scratch/speech.wav") bytes of WAV"
  else
    fail "speech: $(head -c 300 "$scratch/speech.wav")"
  fi
  answer=$(api "$main" /v1/audio/transcriptions -F model=whisper-base -F "file=@$scratch/speech.wav")
  if echo "$answer" | python3 -c 'import json, sys
answer = json.load(sys.stdin)
assert "error" not in answer and "fox" in answer["text"].lower()'; then
    ok "transcription of that speech: $answer"
  else
    fail "transcription: $answer"
  fi
fi

# Who runs, and how fast it imports. -----------------------------------------------------------
root_processes=$(docker top "$main" -eo uid,pid,comm | awk 'NR > 1 && $1 == 0')
if [ -z "$root_processes" ]; then
  ok "no process runs as root (uids: $(docker top "$main" -eo uid,pid | awk 'NR > 1 { print $1 }' | sort -u | tr '\n' ' '))"
else
  fail "processes running as root: $root_processes"
fi
modules="gateway.app, backends.llama.backend"
[ "$kind" = full ] && modules="$modules, backends.transformers.backend, torch, transformers"
imports=$(docker exec "$main" python -c "import time; t = time.perf_counter()
import $modules
print(f'{time.perf_counter() - t:.1f}')")
ok "imports ($modules) in a running container: $imports s"
if docker exec "$main" python -c 'import asyncio, importlib.util, os, sys
import gateway.app
for module in (asyncio, gateway.app):
    if not os.path.exists(importlib.util.cache_from_source(module.__file__)):
        sys.exit(f"no bytecode for {module.__file__}")'; then
  ok "bytecode compiled at build time (the standard library and Hearth)"
else
  fail "no bytecode in the image"
fi

# A backend from this image on another machine: a container on a network of its own, the models
# volume read-only, the token in the volume; the gateway places the model there (static). -------
net=$run_id-net
docker network create "$net" >/dev/null
made_networks+=("$net")
docker network connect "$net" "$main"
docker exec "$main" sh -c 'mkdir -p /models/.hearth && umask 077 \
  && python -c "import secrets; print(secrets.token_hex(32))" > /models/.hearth/backend.token'
far=$run_id-far
made_containers+=("$far")
docker run -d --name "$far" --network "$net" -v "$run_id-models:/models:ro" "$image" \
  python -m backends.llama --address 0.0.0.0:50051 \
  --token-file /models/.hearth/backend.token >/dev/null
docker exec "$main" sh -c "printf '%s\n' 'name: far' 'backend: llama' 'keep_alive: 0' \
  'model: smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf' \
  'placement: {static: {addresses: [\"$far:50051\"], token_file: .hearth/backend.token}}' \
  > /models/far.yaml"
answer=$(api "$main" /v1/chat/completions -H 'content-type: application/json' \
  -d '{"model": "far", "max_tokens": 8, "temperature": 0,
       "messages": [{"role": "user", "content": "Say hello."}]}')
# keep_alive 0: unloaded (the backend stays up: it is its supervisor's) once it has answered.
for _ in $(seq 1 50); do
  docker logs "$far" 2>&1 | grep -q 'unloaded far' && break
  sleep 0.2
done
far_log=$(docker logs "$far" 2>&1)
if echo "$answer" | python3 -c 'import json, sys; assert json.load(sys.stdin)["choices"][0]["message"]["content"]' \
   && echo "$far_log" | grep -q 'token required' && echo "$far_log" | grep -q 'loaded far' \
   && echo "$far_log" | grep -q 'unloaded far'; then
  ok "a backend container from the image on another network, placed statically: chat, then unloaded"
else
  fail "static placement on a backend container: $answer"
  echo "$far_log" | tail -n 20 >&2
fi
docker exec "$main" rm /models/far.yaml
docker rm -f "$far" >/dev/null

# docker stop during a stream: the stream finishes, the container exits 0 within 5 s. -----------
api "$main" /v1/chat/completions -N -H 'content-type: application/json' \
  -d '{"model": "smollm2-135m-instruct", "max_tokens": 100, "stream": true, "temperature": 0,
       "messages": [{"role": "user", "content": "Write a long story about the sea."}]}' \
  > "$scratch/stream.txt" 2>&1 &
client=$!
for _ in $(seq 1 100); do
  grep -q '^data: {' "$scratch/stream.txt" 2>/dev/null && break
  sleep 0.05
done
if grep -q '^data: \[DONE\]' "$scratch/stream.txt"; then
  fail "the stream ended before docker stop: nothing was left to finish"
fi
stopped_within "$main" 5 "during a stream"
wait "$client" || true
if [ "$(grep -c '^data: ' "$scratch/stream.txt")" -gt 1 ] \
   && tail -n 3 "$scratch/stream.txt" | grep -q '^data: \[DONE\]'; then
  ok "the stream in flight finished ($(grep -c '^data: {' "$scratch/stream.txt") chunks, then [DONE])"
else
  fail "the stream was cut: $(tail -c 300 "$scratch/stream.txt")"
fi

# docker stop during the first start's install. --------------------------------------------------
installing=$run_id-install
start "$installing" "$run_id-install-models"
for _ in $(seq 1 100); do
  docker logs "$installing" 2>&1 | grep -qi 'install\|download\|smollm2' && break
  sleep 0.1
done
stopped_within "$installing" 5 "during the first start's model install"

# No keys given: the first start makes them, prints them, and a request without one is refused.
keyless=$run_id-keyless
docker volume create "$run_id-keyless-models" >/dev/null
made_volumes+=("$run_id-keyless-models")
made_containers+=("$keyless")
docker run -d --name "$keyless" -v "$run_id-keyless-models:/models" -p "127.0.0.1::8080" \
  -e HEARTH_DEFAULT_MODELS= "$image" >/dev/null
keyless_url="http://$(docker port "$keyless" 8080/tcp | head -n 1)"
for _ in $(seq 1 120); do
  curl -fsS --noproxy '*' --max-time 2 "$keyless_url/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
household=$(docker logs "$keyless" 2>&1 | sed -n 's/^hearth:   household key: //p' | head -n 1)
without=$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' "$keyless_url/v1/models")
with=$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $household" \
  "$keyless_url/v1/models")
if [ -n "$household" ] && [ "$without" = 401 ] && [ "$with" = 200 ]; then
  ok "no keys given: keys made and printed; without one 401, with the household key 200"
else
  fail "no keys given: printed key '${household:0:6}…', without $without, with $with"
fi
docker rm -f "$keyless" >/dev/null

# A /models the container's user cannot write. ------------------------------------------------
unwritable=$(mktemp -d /tmp/hearth-smoke-root-XXXXXX)
chmod 555 "$unwritable"  # nobody but root may write, whoever owns it
made_containers+=("$run_id-unwritable")
set +e
message=$(timeout 120 docker run --rm --name "$run_id-unwritable" -v "$unwritable:/models" \
  -e HEARTH_DEFAULT_MODELS= -e HEARTH_INSECURE=1 "$image" 2>&1)
code=$?
set -e
rmdir "$unwritable"
if [ "$code" = 78 ] && echo "$message" | grep -q 'chown'; then
  ok "an unwritable /models: exit 78 and what to chown"
else
  fail "an unwritable /models: exit $code: $message"
fi

if [ "$failures" -gt 0 ]; then
  echo "$image: $failures check(s) failed" >&2
  exit 1
fi
echo "$image: every check passed"
