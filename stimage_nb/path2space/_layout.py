"""The published Path2Space weights directory (path2space-companion ``ge_model/weights``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import StimageInputError

CHECKPOINT = "model_trained.pth"
_FOLD_DIR = re.compile(r"^result_(\d+)_(\d+)_0$")


@dataclass(frozen=True)
class Path2SpaceLayout:
    """Files of a Path2Space weights directory.

    Attributes
    ----------
    root
        The directory holding ``ctranspath.pth``, ``mlp_ensemble/`` and the gene list.
    folds
        ``(ik, il)`` of every ``mlp_ensemble/result_{ik}_{il}_0/model_trained.pth``, sorted; a complete
        grid (every outer fold ``ik`` has the same inner folds ``il``; the published model: 22 x 7).
    """

    root: Path
    ctranspath: Path
    ensemble_dir: Path
    genes_file: Path
    folds: tuple[tuple[int, int], ...]

    @property
    def outer(self) -> list[int]:
        return sorted({ik for ik, _ in self.folds})

    @property
    def inner(self) -> list[int]:
        return sorted({il for _, il in self.folds})

    def checkpoint(self, ik: int, il: int) -> Path:
        return self.ensemble_dir / f"result_{ik}_{il}_0" / CHECKPOINT


def read_genes(path: Path) -> list[str]:
    """The output genes, in the MLPs' order: ``genes.txt`` (one per line) or a CSV (``gene`` column, else the
    first). A pickled gene table is refused (unpickling can run code): convert it to ``genes.txt``."""
    if path.suffix in (".pkl", ".pickle"):
        raise StimageInputError(f"{path}: a pickled gene list is not read (unpickling can execute code); write it "
                                "once as genes.txt, one symbol per line.")
    if path.suffix == ".csv":
        import pandas as pd

        df = pd.read_csv(path)
        col = "gene" if "gene" in df.columns else df.columns[0]
        genes = df[col].astype(str).tolist()
    else:
        genes = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not genes:
        raise StimageInputError(f"{path}: no genes.")
    dup = sorted({g for g in genes if genes.count(g) > 1})
    if dup:
        raise StimageInputError(f"{path}: duplicated genes {dup[:5]}.")
    return genes


def read_layout(path: str | Path) -> Path2SpaceLayout:
    """The layout of a Path2Space weights directory (``weights/`` or the ``ge_model/`` folder above it).

    Raises :class:`~stimage_nb.errors.StimageInputError` naming what is missing.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise StimageInputError(f"{p}: not a directory. Give the Path2Space weights directory (with ctranspath.pth, "
                                "mlp_ensemble/ and genes.txt), as unpacked from the Zenodo archive.")
    root = p / "weights" if (p / "weights" / "mlp_ensemble").is_dir() and not (p / "mlp_ensemble").is_dir() else p
    ct = root / "ctranspath.pth"
    ens = root / "mlp_ensemble"
    genes = next((root / n for n in ("genes.txt", "genes.csv", "genes.pkl") if (root / n).is_file()), None)
    missing = [n for n, ok in (("ctranspath.pth", ct.is_file()), ("mlp_ensemble/", ens.is_dir()),
                                ("genes.txt", genes is not None)) if not ok]
    if missing:
        raise StimageInputError(f"{root}: not a Path2Space weights directory: missing {missing} (expected "
                                "ctranspath.pth, mlp_ensemble/result_{ik}_{il}_0/model_trained.pth, genes.txt).")
    folds = []
    for d in ens.iterdir():
        m = _FOLD_DIR.match(d.name)
        if m and d.is_dir():
            if not (d / CHECKPOINT).is_file():
                raise StimageInputError(f"{d}: no {CHECKPOINT}.")
            folds.append((int(m.group(1)), int(m.group(2))))
    if not folds:
        raise StimageInputError(f"{ens}: no result_{{ik}}_{{il}}_0/{CHECKPOINT} folders.")
    folds.sort()
    iks, ils = sorted({f[0] for f in folds}), sorted({f[1] for f in folds})
    grid = {(a, b) for a in iks for b in ils}
    if grid != set(folds):
        gap = sorted(grid - set(folds))
        raise StimageInputError(f"{ens}: the fold grid is incomplete ({len(iks)} outer x {len(ils)} inner folds expected, "
                                f"missing {['result_%d_%d_0' % g for g in gap[:5]]}); the published model has 22 x 7.")
    return Path2SpaceLayout(root=root, ctranspath=ct, ensemble_dir=ens, genes_file=genes, folds=tuple(folds))
