"""Explain the predictive mean of chosen genes at chosen spots: which nuclei (and how much background).

:func:`explain` runs, per spot, one of four explainers over the same players (the spot's nuclei and
the background between them, :mod:`._game`):

- ``"permutation"`` (default): ``shap.PermutationExplainer`` with :class:`NucleusMasker` — antithetic
  permutations (``max_evals // (2 P + 1)`` of them, at least one) that respect the Ward hierarchy of the
  nuclei's positions (joined with the background at the root), a Monte-Carlo estimate of their Owen
  values; additive: a spot's values sum to ``f(tile) - f(everything masked)`` exactly.
- ``"partition"``: ``shap.PartitionExplainer`` with the same masker — the Owen values' recursion over the
  hierarchy, cut off at the budget (unexpanded groups share their credit equally); additive as well.
  On ~100 nuclei per tile it agrees far less with a high-budget reference than the permutation
  explainer at the same budget (``benchmarks/README.md``), hence not the default.
- ``"lime"``: LIME (Ribeiro et al. 2016; the STimage paper's method): random coalitions (the first is
  the whole tile), weighted by LIME's exponential kernel (width 0.25) of their cosine distance to the
  whole tile, and ``lime.lime_base.LimeBase``'s weighted ridge surrogate; its coefficients are the
  effects of each player's presence (not additive).
- ``"gradient"`` (timm backbones only): ``shap.GradientExplainer`` (expected gradients) of the
  ensemble's mean on the stain-normalised tile, integrated from the tile with every player masked;
  pixel values are summed over each player's pixels (additive up to the sampling noise).

The explained quantity is the ensemble's **predictive mean** ``E[y] = mean_m mu_m`` of each gene (or
its log, the default ``output="log_mean"``), never a raw logit. The tiles, the Macenko stain step
(with the section's stain estimate) and the batching are those of prediction, so ``f(whole tile)``
equals what :func:`stimage_nb.predict.predict_section` writes for the spot.

:func:`pixel_map` gives a pixel-level map of one tile: ``shap.GradientExplainer`` for differentiable
models, else ``shap.PartitionExplainer`` with ``shap.maskers.Image`` over the pixels (the same
neutral fill as the nuclei).
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import StimageInputError
from ._game import (
    EnsembleMeanModule,
    NucleusMasker,
    TileGame,
    TilePredictor,
    build_game,
    is_differentiable,
)
from ._nuclei import Nuclei, SegmentationParams, as_nuclei, segment_slide
from ._result import Attributions

log = logging.getLogger(__name__)

METHODS = ("partition", "permutation", "lime", "gradient")
#: Default evaluation budget per spot (model evaluations; for ``"gradient"``: gradient samples).
#: ``permutation``: 1000, the smallest budget whose attributions agree between two seeds with a Pearson
#: correlation above 0.85 on ~100 nuclei per 150 µm tile (0.87; 500: 0.75; 2000: 0.95), measured by
#: ``benchmarks/bench_interpret.py`` (``benchmarks/README.md``).
DEFAULT_MAX_EVALS = {"partition": 500, "permutation": 1000, "lime": 500, "gradient": 64}
DEFAULT_METHOD = "permutation"
LIME_KERNEL_WIDTH = 0.25


# ====================================================================== one tile
_NUMBA_SEED = []


def seed_explainers(seed: int) -> None:
    """Seed numpy's global generator and numba's (shap shuffles permutations inside numba-compiled code,
    whose generator ``np.random.seed`` in Python does not reach), so a run is reproducible."""
    s = int(seed) % (2 ** 32)
    np.random.seed(s)
    if not _NUMBA_SEED:
        from numba import njit

        @njit(cache=False)
        def _seed(v):  # pragma: no cover - compiled
            np.random.seed(v)

        _NUMBA_SEED.append(_seed)
    _NUMBA_SEED[0](s)


def _reshape(values, n_players: int, n_genes: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v.reshape(n_players, n_genes)


def _shapley(game: TileGame, predictor: TilePredictor, xy_box: np.ndarray, method: str, max_evals: int, seed: int,
             batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    import shap

    masker = NucleusMasker(game, xy_box)
    G = len(predictor.genes)
    seed_explainers(seed)  # partition breaks ties with np.random; permutation shuffles inside numba
    if method == "partition":
        ex = shap.PartitionExplainer(predictor, masker, output_names=predictor.genes)
        e = ex(game.region[None], max_evals=int(max_evals), batch_size=int(batch_size), silent=True)
    else:
        need = 2 * game.n_players + 1
        if max_evals < need:
            log.info("spot %s: %d players need at least %d evaluations for one permutation (budget %d): using %d",
                     game.spot, game.n_players, need, max_evals, need)
        ex = shap.PermutationExplainer(predictor, masker, output_names=predictor.genes, seed=int(seed))
        e = ex(game.region[None], max_evals=int(max(max_evals, need)), batch_size=int(batch_size), silent=True)
    return _reshape(e.values, game.n_players, G), np.asarray(e.base_values, dtype=np.float64).reshape(-1)[:G]


def _lime(game: TileGame, predictor: TilePredictor, max_evals: int, seed: int, batch_size: int
          ) -> tuple[np.ndarray, np.ndarray]:
    from lime.lime_base import LimeBase
    from sklearn.metrics import pairwise_distances

    P, G = game.n_players, len(predictor.genes)
    rng = np.random.default_rng(int(seed))
    Z = rng.integers(0, 2, size=(int(max_evals), P))
    Z[0] = 1
    y = np.concatenate([predictor(game.compose(Z[i:i + batch_size].astype(bool)))
                        for i in range(0, len(Z), batch_size)])
    d = pairwise_distances(Z, Z[:1], metric="cosine").ravel()
    base = LimeBase(lambda x: np.sqrt(np.exp(-(x ** 2) / LIME_KERNEL_WIDTH ** 2)), random_state=int(seed))
    vals = np.zeros((P, G))
    for g in range(G):
        _, exp, _, _ = base.explain_instance_with_data(Z, y, d, g, P, feature_selection="none")
        for j, w in exp:
            vals[int(j), g] = float(w)
    f0 = predictor(game.compose(np.zeros((1, P), bool)))[0]
    return vals, np.asarray(f0, dtype=np.float64)


def _stain_map(ensemble, stain_source):
    return ensemble._stain_map(None, stain_source) if stain_source is not None and not isinstance(stain_source, str) \
        else None


def _float_tiles(ensemble, tiles_uint8: np.ndarray, stain_source):
    """uint8 tiles -> background-handled, stain-normalised float (n, 3, h, w) on the ensemble's device (float32,
    contiguous), the input pipeline of :meth:`Ensemble.predict_tiles`."""
    import torch

    from ..augment import to_float

    x = torch.from_numpy(np.ascontiguousarray(tiles_uint8)).to(ensemble.device)
    x = ensemble.prepare_tiles(x)  # the masked black background, as Ensemble.predict_tiles handles it
    M = _stain_map(ensemble, stain_source)
    if M is not None:
        x = ensemble.stain.apply(x, M)
    return to_float(x, channels_last=False)


def require_differentiable(ensemble) -> None:
    """Raise the explanatory :class:`StimageInputError` when the gradient explainer cannot run."""
    if not is_differentiable(ensemble):
        raise StimageInputError(
            "the gradient explainer needs a differentiable model (a timm backbone, fine-tuned or frozen); this "
            "ensemble uses the offline default's k-means/handcrafted features, which are not differentiable. Use "
            "--explainer partition, permutation or lime (model-agnostic) instead.")


def _gradient_pixels(game_tile: np.ndarray, baseline: np.ndarray, ensemble, predictor: TilePredictor, nsamples: int,
                     seed: int, batch_size: int) -> np.ndarray:
    """Expected-gradient pixel attributions (h, w, G) of one tile from one baseline tile."""
    import shap

    require_differentiable(ensemble)
    module = EnsembleMeanModule(ensemble, predictor.idx, predictor.output).to(ensemble.device).eval()
    x = _float_tiles(ensemble, game_tile, predictor.stain_source)
    b = _float_tiles(ensemble, baseline, predictor.stain_source)
    ex = shap.GradientExplainer(module, b, batch_size=int(batch_size))
    phi = ex.shap_values(x, nsamples=int(nsamples), rseed=int(seed))
    phi = np.asarray(phi, dtype=np.float64).reshape(1, 3, x.shape[2], x.shape[3], -1)[0]
    return phi.sum(0)  # (h, w, G)


def explain_tile(game: TileGame, predictor: TilePredictor, nuclei: Nuclei, *, method: str = DEFAULT_METHOD,
                 max_evals: int | None = None, seed: int = 0, batch_size: int = 64):
    """Attributions of one :class:`TileGame`: ``(values (P, G), base (G,), full prediction (G,))``.

    ``values[:N]`` belong to the game's nuclei, ``values[N]`` to the background (module docstring).
    """
    if method not in METHODS:
        raise StimageInputError(f"explainer must be one of {list(METHODS)}, not {method!r}")
    budget = int(max_evals if max_evals is not None else DEFAULT_MAX_EVALS[method])
    if budget < 1:
        raise StimageInputError(f"max_evals must be a positive number of evaluations, not {max_evals}")
    full = predictor(game.tile())[0]
    if method in ("partition", "permutation"):
        d = game.downsample
        xy = nuclei.xy[game.nucleus_rows] / d - [game.x, game.y] if game.n_nuclei else np.zeros((0, 2))
        vals, base = _shapley(game, predictor, xy, method, budget, seed, batch_size)
    elif method == "lime":
        vals, base = _lime(game, predictor, budget, seed, batch_size)
    else:
        zero = game.compose(np.zeros((1, game.n_players), bool))
        pix = _gradient_pixels(game.tile(), zero, predictor.ensemble, predictor, budget, seed, batch_size)
        W = game.player_weights()  # (P, h, w)
        vals = np.einsum("phw,hwg->pg", W.astype(np.float64), pix)
        base = predictor(zero)[0]
    return vals, np.asarray(base, dtype=np.float64), np.asarray(full, dtype=np.float64)


# ====================================================================== a section
def choose_spots(section, *, spots: Sequence[str] | None = None, top_k: int | None = None, genes: Sequence[str] = (),
                 prediction: np.ndarray | None = None) -> list[str]:
    """The spots to explain: the ``spots`` given, or for each gene the ``top_k`` spots with the highest
    predicted mean (``prediction`` (n_obs, G), in obs order), their union in order of appearance."""
    names = [str(s) for s in section.adata.obs_names]
    if spots is not None:
        spots = [str(s) for s in spots]
        bad = [s for s in spots if s not in set(names)]
        if bad:
            raise StimageInputError(f"section {section.name}: spots {bad[:5]} are not among its {len(names)} spots "
                                    f"(e.g. {names[:3]}); check --spots.")
        return list(dict.fromkeys(spots))
    if top_k is None or int(top_k) < 1:
        raise StimageInputError("choose the spots to explain: spots=[ids] or top_k=N (CLI --spots / --top-k).")
    if prediction is None:
        raise ValueError("top_k needs the section's predictions")
    out: list[str] = []
    for g in range(prediction.shape[1]):
        order = np.argsort(-prediction[:, g], kind="stable")[: int(top_k)]
        out += [names[i] for i in order]
    return list(dict.fromkeys(out))


def explain(ensemble, section, *, genes: Sequence[str], spots: Sequence[str] | None = None, top_k: int | None = None,
            method: str = DEFAULT_METHOD, max_evals: int | None = None, output: str = "log_mean",
            nuclei: "Nuclei | str | None" = None, segmentation: SegmentationParams | dict | None = None,
            nuclei_method: str = "watershed", nuclei_model=None, fill="background", grow_um: float = 0.7, batch_size: int = 64, seed: int = 0,
            progress: bool = True) -> Attributions:
    """Attribute the predictive mean of ``genes`` at chosen spots of a section to its nuclei.

    Parameters
    ----------
    ensemble
        A loaded :class:`~stimage_nb.ensemble.Ensemble` (any model the package trains: the offline
        default or a timm backbone; batches run on its device — move it with ``.to("cuda")``).
    section
        The :class:`~stimage_nb.io.section.Section` (image + spots; counts are not needed).
    genes
        Genes to explain (all at once: one set of model evaluations serves every gene).
    spots, top_k
        The spot ids to explain, or the ``top_k`` spots with the highest predicted mean of each gene.
    method
        ``"permutation"`` (default), ``"partition"``, ``"lime"`` or ``"gradient"`` (module docstring).
    max_evals
        Model evaluations per spot (``"gradient"``: gradient samples); default
        :data:`DEFAULT_MAX_EVALS`.
    output
        ``"log_mean"`` (log expected counts; default), ``"mean"`` (expected counts) or ``"log_share"`` (log of
        the gene's share of the spot's predicted panel counts: depth-normalised; not with ``"gradient"``).
        With the default recipe a spot's library size, shared by every gene, dominates ``log_mean``;
        ``log_share`` explains what is specific to the gene.
    nuclei
        :class:`~stimage_nb.interpretation.Nuclei` of the slide (e.g. :func:`segment_slide` or
        :func:`nuclei_from_qupath`), a QuPath GeoJSON path, or ``None`` to segment the spots' tiles
        (``nuclei_method``: the weights-free ``"watershed"`` with ``segmentation`` parameters, or
        ``"stardist"``/``"cellpose"`` with local weights in ``nuclei_model``).
    fill
        Colour of masked players (see :func:`~stimage_nb.interpretation._game.neutral_fill`).
    grow_um
        Each nucleus's mask is its outline grown by this much (its blurred rim goes with it).
    batch_size, seed, progress
        Tiles per forward pass; seed of the explainer's sampling; a progress bar.

    Returns
    -------
    Attributions
        Values per (spot, player, gene), the spots' predictions and base values, the nuclei.

    Raises
    ------
    StimageInputError
        Unknown genes or spots, no spot chosen, an unknown method, ``"gradient"`` on a
        non-differentiable model.
    """
    from ..tiles import extract_tiles

    if method not in METHODS:
        raise StimageInputError(f"explainer must be one of {list(METHODS)}, not {method!r}")
    genes = [str(g) for g in genes]
    if not genes:
        raise StimageInputError("name at least one gene to explain (--genes G1,G2).")
    if method == "gradient":
        require_differentiable(ensemble)
        if output == "log_share":
            raise StimageInputError("the gradient explainer explains log_mean or mean; explain log_share with the "
                                    "permutation, partition or lime explainer.")
    t0 = time.perf_counter()
    sec = section.drop_outside_image()
    image = sec.image
    all_tiles = extract_tiles(image, sec.xy, ensemble.tile_um, ensemble.out_px, cache=True)
    src = ensemble.stain_source(all_tiles)
    predictor = TilePredictor(ensemble, genes, src, output=output, batch_size=batch_size)
    names = [str(s) for s in sec.adata.obs_names]
    pos = {s: i for i, s in enumerate(names)}
    if spots is None:  # the top-k need every spot's prediction
        pred_all = predictor.predict(all_tiles)
        chosen = choose_spots(sec, top_k=top_k, genes=genes, prediction=pred_all["mean"][:, predictor.idx])
    else:
        chosen = choose_spots(sec, spots=spots)
        rows_ = np.array([pos[s] for s in chosen])
        part = predictor.predict(all_tiles[rows_])
        pred_all = {k: np.zeros((len(names),) + v.shape[1:], v.dtype) for k, v in part.items()}
        for k, v in part.items():
            pred_all[k][rows_] = v
    boxes = []
    for s in chosen:
        cx, cy = sec.xy[pos[s]]
        lv, bx, by, n = image.tile_box(cx, cy, ensemble.tile_um, ensemble.out_px)
        d = float(image.downsamples[lv])
        boxes.append((bx * d, by * d, (bx + n) * d, (by + n) * d))
    if nuclei is None:
        nuclei = segment_slide(image, boxes=np.asarray(boxes), params=segmentation, method=nuclei_method,
                               model_path=nuclei_model)
    else:
        nuclei = as_nuclei(nuclei, image=image)
    t_seg = time.perf_counter() - t0
    rows, spot_rows, used = [], [], set()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chosen), desc=f"explain {sec.name}", unit="spot")
    ct_names = list(ensemble.celltypes)
    for s in chosen:
        i = pos[s]
        cx, cy = sec.xy[i]
        game = build_game(image, s, cx, cy, tile_um=ensemble.tile_um, out_px=ensemble.out_px, nuclei=nuclei,
                          grow_um=grow_um, fill=fill)
        vals, base, full = explain_tile(game, predictor, nuclei, method=method, max_evals=max_evals, seed=seed,
                                        batch_size=batch_size)
        players = game.player_names
        for p, name in enumerate(players):
            for g, gene in enumerate(genes):
                rows.append((s, name, gene, float(vals[p, g])))
        # every nucleus touching the tile is kept (players and slivers), so the game can be rebuilt exactly
        used.update(int(r) for r in np.flatnonzero(nuclei.in_box(*game.box_level0)))
        pix = game.player_pixels()
        um2 = (float(image.um_per_px) * game.downsample) ** 2
        rec = {"spot": s, "x": float(cx), "y": float(cy), "level": game.level, "box_x": game.x, "box_y": game.y,
               "box_n": game.n, "downsample": game.downsample, "n_nuclei": game.n_nuclei,
               "background_um2": float(pix[-1] * um2),
               "fill": "#{:02X}{:02X}{:02X}".format(*map(int, game.fill))}
        for g, gene in enumerate(genes):
            rec[f"prediction:{gene}"] = float(full[g])
            rec[f"base:{gene}"] = float(base[g])
        if ct_names:
            P = pred_all["celltype_mean"][i]
            rec["celltype"] = ct_names[int(np.argmax(P))]
            rec.update({f"P({c})": float(p) for c, p in zip(ct_names, P)})
        spot_rows.append(rec)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    values = pd.DataFrame(rows, columns=["spot", "player", "gene", "value"])
    spots_df = pd.DataFrame(spot_rows).set_index("spot")
    keep = sorted(used)
    meta = {"run_id": str(ensemble.run_id), "model_dir": str(getattr(ensemble, "path", "")),
            "tile_um": float(ensemble.tile_um), "out_px": int(ensemble.out_px), "um_per_px": float(image.um_per_px),
            "image": str(sec.image_path) if sec.image_path is not None else str(image.source),
            "max_evals": int(max_evals if max_evals is not None else DEFAULT_MAX_EVALS[method]), "seed": int(seed),
            "fill": fill if isinstance(fill, str) else list(map(int, fill)), "grow_um": float(grow_um),
            "stain_normalization": "macenko (section estimate, fixed)" if ensemble.stain is not None else "none",
            "device": str(ensemble.device), "n_model_evaluations": int(predictor.n_evals),
            "seconds": {"nuclei": round(t_seg, 2), "total": round(time.perf_counter() - t0, 2)},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return Attributions(sec.name, tuple(genes), method, output, values, spots_df, nuclei.subset(np.asarray(keep, int)),
                        meta)


def spot_game(ensemble, section, spot: str, nuclei: Nuclei, *, fill="background", grow_um: float = 0.7) -> TileGame:
    """The :class:`TileGame` of one spot of a section (as :func:`explain` builds it)."""
    sec = section
    names = [str(s) for s in sec.adata.obs_names]
    if str(spot) not in names:
        raise StimageInputError(f"section {sec.name}: no spot {spot!r}")
    cx, cy = sec.xy[names.index(str(spot))]
    return build_game(sec.image, str(spot), cx, cy, tile_um=ensemble.tile_um, out_px=ensemble.out_px, nuclei=nuclei,
                      grow_um=grow_um, fill=fill)


def section_stain_source(ensemble, section):
    """The section's stain estimate, from all its spots' tiles (as prediction makes it)."""
    from ..tiles import extract_tiles

    sec = section.drop_outside_image()
    return ensemble.stain_source(extract_tiles(sec.image, sec.xy, ensemble.tile_um, ensemble.out_px, cache=True))


# ====================================================================== pixel maps
def pixel_map(ensemble, game: TileGame, genes: Sequence[str], stain_source, *, method: str = "auto",
              max_evals: int = 500, nsamples: int = 64, output: str = "log_mean", seed: int = 0,
              batch_size: int = 64):
    """A pixel-level attribution map of one tile (at the model's input resolution).

    ``method="gradient"`` (the default for differentiable models): ``shap.GradientExplainer`` from the
    tile with every player masked (``nsamples`` gradient samples). ``"partition"`` (the default
    otherwise): ``shap.PartitionExplainer`` with ``shap.maskers.Image`` whose mask value is that same
    masked tile (``max_evals`` evaluations; values summed over the colour channels).

    Returns
    -------
    shap.Explanation
        ``values`` (out_px, out_px, G), ``base_values`` (G,), ``data`` the tile (out_px, out_px, 3).
    """
    import shap

    predictor = TilePredictor(ensemble, genes, stain_source, output=output, batch_size=batch_size)
    if method == "auto":
        method = "gradient" if is_differentiable(ensemble) else "partition"
    tile = game.tile()
    zero = game.compose(np.zeros((1, game.n_players), bool))
    if method == "gradient":
        vals = _gradient_pixels(tile, zero, ensemble, predictor, nsamples, seed, batch_size)
        base = predictor(zero)[0]
    elif method == "partition":
        h = w = game.out_px
        masker = shap.maskers.Image(zero[0].astype(np.float64), shape=(h, w, 3))

        def f(x):
            return predictor(np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, h, w, 3))

        seed_explainers(seed)
        ex = shap.PartitionExplainer(f, masker, output_names=list(genes))
        e = ex(tile.astype(np.float64), max_evals=int(max_evals), batch_size=int(batch_size), silent=True)
        vals = np.asarray(e.values, dtype=np.float64).reshape(h, w, 3, -1).sum(2)
        base = np.asarray(e.base_values, dtype=np.float64).reshape(-1)[: len(genes)]
    else:
        raise StimageInputError(f"pixel map method must be 'auto', 'gradient' or 'partition', not {method!r}")
    return shap.Explanation(values=vals, base_values=np.asarray(base), data=tile[0], output_names=list(genes))

