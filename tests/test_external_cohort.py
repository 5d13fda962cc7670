"""A cohort from another lab: a model trained on the bundle, evaluated with a manifest of only other sections.

The baseline beside the model has to be trained on the model's own training sections, which the other
lab's manifest does not hold; the model records where they came from (absolute manifest path and the
sha256 of every file it read), so `evaluate` finds them there, or takes --train-manifest, and says
plainly when it cannot. A section of the other lab that is *called* like a training section is not
mistaken for it (its files differ).
"""

from __future__ import annotations

import json
import shutil

import _modelkit as kit
import anndata as ad
import pytest

from stimage_nb import _keys as K
from stimage_nb.errors import StimageInputError
from stimage_nb.io.provenance import check_training_data, locate_training_data, record_training_data


def _other_lab(folder, data_dir):
    """Their manifest in their folder: B4 as 'L2-B4' and the bundle's C4 under the name 'C2' (a name clash).

    Count tables are copies, spot tables every third spot; the images are symbolic links (same bytes, and the image conversion
    cache of the bundle is reused, which keeps the test fast).
    """
    src = data_dir / "her2st"
    lab = folder / "other_lab"
    rows = ["section,patient,image,counts,spots,um_per_px"]
    for theirs, ours, patient in (("L2-B4", "B4", "P7"), ("C2", "C4", "P8")):
        for sub, name in (("images", f"{ours}.jpg"), ("counts", f"{ours}.tsv.gz"), ("spots", f"{ours}_selection.tsv")):
            (lab / sub).mkdir(parents=True, exist_ok=True)
            dst = lab / sub / name.replace(ours, theirs)
            if sub == "images":
                dst.symlink_to(src / sub / name)
            elif sub == "spots":  # every third spot: a smaller cohort, the same kind of files
                lines = (src / sub / name).read_text().splitlines(keepends=True)
                dst.write_text("".join(lines[:1] + lines[1::3]))
            else:
                shutil.copy(src / sub / name, dst)
        rows.append(f"{theirs},{patient},images/{theirs}.jpg,counts/{theirs}.tsv.gz,spots/{theirs}_selection.tsv,0.69")
    (lab / "cohort.csv").write_text("\n".join(rows) + "\n")
    return lab / "cohort.csv"


@pytest.fixture(scope="module")
def manifest_run(tmp_path_factory, her2st_manifest):
    """A tiny model trained from the bundle's manifest (C2, validated on C3), with 12 genes."""
    from stimage_nb.train import train

    out = tmp_path_factory.mktemp("run_manifest")
    train(her2st_manifest, genes=kit.genes()[:12], out=out, sections=["C2"], val_sections=["C3"],
          config=kit.tiny_config(members=2, epochs=1), progress=False)
    return out


def test_the_model_records_its_training_files(manifest_run, her2st_manifest):
    cfg = json.loads((manifest_run / "ensemble.json").read_text())
    rec = cfg["training_data"]
    assert rec["manifest"] == str(her2st_manifest.resolve())
    by = {r["section"]: {f["role"]: f for f in r["files"]} for r in rec["sections"]}
    assert set(by) == {"C2", "C3"} and by["C2"]["image"]["path"].endswith("images/C2.jpg")
    assert set(by["C2"]) == {"image", "counts", "spots", "celltypes"}
    assert by["C2"]["counts"]["sha256"] == "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d"
    assert [r["patient"] for r in rec["sections"]] == ["C", "C"]


@pytest.fixture(scope="module")
def cohort_pred(manifest_run, tmp_path_factory, data_dir):
    """The other lab's manifest and the model's predictions of its two sections."""
    from stimage_nb.predict import predict_manifest

    folder = tmp_path_factory.mktemp("cohort")
    cohort = _other_lab(folder, data_dir)
    predict_manifest(manifest_run, cohort, folder / "pred", device="cpu", progress=False)
    return cohort, folder / "pred"


