"""Atomic writes (stimage_nb.atomic): the old file or the whole new one, never a half-written one or a stray temp."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch

from stimage_nb.atomic import FILE_MODE, atomic_path, save_figure, write_csv, write_json, write_text
from stimage_nb.ensemble import save_state_dict


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _only(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = write_text(tmp_path / "report.md", "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(p) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert p.read_text() == "old"
    assert _only(tmp_path) == ["report.md"]


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    p = write_csv(pd.DataFrame({"a": [1, 2]}), tmp_path / "t.csv")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(p) as tmp:
            tmp.write_text("a\n")
            raise KeyboardInterrupt
    assert pd.read_csv(p)["a"].tolist() == [1, 2]
    assert _only(tmp_path) == ["t.csv"]


def test_json_that_cannot_be_serialised_leaves_the_old_file(tmp_path):
    p = write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}
    assert _only(tmp_path) == ["r.json"]


def test_the_temp_file_keeps_the_suffix_writers_choose_the_format_from(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    p = save_figure(fig, tmp_path / "sub" / "curve.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = save_figure(plt.subplots()[0], tmp_path / "sub" / "curve.pdf")
    assert p.read_bytes()[:5] == b"%PDF-"
    with atomic_path(tmp_path / "arr.npy") as tmp:
        assert tmp.suffix == ".npy" and tmp.name.startswith(".")
        np.save(tmp, np.arange(3))  # numpy appends .npy unless the name has it
    assert np.load(tmp_path / "arr.npy").tolist() == [0, 1, 2]
    assert _only(tmp_path) == ["arr.npy", "sub"]


def test_new_files_get_the_umask_permissions_even_from_private_writers(tmp_path):
    # safetensors creates its files 0600; a model shared with a group must be readable like any other file
    p = save_state_dict({"w": torch.zeros(3)}, tmp_path / "m.safetensors")
    assert _mode(p) == FILE_MODE == 0o666 & ~_umask_now()
    assert _mode(write_text(tmp_path / "x.txt", "x")) == FILE_MODE


def _umask_now() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
