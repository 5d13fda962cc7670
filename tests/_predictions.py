"""A prediction AnnData built from a REAL bundled her2st section (for export tests).

The predictor is tested elsewhere; exporters only need an AnnData that follows the prediction
contract (:mod:`stimage_nb._keys`). Here the observed counts stand in for the predictive mean, the
variances are small positive numbers derived from them, and the cell-type "probabilities" are the
section's real stereoscope proportions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stimage_nb import _keys as K

GENES = ["ERBB2", "GNAS", "MYL12B", "FASN", "SCD"]


def make_prediction(manifest, section: str = "C3", genes=GENES, image_scale: float = 1.0):
    """Prediction AnnData for ``section`` of the bundled manifest (counts as the mean).

    ``image_scale`` != 1 pretends the prediction ran on a lower-resolution copy of the image:
    coordinates are multiplied by it (image px = full-res px * image_scale) and µm/px divided.
    """
    import anndata as ad

    from stimage_nb.io.readers import read_manifest

    s = read_manifest(manifest, [section], genes=list(genes))[0]
    a = s.adata
    mean = a.X.toarray().astype(np.float32)
    rng = np.random.default_rng(0)
    ale = (mean + 1.0) * rng.uniform(0.5, 1.5, mean.shape).astype(np.float32)
    epi = (0.05 * (mean + 1.0)) ** 2 * rng.uniform(0.5, 1.5, mean.shape).astype(np.float32)
    props = a.obsm[K.CELLTYPE_PROPORTIONS]
    std = pd.DataFrame(0.1 * np.sqrt(props.to_numpy() * (1 - props.to_numpy())), index=props.index,
                       columns=props.columns).astype(np.float32)
    xy = np.asarray(a.obsm[K.SPATIAL], dtype=np.float64) * image_scale
    obs = pd.DataFrame({K.PIXEL_X: xy[:, 0], K.PIXEL_Y: xy[:, 1],
                        K.DIAMETER_UM: a.obs[K.DIAMETER_UM].to_numpy()}, index=a.obs_names.copy())
    p = ad.AnnData(X=mean, obs=obs, var=pd.DataFrame(index=list(a.var_names)))
    p.layers[K.ALEATORIC] = ale
    p.layers[K.EPISTEMIC] = epi
    p.obsm[K.CELLTYPE_MEAN] = props.astype(np.float32)
    p.obsm[K.CELLTYPE_STD] = std
    p.obsm[K.SPATIAL] = xy
    p.uns[K.UNS] = {
        "section": section, "patient": s.patient or "", "image": str(s.image_path),
        "um_per_px": float(s.um_per_px) / image_scale, "image_scale": float(image_scale),
        "train_sections": ["B4"], "genes": list(a.var_names), "celltypes": list(props.columns),
        "tile_um": 150.0, "out_px": 112, "backbone": "test_resnet", "n_members": 2, "run_id": "test-run",
        "weights_sha256": "0" * 64, "version": "0.1.0", "created": "2026-01-01T00:00:00",
    }
    return p
