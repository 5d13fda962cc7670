"""What a manifest yields, section by section: ``stimage-nb sections --manifest M``.

A check of one's own files before training or predicting: every row is read exactly as ``train``,
``predict`` and ``evaluate`` read it (so a bad row fails here with the same one-line error), and each
section is summarised: its platform, what an observation is, how many, how many genes, µm/px and
observation diameter. Images are not opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .. import _keys as K


@dataclass(frozen=True)
class SectionSummary:
    """One section as read: ``n_obs`` spots/bins/cells/pseudo-spots, ``um_per_px`` of its image
    (``None`` when only the image knows it), ``diameter_um`` the median observation diameter."""

    section: str
    patient: str
    platform: str
    obs_unit: str
    n_obs: int
    n_genes: int
    um_per_px: float | None
    diameter_um: float
    pseudospot_um: float | None
    image: str


@dataclass(frozen=True)
class ManifestSummary:
    """The sections of one manifest (:func:`summarize_manifest`)."""

    manifest: str
    sections: tuple[SectionSummary, ...]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([asdict(s) for s in self.sections]).set_index("section")

    def to_json(self) -> str:
        return json.dumps({"manifest": self.manifest, "sections": [asdict(s) for s in self.sections]}, indent=1)


def summarize_manifest(path: str | os.PathLike, sections: Sequence[str] | None = None) -> ManifestSummary:
    """Read a manifest's sections (:func:`stimage_nb.io.readers.read_manifest`) and summarise each.

    Raises :class:`~stimage_nb.errors.StimageInputError` for the first row that cannot be read.
    """
    from .readers import read_manifest

    out = []
    for s in read_manifest(path, sections):
        uns = s.adata.uns.get(K.UNS) or {}
        ps = (uns.get(K.PSEUDOSPOT) or {}).get("diameter_um")
        out.append(SectionSummary(
            section=s.name, patient="" if s.patient is None else str(s.patient), platform=s.platform,
            obs_unit=str(uns.get(K.OBS_UNIT) or "spot"), n_obs=int(s.adata.n_obs), n_genes=int(s.adata.n_vars),
            um_per_px=None if s.um_per_px is None else float(s.um_per_px),
            diameter_um=float(s.diameter_um) if s.adata.n_obs else float("nan"),
            pseudospot_um=None if ps is None else float(ps), image=str(s.image_path)))
    return ManifestSummary(str(Path(path)), tuple(out))


def add_cli(sub) -> None:
    """``stimage-nb sections``: read a manifest and list what each row yields."""
    p = sub.add_parser("sections", help="read a manifest and list each section's platform, observations, genes, µm/px")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--sections", help="comma-separated sections (default: all)")
    p.add_argument("--json", type=Path, help="also write the summary as JSON here")
    p.set_defaults(func=_cmd_sections)


def _cmd_sections(a) -> int:
    import pandas as pd

    names = [v.strip() for v in a.sections.split(",") if v.strip()] if a.sections else None
    summ = summarize_manifest(a.manifest, names)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(summ.to_frame().drop(columns=["image"]).to_string())
    if a.json:
        from ..atomic import write_text

        write_text(a.json, summ.to_json())
    return 0
