"""Ensemble members trained in parallel on a Dask cluster equal the members trained one after another."""

from __future__ import annotations

import json

import pytest
import torch
from _modelkit import genes, sections, tiny_frozen_config

pytest.importorskip("distributed")


def _member_tensors(run):
    from safetensors.torch import load_file

    cfg = json.loads((run / "ensemble.json").read_text())
    return [load_file(str(run / e["file"])) for e in cfg["members"]]


def test_members_on_a_local_cluster_equal_serial_members(tmp_path):
    from stimage_nb.cluster import ClusterOptions
    from stimage_nb.train import Callback, train

    class Starts(Callback):
        n = 0

        def on_member_start(self, state):
            Starts.n += 1

    secs = sections(("C2", "C3", "C4"))
    cfg = tiny_frozen_config(members=2, epochs=3)
    serial = train(secs, genes=genes(), out=tmp_path / "serial", val_sections=["C4"], config=cfg, progress=False)
    par = train(sections(("C2", "C3", "C4")), genes=genes(), out=tmp_path / "par", val_sections=["C4"],
                config=tiny_frozen_config(members=2, epochs=3), progress=False, scheduler="local", callbacks=[Starts()],
                cluster_options=ClusterOptions(n_workers=2, processes=True))
    # every member was trained by a worker process, none here
    assert Starts.n == 0
    for i in range(2):
        st = json.loads((tmp_path / "par" / "members" / f"m{i}" / "state.json").read_text())
        assert st["done"] and len(st["history"]) == 3
    a, b = _member_tensors(tmp_path / "serial"), _member_tensors(tmp_path / "par")
    assert len(a) == len(b) == 2
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert torch.equal(ma[k], mb[k]), k
    # members differ from each other (the check above could not pass by all being equal)
    k = next(k for k in a[0] if a[0][k].dtype.is_floating_point and a[0][k].numel() > 1)
    assert not torch.equal(a[0][k], a[1][k])
    assert serial.genes == par.genes
