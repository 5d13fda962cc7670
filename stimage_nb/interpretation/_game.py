"""One spot's tile as a cooperative game whose players are its nuclei and the tissue between them.

The model sees a square of ``tile_um`` micrometres around a spot, read from one pyramid level and
resampled to ``out_px`` pixels (:meth:`stimage_nb.io.image.SlideImage.tile_box`). A :class:`TileGame`
holds that square at the read level, before resampling, and a map of which player owns each pixel:
nucleus ``k`` (its outline grown by ``grow_um``, so the blurred rim of a nucleus goes with it) or the
**background** (everything else: cytoplasm, stroma, glass), the last player.

A coalition of players is shown to the model by painting every absent player's pixels with a
neutral fill — by default the median colour of the tile's non-nuclear *tissue* (summed optical
density above :attr:`~stimage_nb.interpretation.SegmentationParams.tissue_od`), so a removed nucleus
looks like the cytoplasm or stroma around it — then resampling to ``out_px`` exactly as the tiles
of prediction are made, and predicting with the ensemble, including its Macenko stain step with the
**section's** stain estimate (fixed, so masking never changes the normalisation).

:class:`NucleusMasker` is that composition as a ``shap`` masker (a callable with ``shape`` and a
``clustering``, as :class:`shap.maskers.Image`): the nuclei are grouped by a Ward hierarchy of their
centroids and joined with the background at the root, so ``shap.PartitionExplainer`` computes Owen
values over spatially coherent groups of nuclei. :class:`TilePredictor` is the model side: uint8
tiles in, the predictive mean (or its log) of the chosen genes out, batched on the ensemble's device.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import shap
import torch

from ..errors import StimageInputError

log = logging.getLogger(__name__)

BACKGROUND = "background"
OUTPUTS = ("log_mean", "mean", "log_share")
FILLS = ("background", "white", "mean")


# ====================================================================== the game of one tile
@dataclass
class TileGame:
    """Players and pixels of one spot's tile (see the module docstring).

    Attributes
    ----------
    spot
        The spot (observation) id.
    level, x, y, n, downsample
        The read box: an ``n`` x ``n`` square at ``(x, y)`` of pyramid ``level`` (factor ``downsample``
        to level 0), resampled to ``out_px`` for the model.
    region
        (n, n, 3) uint8: the box as read.
    owner
        (n, n) int32: the player owning each pixel, ``0..N-1`` the nuclei, ``N`` the background.
    nucleus_ids
        The ``N`` nuclei, in player order (ids of the :class:`~stimage_nb.interpretation.Nuclei`).
    nucleus_rows
        Their positions in that :class:`Nuclei` object.
    fill
        (3,) uint8 neutral colour of absent players.
    out_px
        Side of the model's input.
    """

    spot: str
    level: int
    x: int
    y: int
    n: int
    downsample: float
    region: np.ndarray = field(repr=False)
    owner: np.ndarray = field(repr=False)
    nucleus_ids: list
    nucleus_rows: np.ndarray = field(repr=False)
    fill: np.ndarray
    out_px: int

    @property
    def n_nuclei(self) -> int:
        return len(self.nucleus_ids)

    @property
    def n_players(self) -> int:
        return self.n_nuclei + 1

    @property
    def player_names(self) -> list[str]:
        return [*map(str, self.nucleus_ids), BACKGROUND]

    @property
    def box_level0(self) -> tuple[float, float, float, float]:
        d = self.downsample
        return self.x * d, self.y * d, (self.x + self.n) * d, (self.y + self.n) * d

    def player_pixels(self) -> np.ndarray:
        """Pixels (at the read level) owned by each player, (P,)."""
        return np.bincount(self.owner.ravel(), minlength=self.n_players)

    def compose(self, present: np.ndarray) -> np.ndarray:
        """Model inputs for coalitions: ``present`` (B, P) bool -> (B, out_px, out_px, 3) uint8."""
        from ..io.image import SlideImage

        z = np.asarray(present, dtype=bool).reshape(-1, self.n_players)
        out = np.empty((len(z), self.out_px, self.out_px, 3), np.uint8)
        for b, row in enumerate(z):
            if row.all():
                img = self.region
            else:
                keep = row[self.owner]
                img = np.where(keep[..., None], self.region, self.fill[None, None, :]).astype(np.uint8)
            out[b] = SlideImage.resample(img, self.out_px)
        return out

    def tile(self) -> np.ndarray:
        """The unmasked model input (1, out_px, out_px, 3): what prediction sees for this spot."""
        return self.compose(np.ones((1, self.n_players), bool))

    def player_weights(self) -> np.ndarray:
        """(P, out_px, out_px) share of each model-input pixel owned by each player (area average)."""
        from PIL import Image

        w = np.zeros((self.n_players, self.out_px, self.out_px), np.float32)
        for p in range(self.n_players):
            m = (self.owner == p).astype(np.float32)
            if m.any():
                w[p] = np.asarray(Image.fromarray(m, mode="F").resize((self.out_px, self.out_px),
                                                                      Image.Resampling.BOX if self.n >= self.out_px
                                                                      else Image.Resampling.BILINEAR))
        s = w.sum(0, keepdims=True)
        return w / np.where(s > 0, s, 1.0)

    def clustering(self, nuclei_xy: np.ndarray) -> np.ndarray:
        """The partition tree: Ward clusters of the nuclei's centroids, joined with the background at the root.

        A scipy linkage matrix over the ``P`` players (leaves ``0..P-1``; cluster ``P + i`` is row ``i``).
        """
        return player_hierarchy(nuclei_xy)


def player_hierarchy(nuclei_xy: np.ndarray) -> np.ndarray:
    """Linkage (P-1, 4) over N nuclei (Ward on ``nuclei_xy``) plus the background as player N (module docstring)."""
    from scipy.cluster.hierarchy import linkage

    xy = np.asarray(nuclei_xy, dtype=np.float64).reshape(-1, 2)
    N = len(xy)
    P = N + 1
    if N == 0:
        return np.zeros((0, 4))
    if N == 1:
        return np.array([[0.0, 1.0, 1.0, 2.0]])
    L = linkage(xy, method="ward")
    L = L.copy()
    for c in (0, 1):  # cluster ids N.. become P.. (one more leaf: the background)
        L[:, c] = np.where(L[:, c] >= N, L[:, c] + 1, L[:, c])
    root = P + len(L) - 1
    top = float(L[:, 2].max()) * 1.5 + 1.0
    return np.vstack([L, [[float(root), float(N), top, float(P)]]])


def neutral_fill(region: np.ndarray, background: np.ndarray, fill="background", tissue_od: float = 0.15) -> np.ndarray:
    """The colour absent players are painted with (uint8 RGB).

    ``"background"``: median colour of the non-nuclear tissue pixels (all non-nuclear pixels when
    fewer than 100 are tissue); ``"mean"``: the tile's mean colour; ``"white"``: glass (255); or an
    explicit (r, g, b).
    """
    if isinstance(fill, str):
        if fill == "white":
            return np.array([255, 255, 255], np.uint8)
        if fill == "mean":
            return np.round(region.reshape(-1, 3).mean(0)).astype(np.uint8)
        if fill != "background":
            raise StimageInputError(f"fill must be one of {list(FILLS)} or an (r, g, b) colour, not {fill!r}")
        px = region[background]
        if len(px):
            od = -np.log10(np.maximum(px.astype(np.float32), 1.0) / 255.0).sum(1)
            tissue = px[od > tissue_od]
            if len(tissue) >= 100:
                px = tissue
            return np.round(np.median(px, axis=0)).astype(np.uint8)
        return np.round(np.median(region.reshape(-1, 3), axis=0)).astype(np.uint8)
    rgb = np.asarray(fill, dtype=np.float64).ravel()
    if rgb.shape != (3,) or (rgb < 0).any() or (rgb > 255).any():
        raise StimageInputError(f"fill colour must be three values in 0-255, not {fill!r}")
    return np.round(rgb).astype(np.uint8)


def build_game(image, spot: str, cx: float, cy: float, *, tile_um: float, out_px: int, nuclei, grow_um: float = 0.7,
               fill="background", min_pixels: int = 4, tissue_od: float = 0.15) -> TileGame:
    """The :class:`TileGame` of the spot centred at level-0 ``(cx, cy)`` (module docstring).

    ``nuclei`` (:class:`~stimage_nb.interpretation.Nuclei`) are rasterised onto the read box; a
    nucleus with fewer than ``min_pixels`` pixels inside it belongs to the background.
    """
    from skimage.segmentation import expand_labels

    level, x, y, n = image.tile_box(cx, cy, tile_um, out_px)
    ds = float(image.downsamples[level])
    region = image.read_region(x, y, n, n, level=level)
    lab = nuclei.rasterise(x, y, n, n, downsample=ds)
    um_level = float(image.um_per_px) * ds
    grow = int(round(grow_um / um_level))
    if grow > 0:
        lab = expand_labels(lab, distance=grow)
    counts = np.bincount(lab.ravel(), minlength=len(nuclei) + 1)
    rows = np.flatnonzero(counts[1:] >= min_pixels)
    lut = np.full(len(nuclei) + 1, len(rows), np.int32)  # everything else -> background (last player)
    lut[rows + 1] = np.arange(len(rows), dtype=np.int32)
    owner = lut[lab]
    f = neutral_fill(region, owner == len(rows), fill, tissue_od)
    ids = [nuclei.ids[i] for i in rows]
    return TileGame(str(spot), int(level), int(x), int(y), int(n), ds, region, owner, ids, rows, f, int(out_px))


# ====================================================================== shap's side: masker
class NucleusMasker(shap.maskers.Masker):
    """A ``shap`` masker whose features are a tile's players (nuclei + background).

    ``masker(mask, region)`` paints absent players with the neutral fill and returns the model input
    ``(1, out_px, out_px, 3)``; ``shape = (1, P)``; ``clustering`` is the partition tree of
    :func:`player_hierarchy` (for ``shap.PartitionExplainer``; the permutation explainer uses it to
    order its permutations).
    """

    def __init__(self, game: TileGame, nuclei_xy: np.ndarray):
        self.game = game
        self.shape = (1, game.n_players)
        self.clustering = player_hierarchy(nuclei_xy)
        self.immutable_outputs = True
        self.fixed_background = True

    def __call__(self, mask, x):  # noqa: ARG002 - x is the region the game already holds
        mask = self._standardize_mask(mask, x)
        return self.game.compose(np.asarray(mask, dtype=bool)[None, :])

    def mask_shapes(self, *args):  # noqa: ARG002
        return [(self.game.n_players,)]


# ====================================================================== the model's side
class TilePredictor:
    """The ensemble as a function of uint8 tiles: the predictive mean (or its log) of some genes.

    Parameters
    ----------
    ensemble
        A loaded :class:`~stimage_nb.ensemble.Ensemble` (on the device it should run on: batches go
        to the GPU when it is there, through :mod:`stimage_nb.devices`).
    genes
        Genes to explain (outputs, in this order).
    stain_source
        The section's stain estimate (:meth:`Ensemble.stain_source`), used for every masked tile.
    output
        ``"log_mean"``: log of the ensemble's predictive mean (expected counts); ``"mean"``: the mean;
        ``"log_share"``: log of the gene's share of the spot's predicted counts over the model's panel
        (``log(mean_g / sum_genes mean)``, depth-normalised: what the default's composition predicts, without
        the spot's library size that every gene shares). An ensemble of point predictors (regression heads, e.g. an imported Path2Space model) predicts
        no expected counts, so only ``"mean"`` (its averaged point values) is explained.
    batch_size
        Tiles per forward pass (halved automatically if the GPU runs out of memory).

    Raises
    ------
    StimageInputError
        An unknown output, ``"log_mean"`` of a point predictor, genes the model does not predict.
    """

    def __init__(self, ensemble, genes, stain_source, *, output: str = "log_mean", batch_size: int = 64):
        if output not in OUTPUTS:
            raise StimageInputError(f"output must be one of {list(OUTPUTS)}, not {output!r}")
        if output in ("log_mean", "log_share") and not ensemble.has_distribution:
            raise StimageInputError("this model predicts point values (regression heads, e.g. an imported Path2Space "
                                    "model), not expected counts, so their log is not defined; explain its values "
                                    "with --output mean (output=\"mean\").")
        missing = [g for g in genes if g not in ensemble.genes]
        if missing:
            raise StimageInputError(f"genes {missing[:10]} are not predicted by this model "
                                    f"({len(ensemble.genes)} genes, e.g. {ensemble.genes[:5]}).")
        self.ensemble, self.genes = ensemble, list(genes)
        self.idx = np.array([ensemble.genes.index(g) for g in self.genes])
        self.stain_source, self.output, self.batch_size = stain_source, output, int(batch_size)
        self.n_evals = 0

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """Everything the ensemble predicts for the tiles (see :meth:`Ensemble.predict_tiles`)."""
        return self.ensemble.predict_tiles(np.ascontiguousarray(tiles), batch_size=self.batch_size,
                                           stain_source=self.stain_source)

    def transform(self, mean: np.ndarray) -> np.ndarray:
        m = np.asarray(mean, dtype=np.float64)
        return np.log(np.maximum(m, 1e-12)) if self.output == "log_mean" else m

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.asarray(tiles)
        if len(tiles) == 0:
            return np.zeros((0, len(self.genes)))
        self.n_evals += len(tiles)
        mean = self.predict(tiles)["mean"]
        if self.output == "log_share":
            m = np.asarray(mean, dtype=np.float64)
            return np.log(np.maximum(m[:, self.idx], 1e-300)) - np.log(np.maximum(m.sum(1, keepdims=True), 1e-300))
        return self.transform(mean[:, self.idx])


def is_differentiable(ensemble) -> bool:
    """Whether every member maps pixels to genes through differentiable operations (timm backbones,
    fine-tuned or frozen); the offline default's k-means (rounded optical density) and handcrafted
    (numpy) features are not."""
    from ..models.features import FeatureStack

    for m in ensemble.members:
        if isinstance(m.backbone, FeatureStack) and any(c != "timm" for c in m.backbone.components):
            return False
    return True


class EnsembleMeanModule(torch.nn.Module):
    """The ensemble's predictive mean as a differentiable module: float tiles in [0, 1] (n, 3, h, w),
    already background-handled and stain-normalised, -> log of the mean over members of ``exp(log_mu)``
    (or the mean) of some genes (n, G), averaged in the ensemble's order (``meta["mean_groups"]``: within
    each group, then across groups, as :meth:`Ensemble.predict_tiles`). Members with a regression head
    contribute their point values (``output="mean"`` only). Float32 throughout (gradients), on the
    ensemble's device."""

    def __init__(self, ensemble, gene_idx, output: str = "log_mean"):
        super().__init__()
        self.members = torch.nn.ModuleList(ensemble.members)
        self.register_buffer("idx", torch.as_tensor(np.asarray(gene_idx), dtype=torch.long))
        self.output = output
        groups = ensemble.meta.get("mean_groups")
        self.groups = [list(map(int, g)) for g in groups] if groups else [list(range(len(ensemble.members)))]
        if output == "log_mean" and not ensemble.has_distribution:
            raise StimageInputError("the log of a point predictor's values is not defined; use output=\"mean\".")

    def forward(self, x01):
        outs = []
        for m in self.members:
            o = m(x01)
            outs.append(o.mean.float()[:, self.idx] if o.mean is not None else o.log_mu.float()[:, self.idx])
        if self.output == "log_mean":  # log of a mean of exp(log_mu), stably
            return torch.logsumexp(torch.stack([
                torch.logsumexp(torch.stack([outs[j] for j in g]), 0) - np.log(len(g)) for g in self.groups]), 0) \
                - np.log(len(self.groups))
        vals = [torch.exp(o) if m.has_distribution else o for o, m in zip(outs, self.members)]
        return torch.stack([torch.stack([vals[j] for j in g]).mean(0) for g in self.groups]).mean(0)


