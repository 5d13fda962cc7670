"""The typed result of :func:`~stimage_nb.interpretation.explain`: attributions of nuclei to genes at spots.

On disk (:meth:`Attributions.write`, :func:`read_attributions`), one folder per section::

    attributions.csv   one row per (spot, player, gene): the attribution ``value``
    spots.csv          one row per explained spot: centre, read box, prediction and base value per gene,
                       the predicted cell types
    nuclei.csv         the players' nuclei: morphology and outline (``polygon``: JSON [[x, y], ...],
                       level-0 px)
    attributions.json  what was explained, how (method, budget, seed, fill, output) and by which model
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import write_csv
from ..ensemble import write_json
from ..errors import StimageInputError
from ._game import BACKGROUND
from ._nuclei import MORPHOLOGY, Nuclei

FORMAT = "stimage_nb.attributions"
FORMAT_VERSION = 1
UNITS = {"log_mean": "log of the predictive mean (log expected counts); Shapley values sum to "
                     "log(prediction) - log(base value)",
         "mean": "predictive mean (expected counts); Shapley values sum to prediction - base value",
         "log_share": "log of the gene's share of the spot's predicted counts over the panel (depth-normalised); "
                      "Shapley values sum to log(share) - log(base share)"}


def value_column(gene: str) -> str:
    """The measurement name of a gene's attribution (QuPath, tables): ``"SHAP <gene>"``."""
    return f"SHAP {gene}"


