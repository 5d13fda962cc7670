"""The bundle's TCGA tables through the loaders; pseudo-bulk agreement and the degraded-bulk simulation on real data."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _outcome_data  # noqa: E402

from stimage_nb import outcomes as oc  # noqa: E402
from stimage_nb.errors import StimageInputError  # noqa: E402

# fixtures (a module, not a conftest.py: tests/omero imports its conftest by name)
bulk = _outcome_data.bulk  # a fixture


def test_porpoise_bulk_per_patient(bulk, data_dir, her2st_genes):
    assert bulk.expression.shape == (956, 1558) and bulk.cnv.shape[1] == 1333 and bulk.mutations.shape[1] == 21
    assert len(bulk.slides) == 1022 and bulk.slides["patient_id"].nunique() == 956
    assert len(set(bulk.expression.columns) & set(her2st_genes)) == 71
    # censorship (1 = censored) is inverted into event (1 = death), checked against the raw file
    z = zipfile.ZipFile(data_dir / "tcga" / "brca_porpoise" / "tcga_brca_all_clean.csv.zip")
    raw = pd.read_csv(z.open(z.namelist()[0]), usecols=["case_id", "censorship", "survival_months"])
    raw = raw.groupby("case_id").first()
    assert (bulk.clinical["event"] == 1 - raw.loc[bulk.clinical.index, "censorship"]).all()
    assert bulk.clinical["event"].sum() == (raw["censorship"] == 0).sum()
    amp = oc.her2_amplification(bulk)
    assert amp.sum() == (bulk.cnv["ERBB2"] == 2).sum() and 100 < amp.sum() < 140


def test_cdr_endpoints_and_stage(bulk):
    cdr = oc.tcga_cdr("BRCA")
    assert len(cdr) == 1097 and cdr.index.is_unique and {"PFI", "PFI.time", "OS", "OS.time"} <= set(cdr.columns)
    assert set(cdr["stage_group"].dropna().unique()) == {1.0, 2.0, 3.0, 4.0}
    assert [oc.stage_group(s) for s in ("Stage IIB", "stage iv", "Stage IA", "Stage X", "[Discrepancy]", None)][:3] == [2, 4, 1]
    assert np.isnan(oc.stage_group("Stage X")) and np.isnan(oc.stage_group("[Discrepancy]"))
    pfi = oc.tcga_outcome("PFI")
    assert (pfi["time"] > 0).all() and pfi["event"].isin([0, 1]).all() and 130 < pfi["event"].sum() < 160
    assert pfi.loc["TCGA-BH-A0EA", "time"] == pytest.approx(991 / (365.25 / 12), rel=1e-6) or "TCGA-BH-A0EA" in cdr.index
    assert len(bulk.expression.index.intersection(pfi.index)) > 900  # the two tables key the same patients
    cov = oc.clinical_covariates("BRCA")
    assert list(cov.columns) == ["age", "stage_group", "lobular"] and cov["lobular"].sum() > 150
    with pytest.raises(StimageInputError, match="no TCGA-CDR patients of type 'NOPE'"):
        oc.tcga_cdr("NOPE")
    with pytest.raises(StimageInputError, match="endpoint must be one of"):
        oc.tcga_outcome("RFS")


def test_survpath_splits_are_disjoint_case_splits():
    sp = oc.tcga_brca_survpath()
    assert len(sp.splits) == 5 and sp.slides["patient_id"].nunique() == 871
    tests = [set(te) for _, te in sp.splits]
    assert all(not (a & b) for i, a in enumerate(tests) for b in tests[i + 1:])
    assert all(not (set(tr) & set(te)) for tr, te in sp.splits)


def test_fetch_tcga_uses_the_bundle(data_dir):
    from stimage_nb.datasets import TCGA_FILES, fetch_tcga

    paths = fetch_tcga()
    assert set(paths) == set(TCGA_FILES) and all(p.is_file() and str(p).startswith(str(data_dir)) for p in paths.values())


def _section_counts(data_dir, genes):
    import anndata as ad

    out = {}
    for s in ("B4", "C2", "C3", "C4", "C5", "C6"):
        c = pd.read_csv(data_dir / "her2st" / "counts" / f"{s}.tsv.gz", sep="\t", index_col=0)
        out[s] = ad.AnnData(c.reindex(columns=genes, fill_value=0).to_numpy(float),
                            var=pd.DataFrame(index=genes))
    return out


def test_agreement_is_per_gene_across_slides(data_dir, her2st_genes):
    genes = list(her2st_genes[:200])
    measured = oc.pseudobulk_log_cp10k(_section_counts(data_dir, genes))
    assert measured.shape == (6, 200) and np.allclose(np.expm1(measured).sum(axis=1), 1e4)
    # a "prediction" that knows nothing about the slides: the same mean profile for every slide
    flat = pd.DataFrame(np.tile(measured.mean().to_numpy(), (6, 1)), index=measured.index, columns=genes)
    res = oc.pseudobulk_agreement(flat, measured)
    # across genes it looks excellent (each gene's level), per gene across slides it has nothing to say
    assert res.summary()["mean_r_across_genes_within_slide"] > 0.8
    assert res.per_gene["r"].isna().all() and res.summary()["n_defined"] == 0
    # a prediction that tracks the slides' differences scores per gene
    rng = np.random.default_rng(0)
    noisy = measured + rng.normal(0, 0.05, measured.shape)
    good = oc.pseudobulk_agreement(noisy, measured).summary()
    assert good["median_r"] > 0.5 and good["n_slides"] == 6
    with pytest.raises(StimageInputError, match="at least 3"):
        oc.pseudobulk_agreement(noisy.iloc[:2], measured)


def test_degraded_bulk_has_the_asked_accuracy(bulk):
    X = bulk.expression.iloc[:, :40]
    acc = pd.Series(np.linspace(-0.2, 0.9, 40), index=X.columns)
    D = oc.degrade_to_accuracy(X, acc, seed=1)
    r = np.array([np.corrcoef(D[g], X[g])[0, 1] for g in X.columns])
    want = np.clip(acc.to_numpy(), 0, 1)
    assert np.abs(r - want).max() < 0.1  # 956 patients: sampling error of r ~ 0.03
    assert not D.equals(oc.degrade_to_accuracy(X, acc, seed=2))
    with pytest.raises(StimageInputError, match="no accuracy for genes"):
        oc.degrade_to_accuracy(X, acc.iloc[:10])
