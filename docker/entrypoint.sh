#!/bin/sh
# Installs the default models into the /models volume on first start (later starts find them and
# only check them), then runs the command. HEARTH_DEFAULT_MODELS="" skips the installs.
#
# Inside a container Hearth listens on all the container's interfaces (Docker forwards the port
# there), which it refuses to do without keys. So, unless keys are given (HEARTH_API_KEYS,
# HEARTH_ADMIN_KEYS, HEARTH_KEYS_FILE) or HEARTH_INSECURE=1 says every client is trusted, the first
# start makes a keys file in the volume, with an admin key and an inference key, and says where
# it is; later starts use it.
set -eu
# Anything but `hearth ...` runs as it is: a backend started from this image on another machine
# (`python -m backends.llama --address 0.0.0.0:50051 --token-file ...`, see docker/deploy/) must
# neither make keys in, nor install models into, a models dir it shares with the gateway.
case "${1:-}" in
  hearth) ;;
  *) exec "$@" ;;
esac
models_dir=${HEARTH_MODELS_DIR:-/models}
# A models dir mounted read-only (-v ...:/models:ro) is served as it is: nothing is installed
# into it, and the keys must be given. One this user cannot write is a mistake to say plainly.
read_only=
if awk -v dir="$models_dir" '$2 == dir && $4 ~ /^ro(,|$)/ { found = 1 } END { exit !found }' \
    /proc/mounts 2>/dev/null; then
  read_only=1
elif ! [ -w "$models_dir" ] || ! [ -x "$models_dir" ]; then
  cat >&2 <<EOF
hearth: $models_dir is not writable by this container's user (uid $(id -u), gid $(id -g)).
hearth: A folder bind-mounted there must belong to that user. On the host, run:
hearth:   sudo chown -R $(id -u):$(id -g) /path/to/that/folder
hearth: or use a named volume (docker volume create hearth-models), which Docker sets up itself,
hearth: or mount it read-only (:ro) with keys given and HEARTH_DEFAULT_MODELS= (nothing installed).
EOF
  exit 78  # EX_CONFIG: a restart will not help until the folder is fixed
fi
if [ -z "${HEARTH_API_KEYS:-}${HEARTH_ADMIN_KEYS:-}${HEARTH_KEYS_FILE:-}" ] \
   && [ "${HEARTH_INSECURE:-0}" != "1" ] && [ "${HEARTH_INSECURE:-}" != "true" ]; then
  keys="$models_dir/.hearth/keys.yaml"
  if [ ! -f "$keys" ] && [ -n "$read_only" ]; then
    echo "hearth: $models_dir is read-only, so no keys can be made there: give HEARTH_API_KEYS" \
      "(and HEARTH_ADMIN_KEYS), HEARTH_KEYS_FILE, or HEARTH_INSECURE=1" >&2
    exit 78
  fi
  if [ ! -f "$keys" ]; then
    mkdir -p "$models_dir/.hearth"
    (umask 077 && python - "$keys" <<'PY'
import secrets, sys
admin, household = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
with open(sys.argv[1], "x") as f:
    f.write("# Made on first start. Send a key as 'Authorization: Bearer <key>'.\nkeys:\n")
    f.write(f"  - {{name: admin, scope: admin, key: {admin}}}\n")
    f.write(f"  - {{name: household, key: {household}}}\n")
PY
    )
    echo "hearth: no API keys were given, so these were made (kept in $keys):" >&2
    sed -n 's/^  - {name: \([a-z]*\).*key: \(.*\)}$/hearth:   \1 key: \2/p' "$keys" >&2
  fi
  export HEARTH_KEYS_FILE="$keys"
fi
if [ -n "${HEARTH_DEFAULT_MODELS:-}" ] && [ -n "$read_only" ]; then
  echo "hearth: $models_dir is read-only: the default models are not installed" >&2
elif [ -n "${HEARTH_DEFAULT_MODELS:-}" ]; then
  # In the background, so that `docker stop` (SIGTERM, through tini) ends the install at once and
  # the container exits 0; a file being downloaded is never left in place half-written.
  # shellcheck disable=SC2086
  hearth models install --models-dir "$models_dir" $HEARTH_DEFAULT_MODELS &
  install=$!
  trap 'kill -TERM "$install" 2>/dev/null || true; wait "$install" || true; exit 0' TERM INT
  wait "$install"
  trap - TERM INT
fi
exec "$@"
