"""Figures: spatial gene maps, cell-type maps, correlation and calibration plots, on real her2st sections."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import EllipseCollection  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from stimage_nb import _keys as K  # noqa: E402
from stimage_nb import plotting as P  # noqa: E402

GENES = ["ERBB2", "FASN", "SCD", "GNAS"]


@pytest.fixture(scope="module")
def section(her2st_manifest):
    from stimage_nb.io.readers import read_manifest

    return read_manifest(her2st_manifest, ["C3"], genes=GENES)[0]


@pytest.fixture(scope="module")
def pred(section):
    """A prediction AnnData following the contract, made from the section's real counts."""
    import anndata as ad

    a = section.adata
    mean = a.X.toarray().astype(np.float32) + 0.5
    p = ad.AnnData(X=mean, obs=a.obs[[K.PIXEL_X, K.PIXEL_Y, K.DIAMETER_UM]].copy(), var=pd.DataFrame(index=GENES))
    p.layers[K.ALEATORIC] = mean + mean ** 2 / 4
    p.layers[K.EPISTEMIC] = 0.1 * mean ** 2
    ct = a.obsm[K.CELLTYPE_PROPORTIONS]
    p.obsm[K.CELLTYPE_MEAN] = ct.astype(np.float32)
    p.obsm[K.CELLTYPE_STD] = (ct * 0 + 0.01).astype(np.float32)
    p.obsm[K.SPATIAL] = np.asarray(a.obsm[K.SPATIAL])
    p.uns[K.UNS] = {"section": "C3", "image": str(section.image_path), "um_per_px": section.um_per_px,
                    "celltypes": list(ct.columns)}
    return p


