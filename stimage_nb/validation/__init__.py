"""Validation across sections, patients, platforms and acquisitions: ``stimage-nb validate``.

Will a model work on *my* slides? This subpackage answers it the way the field does: whole sections,
patients or platforms are held out (never spots of a training section), a simple baseline is scored on
the same tiles in the same run, and each number comes with a paired test.

- **Protocols** (:mod:`._splits`, splitters in the sense of scikit-learn's ``LeaveOneGroupOut``):
  :class:`LeaveOneSectionOut`, :class:`LeaveOnePatientOut` (every direction), :class:`CrossPlatform`
  (train on one ``platform``, test on another) and :class:`Acquisition` (the held-out sections also re-made
  by :mod:`stimage_nb.shifts`: coarser scans down to 4 µm/px, defocus, restaining, JPEG, a black masked
  background, combinations). :func:`make_splits` builds the folds.
- **The runner** :func:`validate`: per fold, train the ensemble (shared between folds with the same training
  sections), predict each held-out section's tiles with the **ensemble**, its **first member alone** and the
  **ridge baseline**, and score them; a finished fold is never redone (per-fold files written atomically).
- **Metrics** (:mod:`stimage_nb.evaluate` reused, the rest through the field's libraries): per-gene Pearson
  and Spearman on log1p counts and on depth-normalised expression (log1p CP10k); a Wilcoxon signed-rank test
  across genes of model vs baseline (scipy) and a bootstrap CI over spots of the difference in mean r;
  agreement of the maps: Lee's L (esda/libpysal) and SSIM of the rasterised maps (scikit-image);
  calibration (PIT histogram, reliability curve, 50/90% coverage); sparsification (does the uncertainty rank
  the errors better than the depth proxy?); cell-type metrics.
- **Results** :class:`ValidationResult` (``to_frame()``: one row per fold x section x model x metric;
  ``table()``, ``targets()``); :func:`write_report` writes ``validation.csv``, ``metrics_per_gene.parquet``,
  figures and ``report.md``.

Example::

    from stimage_nb.validation import validate, write_report
    res = validate("sections.csv", out="val/", protocol="lopo", genes=genes)
    write_report(res, "val/")
    res.table()
"""

from ._metrics import bootstrap_mean_r_difference, lees_l, map_ssim, paired_test, spatial_weights, spot_grid
from ._report import readme_table, write_report
from ._result import RECORD_COLUMNS, ValidationResult
from ._runner import COMPARISONS, MODELS, load_result, single_member, validate
from ._splits import (
    PROTOCOLS,
    Acquisition,
    CrossPlatform,
    LeaveOnePatientOut,
    LeaveOneSectionOut,
    Protocol,
    SectionInfo,
    Split,
    make_protocol,
    make_splits,
    platform_of,
)

__all__ = [
    "Acquisition",
    "COMPARISONS",
    "CrossPlatform",
    "LeaveOnePatientOut",
    "LeaveOneSectionOut",
    "MODELS",
    "PROTOCOLS",
    "Protocol",
    "RECORD_COLUMNS",
    "SectionInfo",
    "Split",
    "ValidationResult",
    "add_cli",
    "bootstrap_mean_r_difference",
    "lees_l",
    "load_result",
    "make_protocol",
    "make_splits",
    "map_ssim",
    "paired_test",
    "platform_of",
    "readme_table",
    "single_member",
    "spatial_weights",
    "spot_grid",
    "validate",
    "write_report",
]


def add_cli(sub) -> None:
    """Register ``stimage-nb validate`` (see :mod:`._cli`)."""
    from ._cli import add_cli as _add

    _add(sub)
