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
models_dir=${HEARTH_MODELS_DIR:-/models}
if [ -z "${HEARTH_API_KEYS:-}${HEARTH_ADMIN_KEYS:-}${HEARTH_KEYS_FILE:-}" ] \
   && [ "${HEARTH_INSECURE:-0}" != "1" ] && [ "${HEARTH_INSECURE:-}" != "true" ]; then
  keys="$models_dir/.hearth/keys.yaml"
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
if [ -n "${HEARTH_DEFAULT_MODELS:-}" ]; then
  # shellcheck disable=SC2086
  hearth models install --models-dir "$models_dir" $HEARTH_DEFAULT_MODELS
fi
exec "$@"