def _map_axes(fig):
    """The map panels (not the colour bars)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_spatial_gene_four_panels_over_he(pred, section):
    fig = P.spatial_gene(pred, "ERBB2", section=section)
    try:
        maps = _map_axes(fig)
        assert len(maps) == 4 and len(fig.axes) == 8  # 4 maps + 4 colour bars
        titles = [ax.get_title() for ax in maps]
        for word in ("observed", "predicted", "aleatoric", "epistemic"):
            assert sum(word in t for t in titles) == 1, titles
        for ax in maps:
            assert len(ax.images) == 1  # the H&E thumbnail
            (coll,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
            assert len(coll.get_offsets()) == pred.n_obs
        # the observed panel shows log1p of the real counts
        obs = _map_axes(fig)[0].collections[0].get_array()
        np.testing.assert_allclose(np.sort(obs), np.sort(np.log1p(section.adata[:, "ERBB2"].X.toarray().ravel())))
        # spots are 100 µm wide in data (level-0 px) units
        assert ax.collections[0]._widths[0] * 2 == pytest.approx(100 / section.um_per_px, rel=1e-6)
    finally:
        plt.close(fig)


def test_spatial_gene_without_observed_into_given_axes(pred):
    fig0, axs = plt.subplots(1, 3)
    try:
        fig = P.spatial_gene(pred, "FASN", axes=axs, background=False)
        assert fig is fig0
        assert [len(ax.images) for ax in axs] == [0, 0, 0]
        assert "predicted" in axs[0].get_title()
        with pytest.raises(KeyError, match="NOPE"):
            P.spatial_gene(pred, "NOPE", axes=axs)
    finally:
        plt.close(fig0)


def test_celltype_map_colours_follow_the_shared_palette(pred, section):
    fig = P.celltype_map(pred, section=section)
    try:
        (ax,) = _map_axes(fig)
        types = list(pred.obsm[K.CELLTYPE_MEAN].columns)
        colors = P.celltype_colors(types)
        dom = pred.obsm[K.CELLTYPE_MEAN].to_numpy().argmax(1)
        face = ax.collections[0].get_facecolor()
        assert len(face) == pred.n_obs
        assert [to_hex(c[:3]) for c in face[:20]] == [colors[types[d]] for d in dom[:20]]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(lbl.startswith("Epithelial") for lbl in legend)
        assert "predicted" in ax.get_title()
    finally:
        plt.close(fig)
    fig = P.celltype_map(section)  # observed proportions of a Section
    try:
        assert "observed" in fig.axes[0].get_title()
    finally:
        plt.close(fig)


def test_celltype_colors_are_the_export_colours():
    from stimage_nb._colours import class_colours

    names = ["B-cells", "CAFs", "Endothelial", "Epithelial", "Myeloid", "Plasma Cells", "PVL", "T-cells", "Tumor"]
    hexes = P.celltype_colors(names)
    rgb = P.celltype_colors(names, as_rgb255=True)
    assert rgb == class_colours(names)
    assert len(set(hexes.values())) == len(names)
    assert all(h == "#{:02x}{:02x}{:02x}".format(*rgb[n]) for n, h in hexes.items())
    assert P.celltype_colors(names) == hexes  # stable


def _per_gene():
    rng = np.random.default_rng(0)
    rows = []
    for s in ("C6", "B4"):
        for m, mu in (("model", 0.4), ("baseline", 0.25)):
            for t in ("log1p_counts", "log1p_cp10k"):
                r = np.clip(rng.normal(mu, 0.15, 50), -1, 1)
                rows.append(pd.DataFrame({"section": s, "model": m, "target": t, "gene": [f"g{i}" for i in range(50)],
                                          "pearson": r, "spearman": r}))
    return pd.concat(rows, ignore_index=True)


def test_correlation_distribution(tmp_path):
    pg = _per_gene()
    pg.to_csv(tmp_path / "pg.csv", index=False)
    fig = P.correlation_distribution(tmp_path / "pg.csv", target="log1p_counts")
    try:
        (ax,) = fig.axes
        assert [t.get_text() for t in ax.get_xticklabels()] == ["C6", "B4"]
        assert len(ax.collections) >= 4  # one violin per section and model (+ mean markers)
        texts = [t.get_text() for t in ax.texts]
        want = pg[(pg.section == "C6") & (pg.model == "model") & (pg.target == "log1p_counts")].pearson.mean()
        assert f"{want:.2f}" in texts
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ensemble", "ridge baseline"]
    finally:
        plt.close(fig)


def test_calibration_plot(tmp_path):
    import json

    from stimage_nb.evaluate import calibration

    rng = np.random.default_rng(0)
    m = rng.gamma(2, 3, (200, 20))
    y = rng.negative_binomial(3, 3 / (3 + m))
    var = m + m ** 2 / 3
    cal = calibration(y, m, 0.5 * var, 0.5 * var)
    cal["aleatoric_only"] = calibration(y, m, 0.5 * var)
    metrics = {"sections": {"C6": {"model": {"calibration": cal}}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    fig = P.calibration_plot(tmp_path)
    try:
        (ax,) = fig.axes
        labels = [ln.get_label() for ln in ax.get_lines()]
        assert labels[0] == "ideal" and any(lbl.startswith("C6 (50%") for lbl in labels)
        assert "C6 aleatoric only" in labels
        x, yv = ax.get_lines()[1].get_data()
        np.testing.assert_allclose(yv, x, atol=0.03)  # calibrated: on the diagonal
    finally:
        plt.close(fig)


def test_sparsification_plot(tmp_path):
    """Curves from uncertainty_ranking: the oracle ends lowest, the curves start at 1 (all kept)."""
    import json

    from stimage_nb.evaluate import RETAINED_FRACTIONS, uncertainty_ranking

    rng = np.random.default_rng(0)
    m = rng.gamma(2, 3, (200, 20))
    noise = np.where(np.arange(200)[:, None] < 50, 2.0, 0.2) * np.ones((1, 20))
    y = np.round(np.expm1(np.log1p(m) + rng.normal(0, 1, m.shape) * noise)).clip(0)
    var = (noise * (1 + m)) ** 2
    ur = uncertainty_ranking(y, m, 0.5 * var, 0.5 * var)
    curve = ur["spots"]["curve"]
    assert curve["retained"] == list(RETAINED_FRACTIONS)
    for k in ("sd", "epistemic_sd", "predicted_depth", "oracle"):
        assert curve[k][0] == pytest.approx(1.0)  # everything kept: the ratio is 1 by definition
    assert curve["oracle"][-1] < curve["sd"][-1] < 0.5 < curve["predicted_depth"][-1]
    assert curve["sd"][2] == pytest.approx(ur["spots"]["error_retained_0.8_by_sd"])
    (tmp_path / "metrics.json").write_text(json.dumps({"sections": {"C6": {"model": {"uncertainty_ranking": ur}}}}))
    fig = P.sparsification_plot(tmp_path)
    try:
        (ax,) = fig.axes
        labels = [ln.get_label() for ln in ax.get_lines()]
        assert labels == ["random", "C6 by SD", "C6 epistemic SD", "C6 predicted depth", "C6 oracle"]
        np.testing.assert_allclose(ax.get_lines()[1].get_data()[1], curve["sd"])
        assert ax.get_xlim() == (1.0, 0.0)
    finally:
        plt.close(fig)
