"""A stand-in GDC API on 127.0.0.1 that serves recorded responses with the real endpoints' contract.

- ``POST /files`` and ``POST /cases`` (JSON body: ``filters``, ``fields``, ``size``, ``from``, ``sort``,
  ``format``): the recorded hits of ``gdc_responses/`` that match the filter's project (and submitter ids),
  projected onto the requested ``fields`` (plus ``id``, as the real API does), paged by ``from``/``size``
  with the real ``pagination`` block. A field the recorded hits do not have gets HTTP 400 with a
  ``message``, as the real API answers an unknown field.
- ``GET /data/{file_id}``: the bytes behind a file id, with HTTP ``Range`` (206 + ``Content-Range``; 416
  past the end) and ``Content-Disposition``, as the real data endpoint.

Fault injection for the download tests: ``drop_after[file_id] = n`` cuts the connection after n bytes of
the next response for that file (once), ``corrupt`` flips a byte in the served body, ``ignore_range``
answers every request with the whole file (200).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent / "gdc_responses"


def _load(name: str) -> dict:
    return json.loads((HERE / name).read_text())


def _paths(obj, prefix="") -> set[str]:
    out = set()
    if isinstance(obj, list):
        for it in obj:
            out |= _paths(it, prefix)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{prefix}{k}"
            out.add(p)
            out |= _paths(v, p + ".")
    return out


def _project(obj, fields: list[list[str]]):
    if isinstance(obj, list):
        return [_project(o, fields) for o in obj]
    out: dict = {}
    for f in fields:
        if not f or f[0] not in obj:
            continue
        head, rest = f[0], f[1:]
        if not rest or not isinstance(obj[head], (dict, list)):
            out[head] = copy.deepcopy(obj[head])
        else:
            sub = _project(obj[head], [rest])
            if isinstance(sub, list) and isinstance(out.get(head), list):
                for a, b in zip(out[head], sub):
                    a.update(b)
            elif isinstance(sub, dict) and isinstance(out.get(head), dict):
                out[head].update(sub)
            else:
                out[head] = sub
    return out


def _clauses(flt) -> list[dict]:
    if not flt:
        return []
    if flt.get("op") in ("and", "or"):
        return [c for sub in flt["content"] for c in _clauses(sub)]
    return [flt]


class FakeGDC:
    def __init__(self, data: dict[str, Path] | None = None):
        self.records = {"files": _load("files_tcga_brca_diagnostic_slides.json")["data"]["hits"],
                        "cases": _load("cases_tcga_brca.json")["data"]["hits"]}
        self.data = dict(data or {})
        self.drop_after: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.ignore_range = False
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _json(self, code: int, obj: dict):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except ValueError:
                    return self._json(400, {"message": "request body is not JSON"})
                endpoint = self.path.strip("/").split("?")[0]
                fake.requests.append({"method": "POST", "path": self.path, "body": body})
                if endpoint not in fake.records:
                    return self._json(404, {"message": f"unknown endpoint {endpoint}"})
                code, obj = fake.search(endpoint, body)
                return self._json(code, obj)

            def do_GET(self):
                fake.requests.append({"method": "GET", "path": self.path, "range": self.headers.get("Range")})
                m = re.fullmatch(r"/data/([0-9a-f-]+)", self.path)
                if not m or m.group(1) not in fake.data:
                    return self._json(404, {"message": f"file not found: {self.path}"})
                fid = m.group(1)
                blob = bytearray(Path(fake.data[fid]).read_bytes())
                if fid in fake.corrupt:
                    blob[len(blob) // 2] ^= 0xFF
                start = 0
                rng = self.headers.get("Range")
                if rng and not fake.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(blob):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(blob)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
                else:
                    self.send_response(200)
                part = bytes(blob[start:])
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Disposition", f"attachment; filename={fid}.svs")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                cut = fake.drop_after.pop(fid, None)
                if cut is not None:
                    self.wfile.write(part[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the connection drops mid-body
                    return
                self.wfile.write(part)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def search(self, endpoint: str, body: dict) -> tuple[int, dict]:
        hits = self.records[endpoint]
        known = set().union(*(_paths(h) for h in hits)) | {"id"}
        fields = [f.strip() for f in str(body.get("fields") or "").split(",") if f.strip()]
        unknown = [f for f in fields if f not in known]
        if unknown:
            return 400, {"message": f"Unrecognized fields: {unknown}"}
        flt = body.get("filters")
        if isinstance(flt, str):
            flt = json.loads(flt)
        sel = list(hits)
        for c in _clauses(flt):
            field, values = c["content"]["field"], c["content"]["value"]
            values = values if isinstance(values, list) else [values]
            key = field.removeprefix("files.")
            sel = [h for h in sel if _matches(h, key, values)]
        start, size = int(body.get("from", 0)), int(body.get("size", 10))
        page = sel[start:start + size]
        proj = [dict(_project(h, [f.split(".") for f in fields]), id=h["id"]) if fields else h for h in page]
        pages = -(-len(sel) // size) if size else 0
        return 200, {"data": {"hits": proj, "pagination": {
            "count": len(proj), "total": len(sel), "size": size, "from": start, "sort": body.get("sort", ""),
            "page": start // size + 1 if size else 1, "pages": pages}}, "warnings": {}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _values(obj, path: list[str]):
    if isinstance(obj, list):
        for o in obj:
            yield from _values(o, path)
        return
    if not path:
        yield obj
        return
    if isinstance(obj, dict) and path[0] in obj:
        yield from _values(obj[path[0]], path[1:])


def _matches(hit: dict, field: str, values: list) -> bool:
    return any(v in values for v in _values(hit, field.split(".")))
