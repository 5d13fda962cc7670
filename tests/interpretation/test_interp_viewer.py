"""The overlay viewer shows a clicked spot's attribution: its nuclei on the canvas, the numbers in spot_info."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("anywidget")


def test_clicking_an_explained_spot_shows_its_nuclei(attr_c6, frozen_ens, c6, tmp_path):
    from stimage_nb.io.prediction import write_h5ad
    from stimage_nb.predict import predict_section
    from stimage_nb.widgets import OverlayViewer

    pred = write_h5ad(predict_section(frozen_ens, c6, progress=False), tmp_path / "C6.h5ad")
    attr_dir = attr_c6.write(tmp_path / "attr")
    v = OverlayViewer(pred, attributions=attr_dir, feature=attr_c6.genes[1])
    info = v.select("14x21")
    a = info["attribution"]
    players, vals = attr_c6.matrix("14x21")
    assert a["gene"] == attr_c6.genes[1] and a["n_nuclei"] == len(players) - 1
    assert a["prediction"] == pytest.approx(a["base"] + a["nuclei_sum"] + a["background"], abs=1e-5)
    vv = np.frombuffer(v.canvas.shape_values, np.float32)
    assert np.allclose(vv, vals[:-1, 1], atol=1e-6)
    offs = np.frombuffer(v.canvas.shape_offsets, np.int32)
    assert len(offs) == len(vv) + 1 and offs[-1] * 8 == len(v.canvas.shapes)
    assert "why" in v.info.value and "nuclei" in v.info.value
    # a gene that was not explained falls back to the first explained one
    v.show(frozen_ens.genes[-1])
    v.select("14x21")
    assert v.spot_info["attribution"]["gene"] == attr_c6.genes[0]
    # a spot without attributions clears the nuclei
    other = next(s for s in v.pred.obs_names if s not in set(attr_c6.spots.index))
    v.select(str(other))
    assert "attribution" not in v.spot_info and v.canvas.shapes == b""
