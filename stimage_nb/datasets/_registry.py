"""The registry of public datasets: where each file comes from, its sha256, and where it goes.

One :class:`Dataset` per name (``stimage-nb fetch-data --list`` prints them). Each :class:`DataFile`
is fetched from ``base_url + "/" + remote`` (or a mirror) into ``<dest>/<path>``, checked against its
sha256, and optionally post-processed (``gunzip``: the bundle holds the decompressed table).

Where the hashes come from (they could not be checked against the live sources from the machines this
project is built on, which reach only PyPI, Debian and npm):

- **her2st**: the sha256 of the offline bundle's bytes (``../shared/data/her2st``). The images
  (Photoshop EXIF of 2016), count tables (their gzip headers keep the names ``ut_<S>_stdata_filtered.tsv``
  and 2019 timestamps) and spot tables (same length, first and last lines as the repository's files)
  are verbatim copies of ``almaan/her2st``; the cell-type tables are *derived* (gunzipped from
  ``res/ST-deconv/props/...``), so the download itself is not hashed and the decompressed table is
  compared with the bundle's (a mismatch is logged, not fatal). ``clusters/`` of the bundle is not
  fetched (nothing in the package reads it; in the repository it sits in a password-protected archive).
- **10x Visium FFPE breast**: the sha256 that squidpy 1.8.0 records for the same files
  (``squidpy/datasets/datasets.yaml``, mirrored at exampledata.scverse.org, used here as a mirror).
- **10x Visium CytAssist and Xenium breast (Janesick et al. 2023)**: no published checksum could be
  found (10x lists md5 sums only on its dataset pages, which cannot be reached from here); the
  registry says so (``sha256=None``) and the download is size-checked only by the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HER2ST_SECTIONS = {  # section: (patient, image path in the repository)
    "B4": ("B", "data/ST-imgs/B/B4/BT10737_D2_HE.jpg"),
    "C2": ("C", "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg"),
    "C3": ("C", "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg"),
    "C4": ("C", "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg"),
    "C5": ("C", "data/ST-imgs/C/C5/5714_HE_BT_E1.jpg"),
    "C6": ("C", "data/ST-imgs/C/C6/5714_HE_BT_E2.jpg"),
}
HER2ST_UM_PER_PX = 0.69
_PROPS = {"major": "res/ST-deconv/props/major/{s}/W.2020-03-04130406.862404.tsv.gz",
          "minor": "res/ST-deconv/props/minor/{s}/W.2020-03-05042117.377259.tsv.gz"}

# sha256 of the offline bundle's files (see the module docstring for what was and was not verified).
_HER2ST_SHA256 = {
    "images/B4.jpg": "3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d",
    "images/C2.jpg": "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
    "images/C3.jpg": "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
    "images/C4.jpg": "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
    "images/C5.jpg": "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
    "images/C6.jpg": "dddd87232589648861a9b6776dc1749be8306213f6589aeef0e805fb2b1ee263",
    "counts/B4.tsv.gz": "e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb",
    "counts/C2.tsv.gz": "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
    "counts/C3.tsv.gz": "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
    "counts/C4.tsv.gz": "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
    "counts/C5.tsv.gz": "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
    "counts/C6.tsv.gz": "60478b0d2411501866685f41312c65c6591e499d64d5b719be8ee9bab25c9bc8",
    "spots/B4_selection.tsv": "192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0",
    "spots/C2_selection.tsv": "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
    "spots/C3_selection.tsv": "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
    "spots/C4_selection.tsv": "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
    "spots/C5_selection.tsv": "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
    "spots/C6_selection.tsv": "efdbbc6759c6af43baa966505c31705f09c087c1dccf1ea3e0d1db7b55717117",
    # derived (gunzipped) tables: compared after decompression, a mismatch is logged
    "celltypes/major/B4-proportion.tsv": "5ac0e15d4df3f6ad86a82446f5d3f6cdc69c2a8a1a89acd17aca4ebe386d7e25",
    "celltypes/major/C2-proportion.tsv": "d4bed4fb7d1fb758b32431f923480d0c5578579d4b4a8cafe314b691e33b4c45",
    "celltypes/major/C3-proportion.tsv": "b11abb56236fc3d3f49544c9a2400635d7b7a2083cc7281410d9c3d6b4dee267",
    "celltypes/major/C4-proportion.tsv": "c0dcfca1ef3bacfa4bcfc41628648f9951241a549373377a2e6cc42243a0509d",
    "celltypes/major/C5-proportion.tsv": "d615ed3e8c78f32a7d0289f2e57afe5d44cf4610d32de65e0965deebfb539ba7",
    "celltypes/major/C6-proportion.tsv": "8dffb858206a5dbd9da1ff08f83c9585c9f3e714951d290706a0a7a65882337e",
    "celltypes/minor/B4-proportion.tsv": "3d721f549521e9672443821e203095b8fc96dac3527d72da223d1203df496f70",
    "celltypes/minor/C2-proportion.tsv": "fc459f58637322f23997bb9a5ebb985b7c821af9629939c3dd4d6227051bbe67",
    "celltypes/minor/C3-proportion.tsv": "a8c3f446c397ca613ed28eb3543958ddb92122c74280a0a2fff6a076784a8c3d",
    "celltypes/minor/C4-proportion.tsv": "a91c96c1cc9a74c9d5d824730cbc7546d1146754066f5d5c4f65df0ed55be5c8",
    "celltypes/minor/C5-proportion.tsv": "2117ebaeac021b5edde39773fa63001af9c8a6cf760cd7fc30e9b9094133ddb9",
    "celltypes/minor/C6-proportion.tsv": "7e6008dabe94d93111852db7c946f37dfa6edf6d464a2a247d43c6a7427a80fc",
}


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset.

    ``path``: where it goes under the destination (``<dest>/<path>``); ``remote``: its path under the
    dataset's ``base_url``; ``sha256``: of the downloaded bytes (``None``: no published checksum);
    ``gunzip``: the download is gzip-compressed and ``path`` is its decompressed content, whose expected
    sha256 is ``sha256_processed``; ``section``: the her2st section it belongs to (for ``sections=``);
    ``extract``: a ``.tar.gz``/``.zip`` unpacked into this folder (relative to the file's folder).
    """

    path: str
    remote: str
    sha256: str | None
    gunzip: bool = False
    sha256_processed: str | None = None
    section: str | None = None
    extract: str | None = None


