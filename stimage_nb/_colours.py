"""Stable class colours shared by every export (QuPath classes, OME-Zarr label colours, figures).

A class keeps the same colour in every section and every file: QuPath's built-in classes get
QuPath's own default colours, other names take the next free colour of a fixed qualitative
palette in the order given (so a cell-type list always maps the same way).
"""

from __future__ import annotations

from typing import Iterable

# QuPath's default PathClass colours (qupath-core PathClassFactory.StandardPathClasses).
QUPATH_DEFAULTS: dict[str, tuple[int, int, int]] = {
    "Tumor": (200, 0, 0),
    "Stroma": (150, 200, 150),
    "Immune cells": (160, 90, 160),
    "Necrosis": (50, 50, 50),
    "Other": (255, 200, 0),
    "Region*": (0, 0, 180),
    "Ignore*": (180, 180, 180),
    "Positive": (200, 50, 50),
    "Negative": (112, 112, 225),
}

# Qualitative palette (matplotlib tab20 order, strong colours first, then a few extra).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229), (57, 59, 121), (99, 121, 57), (140, 109, 49), (132, 60, 57),
)


def class_colours(names: Iterable[str], known: dict[str, Iterable[int]] | None = None) -> dict[str, tuple[int, int, int]]:
    """Colour per class name: ``known`` first, then QuPath defaults, then the palette in order.

    Parameters
    ----------
    names
        Class names in a fixed order (e.g. the cell-type columns of a prediction).
    known
        Colours already fixed (e.g. read back from a QuPath export); they win.

    Returns
    -------
    dict
        ``{name: (r, g, b)}`` with 0–255 integers; distinct names get distinct colours while
        the palette lasts, then it cycles.
    """
    names = [str(n) for n in names]
    out: dict[str, tuple[int, int, int]] = {}
    known = {str(k): tuple(int(c) for c in v)[:3] for k, v in (known or {}).items()}
    for n in names:
        if n in known:
            out[n] = known[n]  # type: ignore[assignment]
        elif n in QUPATH_DEFAULTS:
            out[n] = QUPATH_DEFAULTS[n]
    used = set(out.values())
    free = [c for c in PALETTE if c not in used] or list(PALETTE)
    i = 0
    for n in names:
        if n not in out:
            out[n] = free[i % len(free)]
            i += 1
    return out


def rgb_to_qupath_int(rgb: Iterable[int]) -> int:
    """QuPath's packed ``colorRGB`` (signed 32-bit ARGB with alpha 255) for an (r, g, b) triple."""
    r, g, b = (int(c) & 0xFF for c in list(rgb)[:3])
    v = (0xFF << 24) | (r << 16) | (g << 8) | b
    return v - (1 << 32) if v >= (1 << 31) else v


def qupath_int_to_rgb(value: int) -> tuple[int, int, int]:
    """Inverse of :func:`rgb_to_qupath_int` (alpha ignored)."""
    v = int(value) & 0xFFFFFFFF
    return (v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF
