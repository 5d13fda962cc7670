"""Path2Space imported into this package, on a directory in the published layout with random weights.

The layout is the companion code's (ge_model/weights): ctranspath.pth (a state dict under "model", timm 0.5.4
keys), mlp_ensemble/result_{ik}_{il}_0/model_trained.pth (a plain state dict of MLP_regression_relu_two),
genes.txt. Here 3 x 2 folds and 6 real her2st genes, CTransPath full size with random weights.
"""

from __future__ import annotations

import json

import _modelkit as kit
import numpy as np
import pytest
import torch

from stimage_nb import _keys as K
from stimage_nb.cli import main
from stimage_nb.ensemble import Ensemble
from stimage_nb.errors import StimageInputError
from stimage_nb.models import encoders as E
from stimage_nb.path2space import import_path2space, read_layout
from stimage_nb.stain import HE_REF, MAXC_REF
from stimage_nb.tiles import extract_tiles

N_IK, N_IL, N_GENES = 3, 2, 6


def _write_published(root, genes, seed=0):
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True)
    ct = E.get_encoder("ctranspath")
    torch.manual_seed(seed)
    module = E.build_module(ct)
    torch.save({"model": {k: v.contiguous() for k, v in E.to_published_layout(ct, module).items()}},
               root / "ctranspath.pth")
    for ik in range(N_IK):
        for il in range(N_IL):
            d = root / "mlp_ensemble" / f"result_{ik}_{il}_0"
            d.mkdir(parents=True)
            sd = {"layer0.0.weight": torch.randn(768, 768, generator=g) / 768 ** 0.5,
                  "layer0.0.bias": torch.randn(768, generator=g) * 0.1,
                  "layer1.0.weight": torch.randn(len(genes), 768, generator=g) / 768 ** 0.5,
                  "layer1.0.bias": 1.0 + torch.rand(len(genes), generator=g)}  # positive: ReLU outputs vary
            torch.save(sd, d / "model_trained.pth")
    (root / "genes.txt").write_text("\n".join(genes) + "\n")
    return root


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return _write_published(tmp_path_factory.mktemp("p2s") / "weights", kit.genes()[:N_GENES])


@pytest.fixture(scope="module")
def imported(published, tmp_path_factory):
    refs = kit.sections(("C2", "C4"), n=16)
    out = tmp_path_factory.mktemp("p2s_run") / "run"
    ens = import_path2space(published, out, reference_sections=refs, progress=False)
    return ens, out


@pytest.fixture(scope="module")
def c3_tiles():
    (c3,) = kit.sections(("C3",), n=16)
    return c3, extract_tiles(c3.image, c3.xy, 100.0, 224, cache=True)


def _direct(published, features):
    """Path2Space's ensemble.py in plain torch: per MLP in float32, inner mean over il, outer over ik (float64)."""
    x = torch.as_tensor(features, dtype=torch.float32)
    outs = np.zeros((N_IK, N_IL, len(x), N_GENES))
    for ik in range(N_IK):
        for il in range(N_IL):
            sd = torch.load(published / "mlp_ensemble" / f"result_{ik}_{il}_0" / "model_trained.pth", weights_only=True)
            h = torch.relu(x @ sd["layer0.0.weight"].T + sd["layer0.0.bias"])
            outs[ik, il] = torch.relu(h @ sd["layer1.0.weight"].T + sd["layer1.0.bias"]).numpy()
    return outs.mean(axis=1).mean(axis=0), outs.reshape(N_IK * N_IL, len(x), N_GENES)