@dataclass(frozen=True)
class Dataset:
    """A public dataset: what it is, its licence and citation, and its files."""

    name: str
    title: str
    description: str
    licence: str
    citation: str
    page: str
    base_url: str
    files: tuple[DataFile, ...]
    size: str
    checksums: str                       # where the sha256 come from, or why there are none
    mirrors: tuple[str, ...] = ()        # other base URLs serving the same remote paths
    url_env: str | None = None           # environment variable that overrides base_url
    manifest: tuple[str, ...] = field(default=())  # manifest rows written after the fetch (CSV lines)

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "description": self.description, "licence": self.licence,
                "citation": self.citation, "page": self.page, "size": self.size, "checksums": self.checksums,
                "base_url": self.base_url, "mirrors": list(self.mirrors),
                "files": [{"path": f.path, "url": f"{self.base_url}/{f.remote}", "sha256": f.sha256,
                           **({"sha256_after_gunzip": f.sha256_processed} if f.gunzip else {})}
                          for f in self.files]}


def _her2st() -> Dataset:
    files: list[DataFile] = []
    for s, (_patient, img) in HER2ST_SECTIONS.items():
        files += [
            DataFile(f"images/{s}.jpg", img, _HER2ST_SHA256[f"images/{s}.jpg"], section=s),
            DataFile(f"counts/{s}.tsv.gz", f"data/ST-cnts/{s}.tsv.gz", _HER2ST_SHA256[f"counts/{s}.tsv.gz"], section=s),
            DataFile(f"spots/{s}_selection.tsv", f"data/ST-spotfiles/{s}_selection.tsv",
                     _HER2ST_SHA256[f"spots/{s}_selection.tsv"], section=s),
        ]
        for level, remote in _PROPS.items():
            p = f"celltypes/{level}/{s}-proportion.tsv"
            files.append(DataFile(p, remote.format(s=s), None, gunzip=True, sha256_processed=_HER2ST_SHA256[p],
                                  section=s))
    return Dataset(
        name="her2st",
        title="HER2-positive breast cancer, legacy Spatial Transcriptomics (6 sections, 2 patients)",
        description="Andersson et al. 2021: H&E images (0.69 µm/px), raw UMI counts, spot selections and "
                    "stereoscope cell-type proportions (major and minor tiers) of sections B4, C2-C6; the "
                    "data the demo, the tests and the notebooks use. Written as her2st/sections.csv + images/, "
                    "counts/, spots/, celltypes/{major,minor}/ (the offline bundle's layout).",
        licence="no licence file in the repository; cite the paper",
        citation="Andersson A. et al., Spatial deconvolution of HER2-positive breast cancer delineates tumor-"
                 "associated cell type interactions. Nat Commun 12, 6012 (2021)",
        page="https://github.com/almaan/her2st",
        base_url="https://raw.githubusercontent.com/almaan/her2st/master",
        url_env="STIMAGE_NB_HER2ST_URL",
        files=tuple(files), size="about 25 MB",
        checksums="sha256 of the offline bundle's verbatim copies (images, counts, spots); cell-type tables "
                  "are checked after gunzip (not verifiable against the live source from the build machines)",
    )


