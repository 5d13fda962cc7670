"""A local HTTP server on 127.0.0.1 serving the bundle's her2st files under their public repository paths.

It stands in for raw.githubusercontent.com/almaan/her2st (which cannot be reached from CI), with the
same paths and the same bytes where the bundle holds verbatim copies; the stereoscope tables, which
the bundle holds gunzipped, are served gzip-compressed as the repository has them. Faults are
switched per path: ``corrupt`` (other bytes), ``drop`` (the first N requests send half the body
then close the connection), ``fail`` (HTTP 500). Every request is logged.
"""

from __future__ import annotations

import gzip
import http.server
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from stimage_nb.datasets import DATASETS


@dataclass
class Server:
    url: str
    files: dict[str, bytes]
    corrupt: set = field(default_factory=set)
    drop: Counter = field(default_factory=Counter)
    fail: set = field(default_factory=set)
    requests: list = field(default_factory=list)

    def count(self, suffix: str) -> int:
        return sum(1 for r in self.requests if r.endswith(suffix))


def _her2st_routes(data_dir: Path) -> dict[str, bytes]:
    root = data_dir / "her2st"
    routes = {}
    for f in DATASETS["her2st"].files:
        body = (root / f.path).read_bytes()
        routes["/" + f.remote] = gzip.compress(body, mtime=0) if f.gunzip else body
    return routes


def _serve(routes: dict[str, bytes]):
    state = Server("", routes)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):  # noqa: N802
            path = self.path.split("?")[0]
            state.requests.append(path)
            body = state.files.get(path)
            if body is None or path in state.fail:
                self.send_response(404 if body is None else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path in state.corrupt:
                body = body[:-64] + bytes(64)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if state.drop[path] > 0:
                state.drop[path] -= 1
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    return httpd, state
