"""A real HTTP file server on 127.0.0.1 for install tests: Range requests, and ways to fail."""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Served:
    body: bytes
    #: Close the connection after this many bytes, the first time only.
    drop_after: int | None = None
    #: Seconds to sleep between 64 KiB chunks.
    delay: float = 0.0
    #: An Authorization header the request must carry.
    token: str | None = None


@dataclass
class FileServer:
    files: dict[str, Served] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    url: str = ""

    def start(self) -> FileServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                owner.requests.append((self.path, self.headers.get("range")))
                served = owner.files.get(self.path)
                if served is None:
                    self.send_error(404)
                    return
                if served.token and self.headers.get("authorization") != f"Bearer {served.token}":
                    self.send_error(401)
                    return
                start = 0
                ranged = self.headers.get("range")
                if ranged and ranged.startswith("bytes="):
                    start = int(ranged[6:].split("-")[0])
                body = served.body[start:]
                self.send_response(206 if start else 200)
                if start:
                    total = len(served.body)
                    self.send_header("content-range", f"bytes {start}-{total - 1}/{total}")
                self.send_header("content-length", str(len(body)))
                self.send_header("accept-ranges", "bytes")
                self.end_headers()
                limit = served.drop_after
                if limit is not None:
                    served.drop_after = None  # only once
                    self.wfile.write(body[:limit])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                for offset in range(0, len(body), 65536):
                    if served.delay:
                        time.sleep(served.delay)
                    try:
                        self.wfile.write(body[offset : offset + 65536])
                    except (BrokenPipeError, ConnectionResetError):
                        return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
