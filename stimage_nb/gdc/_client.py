"""HTTP access to the NCI Genomic Data Commons (GDC) API: search with filters and paging, errors.

The contract followed (GDC API User's Guide, "Search and Retrieval" and "Downloading Files",
https://docs.gdc.cancer.gov/API/Users_Guide/): search endpoints (``/files``, ``/cases``,
``/projects``) take a ``filters`` JSON tree (``{"op": "and", "content": [{"op": "in", "content":
{"field": ..., "value": [...]}}]}``), a comma-separated ``fields`` list, ``size`` and ``from`` (0-based
offset) and return ``{"data": {"hits": [...], "pagination": {"count", "total", "size", "from", "page",
"pages", "sort"}}, "warnings": {}}``. Queries are POSTed as JSON, as the guide recommends for large
queries. ``/data/{file_id}`` returns the file's bytes and honours HTTP ``Range`` requests (how the GDC
Data Transfer Tool resumes). Controlled-access data need a token in the ``X-Auth-Token`` header; the
token is held in memory only, never logged or written.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

GDC_API = "https://api.gdc.cancer.gov"
ENV_API = "STIMAGE_NB_GDC_API"  # another endpoint (a mirror, or a local test server)


class GDCError(RuntimeError):
    """The GDC could not be reached or answered with an error (the message says which and why)."""


class GDCChecksumError(GDCError):
    """A downloaded file's md5 differs from the one the GDC lists for it."""


def filters_and(*clauses: dict) -> dict:
    """``{"op": "and", "content": [...]}`` of the given clauses (GDC filter syntax)."""
    return {"op": "and", "content": [c for c in clauses if c]}


def filter_in(field: str, values: Iterable[Any]) -> dict:
    """``{"op": "in", "content": {"field": field, "value": [...]}}`` (GDC filter syntax)."""
    return {"op": "in", "content": {"field": field, "value": list(values)}}


class GDCClient:
    """A session with the GDC API.

    Parameters
    ----------
    base_url
        API root (default ``$STIMAGE_NB_GDC_API`` or ``https://api.gdc.cancer.gov``).
    token
        A GDC authentication token for controlled-access files (open-access slides need none). Kept in
        memory, sent only as the ``X-Auth-Token`` header, never shown in a repr, log line or error.
    timeout
        Seconds to wait for the server to answer (connect and between bytes).
    """

    def __init__(self, base_url: str | None = None, *, token: str | None = None, timeout: float = 60.0):
        import requests

        self.base_url = (base_url or os.environ.get(ENV_API) or GDC_API).rstrip("/")
        self.timeout = float(timeout)
        self._session = requests.Session()
        self._session.headers["User-Agent"] = "stimage_nb"
        if token:
            self._session.headers["X-Auth-Token"] = token.strip()

    def __repr__(self) -> str:
        auth = ", token=***" if "X-Auth-Token" in self._session.headers else ""
        return f"GDCClient({self.base_url!r}{auth})"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "GDCClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ search
    def _post(self, endpoint: str, body: dict) -> dict:
        import requests

        url = f"{self.base_url}/{endpoint.strip('/')}"
        try:
            r = self._session.post(url, json=body, timeout=self.timeout)
        except requests.RequestException as e:
            raise GDCError(f"cannot reach the GDC API at {self.base_url} ({type(e).__name__}). Check the "
                           f"internet connection, or set {ENV_API} to a reachable mirror.") from None
        if r.status_code != 200:
            raise GDCError(f"GDC {endpoint} query failed: HTTP {r.status_code} {_error_text(r)}")
        try:
            return r.json()
        except ValueError:
            raise GDCError(f"GDC {endpoint} answered with something that is not JSON "
                           f"(content type {r.headers.get('Content-Type')!r})") from None

    def search(self, endpoint: str, filters: dict | None, fields: Sequence[str], *, page_size: int = 500,
               sort: str | None = None, max_hits: int | None = None) -> list[dict]:
        """Every hit of a search, following the ``from``/``size`` pages until ``pagination.total``.

        Parameters
        ----------
        endpoint
            ``"files"``, ``"cases"`` or ``"projects"``.
        filters
            A GDC filter tree (:func:`filters_and`, :func:`filter_in`), or None for everything.
        fields
            Fields to return (dotted paths such as ``"cases.submitter_id"``).
        page_size
            Hits per request (``size``).
        sort
            ``"field:asc"`` (a stable order makes the pages consistent).
        max_hits
            Stop after this many hits.

        Raises
        ------
        GDCError
            Unreachable server, an HTTP error, or a response without ``data.hits``/``pagination``.
        """
        hits: list[dict] = []
        start = 0
        while True:
            size = page_size if max_hits is None else max(1, min(page_size, max_hits - len(hits)))
            body: dict = {"fields": ",".join(fields), "format": "JSON", "size": size, "from": start}
            if filters:
                body["filters"] = filters
            if sort:
                body["sort"] = sort
            res = self._post(endpoint, body)
            try:
                data = res["data"]
                page, pag = data["hits"], data["pagination"]
                total = int(pag["total"])
            except (KeyError, TypeError, ValueError):
                raise GDCError(f"GDC {endpoint} response lacks data.hits / data.pagination.total: "
                               f"{json.dumps(res)[:200]}") from None
            for w in (res.get("warnings") or {}).items():
                log.warning("GDC %s: %s", endpoint, w)
            hits.extend(page)
            start += len(page)
            log.debug("GDC %s: %d of %d hits", endpoint, start, total)
            if not page or start >= total or (max_hits is not None and len(hits) >= max_hits):
                return hits

    # ------------------------------------------------------------------ data
    def open_data(self, file_id: str, *, offset: int = 0):
        """A streaming ``GET /data/{file_id}`` response, from byte ``offset`` on (an HTTP Range request).

        The caller reads ``iter_content`` and closes it. Raises :class:`GDCError` when the server cannot
        be reached or answers with an error other than 206/200/416.
        """
        import requests

        headers = {"Range": f"bytes={int(offset)}-"} if offset > 0 else {}
        try:
            r = self._session.get(f"{self.base_url}/data/{file_id}", headers=headers, stream=True,
                                  timeout=self.timeout)
        except requests.RequestException as e:
            raise GDCError(f"cannot reach the GDC data endpoint at {self.base_url} ({type(e).__name__})") from None
        if r.status_code not in (200, 206, 416):
            msg = _error_text(r)
            r.close()
            if r.status_code in (401, 403):
                raise GDCError(f"GDC refused file {file_id} (HTTP {r.status_code}): controlled-access data need a "
                               "token (--token-file, from the GDC portal)")
            raise GDCError(f"GDC data request for {file_id} failed: HTTP {r.status_code} {msg}")
        return r


def _error_text(r) -> str:
    try:
        j = r.json()
        return str(j.get("message") or j.get("error") or j)[:200]
    except ValueError:
        return (r.text or "")[:200]
