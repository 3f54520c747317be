"""The Hearth gateway: the OpenAI HTTP API in front of one backend process per model."""

import os

# The gateway forks only to exec a backend at once: gRPC's fork handlers have nothing to do,
# and with them on, every spawn logs "Other threads are currently calling into gRPC".
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
