"""The image's HEALTHCHECK: Hearth's /readyz on the port it serves (HEARTH_PORT), never through a
proxy (HTTP_PROXY in the container's environment is for downloads, not for this)."""

import os
import sys
import urllib.request

port = os.environ.get("HEARTH_PORT", "8080")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(f"http://127.0.0.1:{port}/readyz", timeout=4) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except OSError as exc:
    print(f"hearth is not ready on port {port}: {exc}", file=sys.stderr)
    sys.exit(1)
