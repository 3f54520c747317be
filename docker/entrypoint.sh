#!/bin/sh
# Installs the default models into the /models volume on first start (later starts find them and
# only check them), then runs the command. HEARTH_DEFAULT_MODELS="" skips the installs.
set -eu
if [ -n "${HEARTH_DEFAULT_MODELS:-}" ]; then
  # shellcheck disable=SC2086
  hearth models install --models-dir "${HEARTH_MODELS_DIR:-/models}" $HEARTH_DEFAULT_MODELS
fi
exec "$@"
