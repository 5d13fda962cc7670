"""Named gene panels and the gene specifications that training and prediction accept."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import StimageInputError

log = logging.getLogger(__name__)

#: Panels with a fixed gene list (the data-driven ``hvg:N`` and ``all`` need training sections).
NAMED = ("stimage769", "pam50", "breast_clinical")
#: What ``--genes`` accepts, for messages and the CLI help.
SPEC_HELP = "stimage769 | pam50 | breast_clinical | hvg:N (e.g. hvg:2000) | all | PATH (one symbol per line)"
DEFAULT_HVG = 2000

#: Old symbols (as in Parker et al. 2009 and its centroid files) -> current HGNC symbols.
ALIASES = {"ORC6L": "ORC6", "KNTC2": "NDC80", "CDCA1": "NUF2", "CTSL2": "CTSV", "STK15": "AURKA"}


@dataclass(frozen=True)
class GenePanel:
    """A gene list with its provenance.

    Attributes
    ----------
    name
        ``stimage769``, ``pam50``, ``breast_clinical``, ``hvg:N``, ``all``, or the file's path.
    genes
        Gene symbols, in the panel's order, unique.
    source
        Where the list comes from (publication, file, or the method and sections it was computed on).
    params
        Settings of a data-driven panel (``n_top``, ``flavor``, ``sections``, ``min_counts``...).
    """

    name: str
    genes: tuple[str, ...]
    source: str
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.genes)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "n_genes": len(self.genes), "source": self.source,
                           "params": self.params, "genes": list(self.genes)}, indent=1)

    def missing(self, available: Sequence[str]) -> list[str]:
        """Genes of the panel that are not in ``available`` (e.g. a model's or a counts table's genes)."""
        have = set(available)
        return [g for g in self.genes if g not in have]


def _packaged(name: str) -> list[str]:
    text = resources.files(__package__).joinpath("data", f"{name}.txt").read_text()
    return [ln.split()[0] for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def pam50() -> GenePanel:
    """The 50 PAM50 genes (Parker et al., J Clin Oncol 27:1160, 2009; current HGNC symbols)."""
    return GenePanel("pam50", tuple(_packaged("pam50")),
                     "Parker JS et al., J Clin Oncol 27:1160-1167 (2009), doi:10.1200/JCO.2008.18.8370")


def breast_clinical() -> GenePanel:
    """PAM50 + the Oncotype DX cancer genes it lacks + AR, GATA3, TOP2A, CD274 (59 genes; the
    packaged ``data/breast_clinical.txt`` says why each is there)."""
    genes = list(dict.fromkeys(_packaged("pam50") + _packaged("breast_clinical")))
    return GenePanel("breast_clinical", tuple(genes),
                     "PAM50 (Parker et al. 2009) + 21-gene recurrence score cancer genes (Paik et al., N Engl J "
                     "Med 2004) + AR, GATA3, TOP2A, CD274")


def stimage769() -> GenePanel:
    """The 769-gene list of the STimage her2st benchmark, read from the data bundle
    (``$STIMAGE_NB_DATA/her2st/genes_stimage_her2st.txt``)."""
    from .._settings import data_dir
    from ..io.readers import read_gene_list

    p = data_dir(required=False) / "her2st" / "genes_stimage_her2st.txt"
    if not p.is_file():
        raise StimageInputError(f"{p}: the STimage 769-gene list is not here. It ships with the data bundle "
                                "(set STIMAGE_NB_DATA to it); or pass --genes hvg:769 for the 769 most variable "
                                "genes of the training sections, or a gene-list file.")
    return GenePanel("stimage769", tuple(read_gene_list(p)), f"STimage her2st benchmark list ({p})")


def _counts_adata(sections):
    """One AnnData of the sections' raw counts over their common genes (``obs["section"]``)."""
    import anndata as ad

    if not sections:
        raise StimageInputError("a data-driven gene panel (hvg:N, all) needs training sections with counts.")
    no = [s.name for s in sections if not s.has_counts]
    if no:
        raise StimageInputError(f"sections {no} have no counts: a data-driven gene panel needs counts.")
    parts = []
    for s in sections:
        a = ad.AnnData(X=s.adata.X, obs={"section": [s.name] * s.adata.n_obs}, var=s.adata.var[[]])
        a.obs_names = [f"{s.name}:{i}" for i in s.adata.obs_names]
        parts.append(a)
    return ad.concat(parts, join="inner") if len(parts) > 1 else parts[0]


