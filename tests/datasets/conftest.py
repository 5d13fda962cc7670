"""Fixtures of the download tests: a local server over the bundle's her2st files (see _fetch_server)."""

from __future__ import annotations

import socket

import pytest
from _fetch_server import _her2st_routes, _serve


@pytest.fixture(scope="module")
def _routes(data_dir):
    return _her2st_routes(data_dir)


@pytest.fixture
def her2st_server(_routes):
    """A fresh server (no faults, empty request log) over the bundle's her2st files."""
    httpd, state = _serve(dict(_routes))
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens (connection refused: what 'offline' looks like)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"