def _visium_ffpe_breast() -> Dataset:
    stem = "Visium_FFPE_Human_Breast_Cancer"
    return Dataset(
        name="visium-ffpe-breast",
        title="10x Visium FFPE human breast cancer: ductal carcinoma in situ, invasive carcinoma",
        description="Space Ranger 1.3.0 outputs of one FFPE section (55 µm spots): filtered matrix, spatial/ "
                    "(positions, scale factors, low/hi-res images) and the full-resolution H&E TIFF. Written as "
                    "visium-ffpe-breast/outs/ + image.tif and a manifest row (visium column) for predict/evaluate.",
        licence="CC BY 4.0 (as 10x Genomics states on its dataset pages; not re-checked from here)",
        citation="Human Breast Cancer: Ductal Carcinoma In Situ, Invasive Carcinoma (FFPE), Spatial Gene "
                 "Expression Dataset by Space Ranger 1.3.0, 10x Genomics",
        page="https://www.10xgenomics.com/datasets/human-breast-cancer-ductal-carcinoma-in-situ-invasive-"
             "carcinoma-ffpe-1-standard-1-3-0",
        base_url=f"https://cf.10xgenomics.com/samples/spatial-exp/1.3.0/{stem}",
        mirrors=(f"https://exampledata.scverse.org/squidpy/10x_genomics/{stem}",),
        files=(
            DataFile("outs/filtered_feature_bc_matrix.h5", f"{stem}_filtered_feature_bc_matrix.h5",
                     "64321f603f7200b0bedffbe353c04dde72bbe7c7be7390e503d955aa9b2584c5"),
            DataFile("outs/spatial.tar.gz", f"{stem}_spatial.tar.gz",
                     "2937fcc44b7adee70f162a9e09857410dcf22eed89a3e3187950dfc1574fea14", extract="."),
            DataFile("image.tif", f"{stem}_image.tif",
                     "b3fbbdb5006769ef7d2b614171e208b6caf901bde52272a02da6e3d019626ce0"),
        ),
        size="not measured here (the full-resolution TIFF is most of it)",
        checksums="sha256 as recorded by squidpy 1.8.0 (squidpy/datasets/datasets.yaml) for the same files",
        manifest=("section,patient,visium,image", f"{stem},FFPE_breast,outs,image.tif"),
    )


