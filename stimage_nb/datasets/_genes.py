"""The gene list the her2st demo and notebooks use."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .._settings import data_dir

log = logging.getLogger(__name__)

GENE_LIST = "genes_stimage_her2st.txt"


def her2st_gene_list(manifest: str | os.PathLike | None = None, n_top: int = 769, train_sections=None) -> list[str]:
    """The STimage her2st gene list, or (when absent) the ``n_top`` most variable genes of the training sections.

    The 769-gene list of the STimage her2st benchmark ships with the offline bundle
    (``her2st/genes_stimage_her2st.txt``) but is not part of the public her2st repository, so a fetched
    copy of the data has none: then the genes with the largest variance of ``log1p`` counts across the
    spots of ``train_sections`` (mean ``log1p`` > 0.1, common to all of them) stand in, and a warning
    says so.
    """
    from ..io.readers import read_gene_list, read_manifest

    manifest = Path(manifest) if manifest else data_dir() / "her2st" / "sections.csv"
    gl = manifest.parent / GENE_LIST
    if gl.is_file():
        return read_gene_list(gl)
    import numpy as np

    log.warning("%s not found; using the %d most variable genes of the training sections instead", gl, n_top)
    secs = read_manifest(manifest, train_sections)
    common = set.intersection(*(set(s.genes) for s in secs))
    genes = sorted(common)
    stats = []
    for s in secs:
        X = s.adata[:, genes].X
        X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
        stats.append(np.log1p(X))
    X = np.concatenate(stats)
    keep = X.mean(0) > 0.1
    order = np.argsort(-X.var(0) * keep)
    return [genes[i] for i in order[:n_top]]