def randomised_heads(ensemble, seed: int = 0):
    """A copy of the ensemble whose gene and cell-type heads are re-initialised (Adebayo et al. 2018's
    model-randomisation check); backbones are shared with the original (not copied), the global
    torch RNG is left as it was."""
    from ..ensemble import Ensemble

    members = []
    dev = torch.device(ensemble.device)
    gpus = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(int(seed))
        for m in ensemble.members:
            m2 = copy.deepcopy(m, memo={id(m.backbone): m.backbone})
            if not m2.has_distribution:  # a regression head (e.g. imported Path2Space)
                for layer in m2.mlp.modules():
                    if isinstance(layer, torch.nn.Linear):
                        layer.reset_parameters()
            else:
                m2.nb.reset_parameters()
            if m2.celltype is not None:
                m2.celltype.reset_parameters()
            members.append(m2.eval())
    meta = {k: v for k, v in ensemble.meta.items() if not k.startswith("_")}
    meta["run_id"] = f"{ensemble.run_id}-randomised-heads"
    out = Ensemble(members, genes=ensemble.genes, celltypes=ensemble.celltypes, tile_um=ensemble.tile_um,
                   out_px=ensemble.out_px, stain=ensemble.stain, meta=meta, domain=None,
                   background=ensemble.background,
                   reference_depth=ensemble.reference_depth)
    out.device = ensemble.device
    return out
