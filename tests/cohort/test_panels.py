"""Gene panels: the named panels resolve, the data-driven ones are computed on the training sections,
and genes a panel names but the counts lack are handled as --drop-missing-genes does."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from _modelkit import tiny_frozen_config

from stimage_nb.errors import StimageInputError

PAM50 = {"ACTR3B", "ANLN", "BAG1", "BCL2", "BIRC5", "BLVRA", "CCNB1", "CCNE1", "CDC20", "CDC6", "CDH3", "CENPF",
         "CEP55", "CXXC5", "EGFR", "ERBB2", "ESR1", "EXO1", "FGFR4", "FOXA1", "FOXC1", "GPR160", "GRB7", "KIF2C",
         "KRT14", "KRT17", "KRT5", "MAPT", "MDM2", "MELK", "MIA", "MKI67", "MLPH", "MMP11", "MYBL2", "MYC", "NAT1",
         "NDC80", "NUF2", "ORC6", "PGR", "PHGDH", "PTTG1", "RRM2", "SFRP1", "SLC39A6", "TMEM45B", "TYMS", "UBE2C",
         "UBE2T"}


@functools.lru_cache(maxsize=None)
def _full(names: tuple, n: int):
    from stimage_nb._settings import her2st_manifest
    from stimage_nb.io.readers import read_manifest

    secs = read_manifest(her2st_manifest(), list(names))  # every gene of the counts
    return [s.subset(np.linspace(0, s.adata.n_obs - 1, n).astype(int)) for s in secs]


def sections(names, n: int = 40):
    """Fresh copies of real sections (all genes, ``n`` spots spread over each)."""
    return [s.subset(np.ones(s.adata.n_obs, bool)) for s in _full(tuple(names), n)]


def test_named_panels(her2st_genes, tmp_path):
    from stimage_nb.panels import breast_clinical, pam50, resolve_genes

    p = pam50()
    assert set(p.genes) == PAM50 and len(p) == 50 and "Parker" in p.source
    bc = resolve_genes("breast_clinical")
    assert bc.genes[:50] == p.genes and len(set(bc.genes)) == len(bc) == len(breast_clinical())
    assert {"ERBB2", "ESR1", "PGR", "MKI67", "GRB7", "AR", "AURKA", "CD274"} <= set(bc.genes)
    # the clinicians' markers the default STimage list lacks (issue 13)
    s = resolve_genes("STIMAGE769")
    assert list(s.genes) == list(her2st_genes) and len(s) == 769
    assert not {"ERBB2", "ESR1", "PGR", "MKI67", "GRB7"} & set(s.genes)
    f = tmp_path / "g.txt"
    f.write_text("# mine\nERBB2\nGRB7\n")
    assert resolve_genes(str(f)).genes == ("ERBB2", "GRB7")
    assert resolve_genes(["A", "B"]).genes == ("A", "B")
    with pytest.raises(StimageInputError, match="hvg:N"):
        resolve_genes("pam51")
    with pytest.raises(StimageInputError, match="training sections"):
        resolve_genes("hvg:100")


def test_data_driven_panels_on_real_sections():
    from stimage_nb.panels import resolve_genes

    secs = sections(("C2", "C3"), n=60)
    allg = resolve_genes("all", secs)
    X = np.concatenate([s.adata[:, list(allg.genes)].X.toarray() for s in secs])
    assert (X.sum(0) >= 1).all()                       # every gene of "all" is detected
    common = set(secs[0].genes) & set(secs[1].genes)
    tot = sum(np.asarray(s.adata[:, sorted(common)].X.sum(0)).ravel() for s in secs)
    assert len(allg) == int((tot >= 1).sum())          # and every detected common gene is in it
    h = resolve_genes("hvg:300", secs)
    assert len(h) == 300 and set(h.genes) <= set(allg.genes) | common and h.params["sections"] == ["C2", "C3"]
    assert resolve_genes("hvg:300", secs).genes == h.genes                      # deterministic
    assert len(resolve_genes("hvg", secs)) == 2000


def test_training_on_a_panel_with_genes_the_counts_lack(tmp_path):
    from stimage_nb.train import train

    secs = sections(("C2", "C3", "C4"))
    missing = {"KRT5", "KRT14", "MIA"}  # in PAM50, absent from these sections' counts
    with pytest.raises(StimageInputError, match="drop_missing_genes"):
        train(secs, genes="breast_clinical", out=tmp_path / "r0", val_sections=["C4"],
              config=tiny_frozen_config(members=1, epochs=1), progress=False)
    ens = train(sections(("C2", "C3", "C4")), genes="breast_clinical", out=tmp_path / "r", val_sections=["C4"],
                config=tiny_frozen_config(members=1, epochs=1), drop_missing_genes=True, progress=False)
    assert "ERBB2" in ens.genes and "ESR1" in ens.genes and not missing & set(ens.genes)
    assert (tmp_path / "r" / "gene_panel.json").is_file()
    # hvg on the training sections only (never the validation section)
    ens2 = train(sections(("C2", "C3", "C4")), genes="hvg:40", out=tmp_path / "h", val_sections=["C4"],
                 config=tiny_frozen_config(members=1, epochs=1), drop_missing_genes=True, progress=False)
    import json

    meta = json.loads((tmp_path / "h" / "gene_panel.json").read_text())
    assert meta["params"]["sections"] == ["C2", "C3"] and len(ens2.genes) <= 40


def test_train_cli_takes_panel_names():
    from stimage_nb.cli import build_parser

    a = build_parser().parse_args(["train", "--manifest", "m.csv", "--genes", "hvg:2000", "--out", "o",
                                   "--scheduler", "local", "--workers", "2"])
    assert a.genes == "hvg:2000" and a.scheduler == "local" and a.workers == 2
