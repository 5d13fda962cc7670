"""Where data and caches live.

``STIMAGE_NB_DATA`` names the data directory (the layout of the public bundle: ``her2st/``,
``fixtures/``, ``survival/``). When unset, ``../shared/data`` relative to the working directory
or to the source checkout is used when it exists, then ``~/.cache/stimage_nb/data`` (where
:func:`stimage_nb.datasets.fetch_her2st` downloads the public data).
``STIMAGE_NB_CACHE`` names the cache directory (OME-Zarr conversions, tile caches).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA = "STIMAGE_NB_DATA"
ENV_CACHE = "STIMAGE_NB_CACHE"


def cache_dir() -> Path:
    """The cache directory (created on demand)."""
    env = os.environ.get(ENV_CACHE)
    base = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stimage_nb"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent.parent  # the source checkout (repo root) when not installed
    return [Path.cwd() / ".." / "shared" / "data", here / ".." / "shared" / "data", cache_dir() / "data"]


def data_dir(required: bool = True) -> Path:
    """The data directory: ``$STIMAGE_NB_DATA``, else ``../shared/data``, else the download cache."""
    env = os.environ.get(ENV_DATA)
    if env:
        p = Path(env).expanduser()
        if required and not p.is_dir():
            raise FileNotFoundError(f"{ENV_DATA}={env!r} is not a directory. Point it at the data bundle "
                                    "or unset it and run `stimage-nb fetch-data`.")
        return p.resolve()
    for c in _candidates():
        if (c / "her2st").is_dir() or (c / "fixtures").is_dir():
            return c.resolve()
    if required:
        raise FileNotFoundError(
            "No data directory found. Set STIMAGE_NB_DATA to the bundle (the folder holding her2st/), "
            "or run `stimage-nb fetch-data` to download the public her2st data into "
            f"{cache_dir() / 'data'}.")
    return (cache_dir() / "data").resolve()


def her2st_manifest() -> Path:
    """Path of the bundled her2st manifest (``her2st/sections.csv``)."""
    return data_dir() / "her2st" / "sections.csv"