@dataclass(frozen=True)
class Attributions:
    """Attributions of a section's explained spots to their nuclei and background.

    Attributes
    ----------
    section
        Section name.
    genes
        Explained genes.
    method
        ``"permutation"`` (``shap.PermutationExplainer``), ``"partition"`` (``shap.PartitionExplainer``),
        ``"lime"`` (LIME's weighted linear surrogate over the same
        players) or ``"gradient"`` (``shap.GradientExplainer`` pixel attributions summed per player).
    output
        ``"log_mean"``, ``"mean"`` or ``"log_share"``: what was explained (:data:`UNITS`).
    values
        Long table: ``spot``, ``player`` (nucleus id or ``"background"``), ``gene``, ``value``.
    spots
        One row per spot (index: spot id): ``x``, ``y`` (level-0 px), ``level``, ``box_x``, ``box_y``,
        ``box_n``, ``downsample`` (the read box), ``n_nuclei``, ``fill`` (hex), per gene
        ``prediction:<gene>`` (the output on the whole tile) and ``base:<gene>`` (on the tile with every
        player masked), ``celltype`` (argmax of the predicted proportions) and ``P(<type>)`` columns.
    nuclei
        The nuclei touching the tile of some explained spot (the players, and slivers too small to be
        one, kept so that every game can be rebuilt exactly).
    meta
        Provenance: model run id and directory, tile µm/px, budget, seed, fill, timings, versions.
    """

    section: str
    genes: tuple
    method: str
    output: str
    values: pd.DataFrame = field(repr=False)
    spots: pd.DataFrame = field(repr=False)
    nuclei: Nuclei = field(repr=False)
    meta: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return (f"Attributions({self.section}: {len(self.spots)} spots x {len(self.genes)} genes, {len(self.nuclei)} "
                f"nuclei, {self.method}, {self.output})")

    # ------------------------------------------------------------------ views
    def to_frame(self) -> pd.DataFrame:
        """The long table joined with each nucleus's morphology (NaN for the background)."""
        m = self.nuclei.table[list(MORPHOLOGY)]
        out = self.values.join(m, on="player")
        return out.reset_index(drop=True)

    def matrix(self, spot: str) -> tuple[list[str], np.ndarray]:
        """(player names, values (P, G)) of one spot, nuclei first, background last."""
        v = self.values[self.values["spot"] == str(spot)]
        if not len(v):
            raise KeyError(f"spot {spot!r} was not explained (explained: {list(self.spots.index[:5])}...)")
        w = v.pivot(index="player", columns="gene", values="value")
        players = [p for p in dict.fromkeys(v["player"]) if p != BACKGROUND] + [BACKGROUND]
        return players, w.reindex(index=players, columns=list(self.genes)).to_numpy(dtype=np.float64)

    def explanation(self, spot: str):
        """The ``shap.Explanation`` of one spot: values (P, G), base values (G,), data = each player's area (µm²)."""
        import shap

        players, vals = self.matrix(spot)
        row = self.spots.loc[str(spot)]
        base = np.array([row[f"base:{g}"] for g in self.genes], dtype=np.float64)
        area = self.nuclei.table["area_um2"].reindex(players[:-1]).to_numpy(dtype=np.float64)
        bg = float(row.get("background_um2", np.nan))
        return shap.Explanation(values=vals, base_values=base, data=np.append(area, bg), feature_names=players,
                                output_names=list(self.genes))

    def per_nucleus(self) -> pd.DataFrame:
        """One row per nucleus: its spot and ``SHAP <gene>`` columns.

        A nucleus in the tiles of several explained spots (overlapping tiles, e.g. Visium) is given
        the values toward the spot whose centre is nearest.
        """
        v = self.values[self.values["player"] != BACKGROUND]
        if not len(v):
            return pd.DataFrame(columns=["spot", *map(value_column, self.genes)])
        w = v.pivot_table(index=["player", "spot"], columns="gene", values="value", aggfunc="first").reset_index()
        xy = self.nuclei.table[["x", "y"]].reindex(w["player"]).to_numpy()
        sxy = self.spots[["x", "y"]].reindex(w["spot"]).to_numpy()
        w["_d"] = np.hypot(*(xy - sxy).T)
        w = w.sort_values(["player", "_d"]).drop_duplicates("player", keep="first").set_index("player")
        out = w[["spot"] + list(self.genes)].rename(columns={g: value_column(g) for g in self.genes})
        out.index.name = "nucleus"
        return out.reindex([i for i in self.nuclei.ids if i in out.index])

    def to_json(self) -> dict:
        """A summary: what was explained, how, and the additivity check (see :func:`additivity_error`)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "section": self.section, "genes": list(self.genes),
                "method": self.method, "output": self.output, "units": UNITS[self.output],
                "n_spots": int(len(self.spots)), "n_nuclei": int(len(self.nuclei)),
                "median_nuclei_per_spot": float(self.spots["n_nuclei"].median()) if len(self.spots) else 0.0,
                "max_additivity_error": additivity_error(self), **{k: v for k, v in self.meta.items()}}

    # ------------------------------------------------------------------ persistence
    def write(self, directory: str | os.PathLike) -> Path:
        """Write the folder described in the module docstring (each file atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _write_csv(self.values, d / "attributions.csv", index=False)
        _write_csv(self.spots, d / "spots.csv", index=True)
        nt = self.nuclei.table.copy()
        nt["polygon"] = [json.dumps(np.round(p, 2).tolist(), separators=(",", ":")) for p in self.nuclei.polygons]
        _write_csv(nt, d / "nuclei.csv", index=True)
        meta = {**self.to_json(), "nuclei": {"source": self.nuclei.source, "um_per_px": self.nuclei.um_per_px,
                                             "params": self.nuclei.params}}
        write_json(meta, d / "attributions.json")
        return d




def _write_csv(df: pd.DataFrame, path: Path, index: bool) -> None:
    write_csv(df, path, index=index)


def additivity_error(attr: Attributions) -> float | None:
    """Largest |sum of a spot's attributions - (prediction - base value)| over spots and genes.

    Shapley (partition, permutation) and expected-gradient values are additive (0 up to float error
    or the gradient estimate's noise); LIME's surrogate weights are not (``None``).
    """
    if attr.method == "lime" or not len(attr.values):
        return None
    s = attr.values.groupby(["spot", "gene"])["value"].sum()
    err = 0.0
    for (spot, gene), tot in s.items():
        row = attr.spots.loc[spot]
        err = max(err, abs(float(tot) - (float(row[f"prediction:{gene}"]) - float(row[f"base:{gene}"]))))
    return float(err)


def read_attributions(directory: str | os.PathLike) -> Attributions:
    """Read a folder written by :meth:`Attributions.write`.

    Raises
    ------
    StimageInputError
        A folder without ``attributions.json`` or written by a newer version.
    """
    d = Path(directory)
    p = d / "attributions.json"
    if not p.is_file():
        raise StimageInputError(f"{d}: no attributions.json; not a folder written by `stimage-nb interpret`.")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise StimageInputError(f"{p}: not a stimage_nb attributions record this version reads "
                                f"(format {meta.get('format')!r} v{meta.get('format_version')}).")
    values = pd.read_csv(d / "attributions.csv", dtype={"spot": str, "player": str, "gene": str})
    spots = pd.read_csv(d / "spots.csv", index_col=0)
    spots.index = spots.index.astype(str)
    nt = pd.read_csv(d / "nuclei.csv", index_col=0)
    nt.index = nt.index.astype(str)
    polys = tuple(np.asarray(json.loads(s), dtype=np.float64).reshape(-1, 2) for s in nt.pop("polygon"))
    nm = meta.pop("nuclei", {})
    nuclei = Nuclei(nt, polys, float(nm.get("um_per_px", meta.get("um_per_px", 1.0))), nm.get("source", "watershed"),
                    nm.get("params", {}))
    keep = {k: v for k, v in meta.items() if k not in ("format", "format_version", "section", "genes", "method",
                                                      "output", "units", "n_spots", "n_nuclei",
                                                      "median_nuclei_per_spot", "max_additivity_error")}
    return Attributions(meta["section"], tuple(meta["genes"]), meta["method"], meta["output"], values, spots, nuclei,
                        keep)
