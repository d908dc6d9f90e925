"""A local HTTP server on 127.0.0.1 for the download tests (test_download.py, test_first_hour.py)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RangeServer:
    """Serves one payload at /nature_12K.zip, honouring `Range: bytes=N-`."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.ranges: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                header = self.headers.get("Range")
                outer.ranges.append(header)
                start = int(header.split("=")[1].rstrip("-")) if header else 0
                body = outer.payload[start:]
                self.send_response(206 if header else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/nature_12K.zip"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