def test_external_manifest_gets_the_baseline_beside_the_model(cohort_pred, tmp_path, her2st_manifest):
    from stimage_nb.evaluate import evaluate

    cohort, pred = cohort_pred
    m = evaluate(pred, cohort, out=tmp_path / "eval", figures=False, progress=False)
    assert set(m["sections"]) == {"L2-B4", "C2"}
    for e in m["sections"].values():
        b = e["baseline"]
        assert "skipped" not in b, b
        assert b["training_data"] == {"manifest": str(her2st_manifest.resolve()), "source": "recorded manifest",
                                      "verified": True}
        assert b["train_sections"] == ["C2"] and b["genes"]["log1p_counts"]["pearson"]["mean"] is not None
        assert e["comparison"]["log1p_counts"]["baseline_mean_pearson"] is not None
        assert e["held_out_patient"] is True  # the training patient (C) comes from the record
    # their "C2" is the bundle's C4: held out, not flagged as "one of the training sections"
    assert "warning" not in m["sections"]["C2"]


def test_moved_training_data_says_so_and_takes_train_manifest(cohort_pred, tmp_path, her2st_manifest):
    from stimage_nb.evaluate import evaluate

    cohort, pred_all = cohort_pred
    pred = tmp_path / "pred"
    pred.mkdir()
    a = ad.read_h5ad(pred_all / "L2-B4.h5ad")  # the training data moved away since: the recorded manifest is gone
    rec = json.loads(a.uns[K.UNS]["training_data"])
    rec["manifest"] = str(tmp_path / "moved" / "sections.csv")
    a.uns[K.UNS]["training_data"] = json.dumps(rec)
    a.write_h5ad(pred / "L2-B4.h5ad")
    m = evaluate(pred, cohort, out=tmp_path / "e1", figures=False, progress=False)
    msg = m["sections"]["L2-B4"]["baseline"]["skipped"]
    assert "cannot find the model's training sections ['C2']" in msg and "does not exist" in msg
    assert "is not the file the model was trained on" in msg  # their "C2" was tried and refused
    assert "--train-manifest" in msg

    m = evaluate(pred, cohort, out=tmp_path / "e2", figures=False, progress=False, train_manifest=her2st_manifest)
    assert m["sections"]["L2-B4"]["baseline"]["training_data"]["source"] == "--train-manifest"
    with pytest.raises(StimageInputError, match="does not hold the model's training data"):
        evaluate(pred, cohort, out=tmp_path / "e3", figures=False, progress=False, train_manifest=cohort)


def test_a_changed_file_is_noticed(tmp_path, data_dir):
    src = data_dir / "her2st"
    lab = tmp_path / "copy"
    shutil.copytree(src / "spots", lab / "spots")
    shutil.copytree(src / "counts", lab / "counts")
    (lab / "images").mkdir()
    shutil.copy(src / "images" / "C2.jpg", lab / "images" / "C2.jpg")
    shutil.copy(src / "sections.csv", lab / "sections.csv")
    rec = record_training_data(lab / "sections.csv", ["C2"])
    assert check_training_data(rec, lab / "sections.csv") is None
    with open(lab / "spots" / "C2_selection.tsv", "a") as f:
        f.write("\n")
    why = check_training_data(rec, lab / "sections.csv")
    assert "C2's spots" in why and "not the file the model was trained on" in why
    with pytest.raises(StimageInputError, match="--train-manifest"):
        locate_training_data(rec, ["C2"], evaluation_manifest=lab / "sections.csv")


def test_model_trained_from_sections_in_memory_is_found_by_its_files(her2st_manifest):
    """The shared tiny model was trained from Section objects: no manifest, but its image and counts files."""
    cfg = json.loads((kit.tiny_run() / "ensemble.json").read_text())
    rec = cfg["training_data"]
    assert rec["manifest"] is None and {f["role"] for f in rec["sections"][0]["files"]} == {"image", "counts"}
    td = locate_training_data(rec, ["C2", "C3"], evaluation_manifest=her2st_manifest)
    assert td.source == "evaluation manifest" and td.verified and td.manifest == her2st_manifest
