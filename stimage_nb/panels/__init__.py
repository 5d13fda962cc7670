"""Gene panels: the genes a model is trained on and a cohort is summarised by.

- fixed panels: :func:`stimage769` (the STimage her2st benchmark list, from the data bundle),
  :func:`pam50` (Parker et al. 2009), :func:`breast_clinical` (PAM50 + recurrence-score genes + AR,
  GATA3, TOP2A, CD274);
- data-driven panels of the training sections: :func:`highly_variable_genes` (scanpy) and
  :func:`detected_genes` (every gene detected in training);
- :func:`resolve_genes` turns what ``--genes`` accepts (``stimage769|pam50|breast_clinical|hvg:N|all|PATH``)
  into a :class:`GenePanel`.

>>> from stimage_nb import panels
>>> len(panels.pam50())
50
"""

from ._panels import (
    ALIASES,
    SPEC_HELP,
    GenePanel,
    breast_clinical,
    detected_genes,
    highly_variable_genes,
    needs_sections,
    pam50,
    resolve_genes,
    stimage769,
)

__all__ = ["GenePanel", "resolve_genes", "needs_sections", "pam50", "breast_clinical", "stimage769",
           "highly_variable_genes", "detected_genes", "ALIASES", "SPEC_HELP"]
