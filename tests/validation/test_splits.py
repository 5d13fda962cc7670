"""Every protocol's folds: whole sections / patients / platforms held out, nothing of a test group trained on."""

from __future__ import annotations

import pytest

from stimage_nb.errors import StimageInputError
from stimage_nb.shifts import ACQUISITION_SHIFTS, Shift
from stimage_nb.validation import (
    Acquisition,
    CrossPlatform,
    LeaveOnePatientOut,
    LeaveOneSectionOut,
    SectionInfo,
    make_splits,
    platform_of,
)
from stimage_nb.validation._splits import skipped_protocols


@pytest.fixture(scope="module")
def her2st_infos(her2st_manifest):
    """The bundle's six sections as the protocols see them (read through the real manifest reader)."""
    from stimage_nb.io.readers import read_manifest

    return [SectionInfo.of(s) for s in read_manifest(her2st_manifest, genes=["ERBB2"])]


def _no_leak(split, infos):
    pat = {s.name: s.patient for s in infos}
    assert split.test and split.train
    assert not set(split.train) & set(split.test), split
    assert not set(split.val) & (set(split.test) | set(split.train)), split
    if split.protocol in ("lopo",) or (split.protocol == "acquisition" and split.fold.startswith("lopo")):
        test_patients = {pat[t] for t in split.test}
        assert not test_patients & {pat[t] for t in split.train + split.val}, split


def test_the_bundle_as_the_protocols_see_it(her2st_infos):
    assert {(s.name, s.patient, s.platform) for s in her2st_infos} == {
        ("B4", "B", "st"), *((f"C{i}", "C", "st") for i in range(2, 7))}


def test_leave_one_section_out(her2st_infos):
    splits = list(LeaveOneSectionOut().split(her2st_infos))
    assert [s.test for s in splits] == [(n,) for n in ("B4", "C2", "C3", "C4", "C5", "C6")]
    for s in splits:
        _no_leak(s, her2st_infos)
        assert set(s.train) | set(s.test) == {i.name for i in her2st_infos}


def test_leave_one_patient_out_runs_in_every_direction(her2st_infos):
    splits = list(LeaveOnePatientOut().split(her2st_infos))
    by_fold = {s.fold: s for s in splits}
    assert set(by_fold) == {"test_B", "test_C"}
    assert by_fold["test_B"].train == ("C2", "C3", "C4", "C5", "C6") and by_fold["test_B"].test == ("B4",)
    assert by_fold["test_C"].train == ("B4",) and by_fold["test_C"].test == ("C2", "C3", "C4", "C5", "C6")
    for s in splits:
        _no_leak(s, her2st_infos)
    only_b = list(LeaveOnePatientOut(["B"]).split(her2st_infos))
    assert [s.fold for s in only_b] == ["test_B"]


def test_validation_sections_are_never_test_sections(her2st_infos):
    for s in make_splits(her2st_infos, ["loso", "lopo"], val="last"):
        _no_leak(s, her2st_infos)
        if len(s.train) + len(s.val) >= 2:
            assert len(s.val) == 1


def test_acquisition_adds_the_shifts_to_the_patient_folds(her2st_infos):
    splits = list(Acquisition().split(her2st_infos))
    assert [s.fold for s in splits] == ["lopo_test_B", "lopo_test_C"]
    for s in splits:
        _no_leak(s, her2st_infos)
        assert s.shifts[0].is_identity and s.shifts == ACQUISITION_SHIFTS
        names = [sh.name for sh in s.shifts]
        assert {"black_background", "scan_4um", "black_background+scan_3.2um"} <= set(names)
    # a custom list without the identity still scores the section as scanned
    (a, *_) = list(Acquisition(shifts=[Shift("jpeg", jpeg_quality=40)]).split(her2st_infos))
    assert [sh.name for sh in a.shifts] == ["reference", "jpeg"]


def test_cross_platform_pairs():
    infos = [SectionInfo("a1", "p1", "st"), SectionInfo("a2", "p2", "st"), SectionInfo("v1", "p3", "visium"),
             SectionInfo("x1", "p4", "xenium"), SectionInfo("n1", "p5", "xenium", has_counts=False)]
    splits = list(CrossPlatform().split(infos))
    assert len(splits) == 6  # every ordered pair of 3 platforms
    for s in splits:
        plats = {i.name: i.platform for i in infos}
        assert len({plats[n] for n in s.train}) == 1 and len({plats[n] for n in s.test}) == 1
        assert {plats[n] for n in s.train} != {plats[n] for n in s.test}
        assert "n1" not in s.test + s.train  # no counts: nothing to score or train on
    (one,) = CrossPlatform("st", "xenium").split(infos)
    assert one.train == ("a1", "a2") and one.test == ("x1",) and one.fold == "train_st_test_xenium"


def test_protocols_the_manifest_cannot_support_say_why(her2st_infos):
    only_c = [i for i in her2st_infos if i.patient == "C"]
    with pytest.raises(StimageInputError, match="at least 2 patients"):
        make_splits(only_c, "lopo")
    with pytest.raises(StimageInputError, match="at least 2 platforms"):
        make_splits(her2st_infos, "cross_platform")
    with pytest.raises(StimageInputError, match="unknown patients"):
        make_splits(her2st_infos, "lopo", patients=["Z"])
    with pytest.raises(StimageInputError, match="unknown validation protocol"):
        make_splits(her2st_infos, "kfold")
    with pytest.raises(StimageInputError, match="at least 2 sections"):
        make_splits(only_c[:1], "loso")
    # "all" runs what it can and names what it cannot
    splits = make_splits(her2st_infos, "all")
    assert {s.protocol for s in splits} == {"loso", "lopo", "acquisition"}
    assert set(skipped_protocols(her2st_infos, "all")) == {"cross_platform"}


def test_platform_of_falls_back_to_uns_then_st(her2st_manifest, data_dir):
    from types import SimpleNamespace

    from stimage_nb.io.readers import read_manifest, read_visium

    (c3,) = read_manifest(her2st_manifest, ["C3"], genes=["ERBB2"])
    assert platform_of(c3) == c3.platform == "st"
    # an object without the field (a Section from before it existed): the AnnData's record, then legacy ST
    c3.adata.uns["stimage_nb"]["platform"] = "Visium"
    assert platform_of(SimpleNamespace(adata=c3.adata)) == "visium"
    del c3.adata.uns["stimage_nb"]["platform"]
    assert platform_of(SimpleNamespace(adata=c3.adata)) == "st"
    vis = read_visium(data_dir / "fixtures" / "visium_1.0.0")
    assert platform_of(vis) == "visium"