def test_import_keeps_path2space_preprocessing_and_averaging(imported, published):
    ens, out = imported
    assert ens.n_members == N_IK * N_IL and ens.genes == kit.genes()[:N_GENES] and ens.celltypes == []
    assert (ens.tile_um, ens.out_px) == (100.0, 224)
    assert ens.meta["mean_groups"] == [[0, 1], [2, 3], [4, 5]]
    assert torch.allclose(ens.stain.target_he, torch.tensor(HE_REF)) and ens.stain.Io == 255.0
    assert torch.allclose(ens.stain.target_maxc, torch.tensor(MAXC_REF))
    assert not ens.has_distribution and ens.domain is not None
    cfg = json.loads((out / "ensemble.json").read_text())
    assert cfg["source"] == "path2space" and cfg["path2space"]["n_outer_folds"] == N_IK
    pre = cfg["encoders"]["ctranspath"]["preprocessing"]
    assert (pre["mean"], pre["std"], pre["tile_um"], pre["out_px"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                                                                         100.0, 224)
    assert cfg["encoders"]["ctranspath"]["weights"]["sha256"] == E.sha256_of(published / "ctranspath.pth")
    assert [m["fold"] for m in cfg["members"]] == [[ik, il] for ik in range(N_IK) for il in range(N_IL)]
    assert all(m["head"] == "mlp" and m["hidden"] == 768 for m in cfg["members"])
    assert len(list(out.glob("backbone_*.safetensors"))) == 1  # CTransPath stored once
    assert {p.suffix for p in out.rglob("*") if p.is_file()} <= {".json", ".safetensors"}  # no pickle


def test_predictions_equal_a_direct_plain_torch_computation(imported, published, c3_tiles):
    ens, _ = imported
    _, tiles = c3_tiles
    res = ens.predict_tiles(tiles)
    # the features the MLPs see: Macenko to the fixed target, then ImageNet normalisation, then CTransPath
    norm = ens.stain.transform(torch.from_numpy(tiles))
    x = (norm.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ct = E.load_encoder("ctranspath", published / "ctranspath.pth").eval()
    with torch.no_grad():
        feats = ct(x).numpy()
    assert np.allclose(ens.features(tiles), feats, rtol=1e-4, atol=1e-5)
    mean, members = _direct(published, feats)
    assert np.allclose(res["mean"], mean, rtol=1e-5, atol=1e-6)
    assert np.allclose(res["epistemic_var"], members.var(axis=0), rtol=1e-4, atol=1e-7)
    assert np.isnan(res["aleatoric_var"]).all() and res["epistemic_var"].max() > 0
    # the order of averaging is Path2Space's even where groups would differ in size (checked by construction)
    assert np.allclose(mean, members.mean(axis=0))


def test_saved_model_reloads_and_predicts_sections(imported, c3_tiles, tmp_path):
    from stimage_nb.predict import predict_section

    ens, out = imported
    back = Ensemble.load(out)
    c3, tiles = c3_tiles
    assert back.meta["mean_groups"] == ens.meta["mean_groups"]
    assert np.allclose(back.predict_tiles(tiles)["mean"], ens.predict_tiles(tiles)["mean"], rtol=1e-6)
    a = predict_section(back, c3, progress=False)
    assert K.ALEATORIC not in a.layers and K.EPISTEMIC in a.layers and a.shape == (16, N_GENES)
    assert a.uns[K.UNS]["source"] == "path2space" and K.DOMAIN_PERCENTILE in a.obs
    assert a.uns[K.UNS]["tile_um"] == 100.0


@pytest.fixture(scope="module")
def pred_dir(imported, tmp_path_factory):
    from stimage_nb.io.prediction import write_h5ad
    from stimage_nb.predict import predict_section

    ens, _ = imported
    d = tmp_path_factory.mktemp("p2s_pred")
    for s in kit.sections(("C3", "C5"), n=16):
        write_h5ad(predict_section(ens, s, progress=False), d / f"{s.name}.h5ad")
    return d


def test_every_export_takes_the_imported_predictions(pred_dir, tmp_path, her2st_manifest):
    import anndata as ad

    from stimage_nb.export import export_predictions
    from stimage_nb.widgets import OverlayViewer

    q = export_predictions(pred_dir, "qupath", tmp_path / "qp", progress=False)
    feats = json.loads(q[0].read_text())["features"]
    meas = feats[0]["properties"]["measurements"]
    names = [m["name"] for m in meas] if isinstance(meas, list) else list(meas)
    assert any(n.endswith(": mean") for n in names) and any(n.endswith("epistemic SD") for n in names)
    assert not any("aleatoric" in n for n in names)  # not modelled, not invented
    z = export_predictions(pred_dir, "ome-zarr", tmp_path / "zarr", manifest=her2st_manifest, progress=False)
    assert z and all(p.exists() for p in z)
    pred = ad.read_h5ad(pred_dir / "C3.h5ad")
    v = OverlayViewer(pred, feature=pred.var_names[0], mode="epistemic")
    assert v is not None
    pytest.importorskip("omero")
    from stimage_nb.omero.push import build_rois
    from stimage_nb.omero.tables import plan_tables

    specs = plan_tables(pred, run_id="r1")
    assert {s.quantity for s in specs} == {"mean", "epistemic_var", "domain"}  # no aleatoric, no empty cell types
    assert len(build_rois(pred, 1, "tag")) == pred.n_obs


def test_evaluate_beside_the_baseline(pred_dir, her2st_manifest, tmp_path):
    from stimage_nb.evaluate import evaluate

    m = evaluate(pred_dir, her2st_manifest, out=tmp_path / "ev", baseline_sections=["C2", "C4"], figures=False,
                 progress=False)
    for s in ("C3", "C5"):
        e = m["sections"][s]
        assert "skipped" in e["model"]["calibration"] and e["model"]["genes"]["log1p_counts"]["pearson"]["mean"] is not None
        assert e["baseline"]["train_sections"] == ["C2", "C4"] and "genes" in e["baseline"]
        assert "model_beats_baseline" in e["comparison"]["log1p_counts"]


def test_smoothing_equals_path2space_kdtree(pred_dir):
    import anndata as ad
    from scipy.spatial import cKDTree

    from stimage_nb.smoothing import smooth_prediction

    pred = ad.read_h5ad(pred_dir / "C3.h5ad")
    um = pred.uns[K.UNS]["um_per_px"]
    xy = pred.obsm[K.SPATIAL] * um
    for r, w in ((450.0, 1.0), (450.0, 3.0)):
        sm = smooth_prediction(pred, radius_um=r, centre_weight=w)
        X = np.asarray(pred.X, np.float64)
        tree = cKDTree(xy)
        ref = np.empty_like(X)
        for i, nb in enumerate(tree.query_ball_point(xy, r=r + 0.5 * um)):  # smooth_genes_kdtree
            m = X[nb].mean(0)
            k = len(nb)
            ref[i] = m if w == 1.0 else (k * m + (w - 1) * X[i]) / (k + w - 1)
        assert np.allclose(sm.X, ref, rtol=1e-5) and np.allclose(sm.layers[K.UNSMOOTHED], pred.X)
        assert sm.uns[K.UNS][K.UNS_SMOOTHING]["radius_um"] == r
    assert not np.allclose(smooth_prediction(pred).X, pred.X)  # default radius (2 tiles) finds neighbours
    with pytest.raises(StimageInputError, match="> 0"):
        smooth_prediction(pred, radius_um=-1)


def test_layout_errors_are_one_clear_line(published, tmp_path, capsys):
    import shutil

    bad = tmp_path / "w"
    shutil.copytree(published, bad)
    shutil.rmtree(bad / "mlp_ensemble" / "result_1_0_0")
    with pytest.raises(StimageInputError, match=r"incomplete.*result_1_0_0"):
        read_layout(bad)
    rc = main(["import-model", "path2space", "--weights", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "incomplete" in err and len(err.splitlines()) == 1
    (bad / "genes.txt").unlink()
    (bad / "genes.pkl").write_bytes(b"x")
    with pytest.raises(StimageInputError, match="missing|pickled"):
        import_path2space(bad, None, progress=False)
    assert read_layout(published.parent).root == published  # the ge_model folder above weights/ works too


def test_cli_import_writes_a_loadable_run(published, tmp_path, capsys):
    rc = main(["import-model", "path2space", "--weights", str(published), "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0 and "6 members (3 x 2 folds), 6 genes" in out and "no domain-shift score" in out
    ens = Ensemble.load(tmp_path / "run")
    assert ens.n_members == 6 and ens.domain is None and not ens.has_distribution
