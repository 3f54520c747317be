"""A custom backend that never watches its parent: it calls `serve()` itself, as a program that
embeds the runtime might, so nothing of its own ends it when the gateway dies. Only the
gateway's leash does.
"""

from __future__ import annotations

import argparse
import asyncio

from reverse_backend import ReverseBackend

from backends.runtime import serve

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    asyncio.run(serve(ReverseBackend(), parser.parse_args().address))
