"""Names with '/' (cell types like 'NK/T cells', genes like 'HLA-DRB1/3') through a push: safe, mapped back, shown
by the dry run before anything is written. The double refuses '/' in column names as the real server does."""

from __future__ import annotations

import numpy as np
import pytest

from stimage_nb import _keys as K


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch, omero_stack):
    monkeypatch.setenv("STIMAGE_NB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def slash_pred(c3_pred, her2st_manifest):
    """Real C3 with the her2st minor cell-type tier (its real 'CAFs MSC/iCAF-like') plus 'NK/T cells' and a '/' gene."""
    from stimage_nb.io.readers import read_manifest

    (sec,) = read_manifest(her2st_manifest, ["C3"], genes=["ERBB2"], celltype_level="minor")
    minor = sec.adata.obsm[K.CELLTYPE_PROPORTIONS].loc[c3_pred.obs_names].astype(np.float32)
    minor = minor.rename(columns={minor.columns[0]: "NK/T cells"})
    c3_pred.obsm[K.CELLTYPE_MEAN] = minor
    c3_pred.obsm[K.CELLTYPE_STD] = (0.1 * minor).astype(np.float32)
    c3_pred.var_names = ["HLA-DRB1/3"] + list(c3_pred.var_names[1:])
    return c3_pred


def test_the_double_refuses_a_slash_like_the_server(server, session_on, c3_on_server, c3_pred):
    import omero

    from stimage_nb.omero import tables as T

    spec = T.TableSpec("t", "mean", ["NK/T cells"], c3_pred.n_obs, lambda a, b: np.zeros((b - a, 1)))
    sess = session_on(server)
    with pytest.raises(omero.InternalException, match="character is not allowed in object names"):
        T.write_table(sess.gateway, spec, image_id=c3_on_server, spot_ids=list(c3_pred.obs_names),
                      xy_full=np.zeros((c3_pred.n_obs, 2)), roi_ids=None, ctx=sess.gateway.SERVICE_OPTS.copy())


def test_slash_names_are_checked_before_the_push_and_map_back(server, session_on, c3_on_server, slash_pred, caplog):
    from stimage_nb.omero import push as U
    from stimage_nb.omero.pull import Attachment, pull_annotations, read_omero_table

    iid = c3_on_server
    sess = session_on(server)
    plan = U.push_predictions(sess, iid, slash_pred, dry_run=True, progress=False)  # nothing written yet
    assert plan.renamed["HLA-DRB1/3"] == "HLA-DRB1%2F3"
    assert plan.renamed["P(NK/T cells)"] == "P(NK%2FT cells)" and plan.renamed["P(CAFs MSC/iCAF-like)"]
    assert "renamed columns" in str(plan) and "'P(NK/T cells)' -> 'P(NK%2FT cells)'" in str(plan)
    assert not server.rois and not any(c[1] == "initialize" for c in server.calls)
    offline = U.offline_push_plan(slash_pred)
    assert offline["renamed_columns"] == plan.renamed

    res = U.push_predictions(sess, iid, slash_pred, progress=False)
    assert res.rois_written == slash_pred.n_obs and len(res.table_file_ids) == 4
    ct_name = next(n for n in res.table_file_ids if "celltype" in n)
    att = Attachment(0, res.table_file_ids[ct_name], ct_name, None, "OMERO.tables", 0, None)
    headers = server.tables[res.table_file_ids[ct_name]].headers
    assert "P(NK%2FT cells)" in [h[0] for h in headers]
    assert ("P(NK%2FT cells)", "celltype: P(NK/T cells)") in [(h[0], h[2]) for h in headers]
    back = read_omero_table(sess, att)
    assert "P(NK/T cells)" in back.columns and "SD(CAFs MSC/iCAF-like)" in back.columns
    np.testing.assert_allclose(back["P(NK/T cells)"].to_numpy(), slash_pred.obsm[K.CELLTYPE_MEAN]["NK/T cells"], rtol=1e-6)
    mean = read_omero_table(sess, Attachment(0, res.table_file_ids[next(n for n in res.table_file_ids if " mean " in n)],
                                             "m", None, "OMERO.tables", 0, None))
    assert list(mean.columns[5:]) == list(slash_pred.var_names)
    record = [m for m in pull_annotations(sess, iid).maps if m["on"] == "image"]
    assert any(k == "renamed columns" and "HLA-DRB1%2F3 = HLA-DRB1/3" in v for m in record for k, v in m["pairs"])