def detected_genes(sections, *, min_counts: int = 1) -> GenePanel:
    """Every gene in all the sections' counts with at least ``min_counts`` counts over their spots.

    ``sections``: the training :class:`~stimage_nb.io.section.Section` objects (never held-out ones:
    the panel is part of the method). Order: the first section's.
    """
    a = _counts_adata(sections)
    tot = np.asarray(a.X.sum(0)).ravel()
    genes = [g for g, t in zip(a.var_names, tot) if t >= min_counts]
    if not genes:
        raise StimageInputError(f"no gene has {min_counts}+ counts in sections {[s.name for s in sections]}.")
    names = [s.name for s in sections]
    return GenePanel("all", tuple(genes), f"every gene with >= {min_counts} counts in all of {names}",
                     {"min_counts": int(min_counts), "sections": names})


def highly_variable_genes(sections, n_top: int = DEFAULT_HVG, *, flavor: str = "seurat") -> GenePanel:
    """The ``n_top`` highly variable genes of the sections' counts (scanpy).

    Counts are depth-normalised (``sc.pp.normalize_total``, 10,000 per spot) and log1p-transformed,
    then ``sc.pp.highly_variable_genes(flavor=flavor, n_top_genes=n_top, batch_key="section")`` ranks
    genes by their normalised dispersion within each section (Satija et al. 2015 for ``"seurat"``)
    and prefers genes variable in more sections. Returned in the counts' order.
    """
    import scanpy as sc

    if n_top < 1:
        raise StimageInputError(f"hvg:N needs N >= 1, not {n_top}.")
    a = _counts_adata(sections)
    n_top = min(int(n_top), a.n_vars)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor=flavor,
                                batch_key="section" if a.obs["section"].nunique() > 1 else None)
    genes = [str(g) for g in a.var_names[a.var["highly_variable"].to_numpy()]]
    names = [s.name for s in sections]
    return GenePanel(f"hvg:{n_top}", tuple(genes), f"scanpy highly_variable_genes (flavor={flavor}) on {names}",
                     {"n_top": n_top, "flavor": flavor, "sections": names})


def needs_sections(spec) -> bool:
    """Whether a gene spec is computed from training data (``hvg:N``, ``all``)."""
    return isinstance(spec, str) and re.fullmatch(r"all|hvg(:\d+)?", spec.strip().lower()) is not None


def resolve_genes(spec, sections=None) -> GenePanel:
    """Turn a gene specification into a :class:`GenePanel`.

    Parameters
    ----------
    spec
        ``"stimage769"``, ``"pam50"``, ``"breast_clinical"``, ``"hvg:N"`` (``"hvg"``: N = 2000),
        ``"all"`` (every gene detected in training), the path of a gene-list file (one symbol per
        line, ``#`` comments), or a list of symbols.
    sections
        The training sections, for ``hvg:N`` and ``all``.

    Raises
    ------
    StimageInputError
        An unknown name, a missing file, or a data-driven panel without sections.

    Genes a panel names but the counts lack are handled where the counts are read (an error naming
    them, or dropped with ``drop_missing_genes`` / ``--drop-missing-genes``).
    """
    if isinstance(spec, GenePanel):
        return spec
    if isinstance(spec, (list, tuple)):
        genes = [str(g) for g in spec]
        if len(set(genes)) != len(genes):
            raise StimageInputError("the gene list has duplicates.")
        return GenePanel("list", tuple(genes), "a list given by the caller")
    s = str(spec).strip()
    low = s.lower()
    if low in NAMED:
        return {"stimage769": stimage769, "pam50": pam50, "breast_clinical": breast_clinical}[low]()
    m = re.fullmatch(r"hvg(?::(\d+))?", low)
    if m or low == "all":
        if not sections:
            raise StimageInputError(f"gene panel {s!r} is computed from the training sections' counts; give "
                                    "the sections (train does) or a fixed panel.")
        return detected_genes(sections) if low == "all" else highly_variable_genes(
            sections, int(m.group(1)) if m.group(1) else DEFAULT_HVG)
    p = Path(s).expanduser()
    if p.is_file():
        from ..io.readers import read_gene_list

        return GenePanel(str(p), tuple(read_gene_list(p)), f"gene-list file {p}")
    raise StimageInputError(f"--genes {s!r}: neither a gene panel nor a file. Use {SPEC_HELP}.")