def _visium_cytassist_breast() -> Dataset:
    stem = "CytAssist_FFPE_Human_Breast_Cancer"
    return Dataset(
        name="visium-cytassist-breast",
        title="10x Visium CytAssist FFPE human breast cancer (the block of Janesick et al. 2023)",
        description="Space Ranger 2.0.0 outputs of a serial section of the FFPE block profiled with Xenium "
                    "(xenium-breast-rep1): filtered matrix, spatial/ and the full-resolution H&E TIFF. Written "
                    "as visium-cytassist-breast/outs/ + image.tif and a manifest row.",
        licence="CC BY 4.0 (as 10x Genomics states on its dataset pages; not re-checked from here)",
        citation="Janesick A. et al., High resolution mapping of the tumor microenvironment using integrated "
                 "single-cell, spatial and in situ analysis. Nat Commun 14, 8353 (2023)",
        page="https://www.10xgenomics.com/products/xenium-in-situ/preview-dataset-human-breast",
        base_url=f"https://cf.10xgenomics.com/samples/spatial-exp/2.0.0/{stem}",
        files=(
            DataFile("outs/filtered_feature_bc_matrix.h5", f"{stem}_filtered_feature_bc_matrix.h5", None),
            DataFile("outs/spatial.tar.gz", f"{stem}_spatial.tar.gz", None, extract="."),
            DataFile("image.tif", f"{stem}_tissue_image.tif", None),
        ),
        size="not measured here (the full-resolution 16-bit TIFF is most of it)",
        checksums="none: 10x publishes md5 sums only on its dataset pages, which could not be read from here",
        manifest=("section,patient,visium,image", f"{stem},Janesick2023,outs,image.tif"),
    )


def _xenium_breast_rep1() -> Dataset:
    stem = "Xenium_FFPE_Human_Breast_Cancer_Rep1"
    return Dataset(
        name="xenium-breast-rep1",
        title="10x Xenium FFPE human breast cancer, replicate 1, with its post-Xenium H&E (Janesick et al. 2023)",
        description="Xenium Onboard Analysis 1.0.1 output bundle (cells, cell-feature matrix, transcripts, "
                    "morphology images; 313-gene panel), the H&E of the same section as a pyramidal OME-TIFF and "
                    "the affine alignment of the H&E to the Xenium frame. Written as xenium-breast-rep1/outs/, "
                    "he_image.ome.tif, he_imagealignment.csv (cells are read by the platform readers).",
        licence="CC BY 4.0 (as 10x Genomics states on its dataset pages; not re-checked from here)",
        citation="Janesick A. et al., High resolution mapping of the tumor microenvironment using integrated "
                 "single-cell, spatial and in situ analysis. Nat Commun 14, 8353 (2023)",
        page="https://www.10xgenomics.com/products/xenium-in-situ/preview-dataset-human-breast",
        base_url=f"https://cf.10xgenomics.com/samples/xenium/1.0.1/{stem}",
        files=(
            DataFile("outs.zip", f"{stem}_outs.zip", None, extract="."),
            DataFile("he_image.ome.tif", f"{stem}_he_image.ome.tif", None),
            DataFile("he_imagealignment.csv", f"{stem}_he_imagealignment.csv", None),
        ),
        size="about 10 GB (the output bundle alone is reported as 9.86 GB)",
        checksums="none: 10x publishes md5 sums only on its dataset pages, which could not be read from here",
    )


DATASETS: dict[str, Dataset] = {d.name: d for d in (_her2st(), _visium_ffpe_breast(), _visium_cytassist_breast(),
                                                    _xenium_breast_rep1())}
