"""The cross-platform protocol through the real readers: her2st legacy ST rows beside the real Xenium fixture
(cells summed into 100 µm pseudo-spots) in one manifest; trained on one platform, scored on the other."""

from __future__ import annotations

import pandas as pd
import pytest

from stimage_nb.errors import StimageInputError
from stimage_nb.validation import CrossPlatform, SectionInfo, platform_of, validate


@pytest.fixture(scope="module")
def mixed_manifest(tmp_path_factory, data_dir):
    h, x = data_dir / "her2st", data_dir / "fixtures" / "xenium_lung"
    rows = [dict(section="C3", patient="C", platform="", image=str(h / "images/C3.jpg"),
                 counts=str(h / "counts/C3.tsv.gz"), spots=str(h / "spots/C3_selection.tsv"), um_per_px=0.69),
            dict(section="NCBI858", patient="NCBI858", platform="xenium", image=str(x / "NCBI858.jpg"),
                 um_per_px=2.125, outs=str(x / "NCBI858.h5ad"), xy_columns="y_pixel,x_pixel", spot_diameter_um=10,
                 pseudospot_um=100)]
    p = tmp_path_factory.mktemp("xp") / "mixed.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def test_the_readers_give_each_row_its_platform(mixed_manifest):
    from stimage_nb.io.readers import read_manifest

    secs = {s.name: s for s in read_manifest(mixed_manifest)}
    assert platform_of(secs["C3"]) == "st" and platform_of(secs["NCBI858"]) == "xenium"
    assert secs["NCBI858"].diameter_um == pytest.approx(100.0)  # cells summed into 100 µm pseudo-spots
    shared = set(secs["C3"].genes) & set(secs["NCBI858"].genes)
    assert 250 < len(shared) <= 338  # most of the 338-gene lung panel is in the her2st transcriptome
    folds = {s.fold: s for s in CrossPlatform().split([SectionInfo.of(s) for s in secs.values()])}
    assert folds["train_st_test_xenium"].train == ("C3",) and folds["train_st_test_xenium"].test == ("NCBI858",)
    assert folds["train_xenium_test_st"].train == ("NCBI858",)


def test_cross_platform_validation_on_the_fixtures(mixed_manifest, tmp_path):
    from stimage_nb.train import TrainConfig

    cfg = TrainConfig(members=2, epochs=8, kmeans_k=8, kmeans_patches=2000, out_px=32, depth="section",
                      background="white")
    res = validate(mixed_manifest, out=tmp_path, protocol="cross_platform", config=cfg, n_boot=0, progress=False)
    t = res.table().set_index(["fold", "section"])
    assert set(t.index) == {("train_st_test_xenium", "NCBI858"), ("train_xenium_test_st", "C3")}
    assert res.options["n_genes"] == len(res.per_gene["gene"].unique()) > 250
    df = res.to_frame()
    assert set(df.loc[df["fold"] == "train_st_test_xenium", "platform"]) == {"xenium"}
    for col in ("ensemble r", "baseline r", "coverage 90%"):
        assert t[col].notna().all(), col
    with pytest.raises(StimageInputError, match="no sections with counts on platform 'visium'"):
        validate(mixed_manifest, out=tmp_path / "x", protocol="cross_platform", train_platform="visium", config=cfg)
