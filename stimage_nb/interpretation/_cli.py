"""``stimage-nb interpret``: attributions of genes to nuclei at chosen spots, their faithfulness, exports.

::

    stimage-nb interpret --model RUN --manifest M --sections S --genes G1,G2 [--spots ids | --top-k N]
                         [--explainer permutation|partition|lime|gradient] [--max-evals N] --out DIR

writes, per section, ``DIR/<section>/``: the attributions (``attributions.csv``, ``spots.csv``,
``nuclei.csv``, ``attributions.json``), the summaries (``summary_*.csv``, ``summary_<gene>.png``), the
faithfulness curves and scores, a few side-by-side figures (``spot_<id>_<gene>.png``), the QuPath cells
(``<section>.nuclei.geojson``) and the OME-Zarr store (``<section>.attributions.ome.zarr``); and
``DIR/faithfulness.json`` for all sections.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..atomic import save_figure, write_csv

log = logging.getLogger(__name__)


def _csv(value):
    return None if value is None else [v.strip() for v in str(value).split(",") if v.strip()]


def _spots_for(spots: list[str] | None, section: str, sections: set[str], names: set[str]) -> list[str] | None:
    """``--spots`` items for one section: ``SECTION:ID`` items naming it, and bare ids it has."""
    if spots is None:
        return None
    out = []
    for s in spots:
        sec, _, sid = s.partition(":")
        if sid and sec in sections:
            if sec == section:
                out.append(sid)
        elif s in names:
            out.append(s)
    return out


def run_interpret(model, manifest, sections, genes, out, *, spots=None, top_k=None, explainer="permutation",
                  max_evals=None, output="log_mean", seed=0, nuclei=None, nuclei_method="watershed",
                  nuclei_model=None, fill="background", device="auto", batch_size=64, faithfulness_check=True,
                  sanity=True, exports=("qupath", "ome-zarr"), zarr_level=0, figures=3, progress=True) -> dict:
    """What ``stimage-nb interpret`` does (module docstring); returns the ``faithfulness.json`` content."""
    import matplotlib

    matplotlib.use("Agg")

    from ..ensemble import Ensemble, write_json
    from ..errors import StimageInputError
    from ..io.readers import read_manifest
    from ._explain import explain, pixel_map, spot_game
    from ._export import export_attributions
    from ._faithfulness import faithfulness, plot_curves
    from ._summary import plot_spot, plot_summary, summarise

    ens = Ensemble.load(model, device=device)
    secs = read_manifest(manifest, sections, genes=ens.genes, drop_missing_genes=True)
    out = Path(out)  # made only once the spots and genes are known good (below)
    record = {"model": str(model), "explainer": explainer, "output": output, "genes": list(genes), "sections": {}}
    given = _csv(spots) if isinstance(spots, str) else spots
    known = {s.name for s in secs}
    names = {s.name: {str(i) for i in s.adata.obs_names} for s in secs}
    if given is not None:
        found = set()
        for s in secs:
            for x in given:
                if _spots_for([x], s.name, known, names[s.name]):
                    found.add(x)
        lost = [x for x in given if x not in found]
        if lost:
            raise StimageInputError(f"--spots {lost[:5]} are not spots of sections {sorted(known)} "
                                    "(give ids as in the counts table, or SECTION:ID).")
    for sec in secs:
        sdir = out / sec.name
        sp = _spots_for(given, sec.name, known, names[sec.name])
        if given is not None and not sp:
            log.info("%s: none of --spots is a spot of this section; skipped", sec.name)
            continue
        attr = explain(ens, sec, genes=genes, spots=sp, top_k=top_k if sp is None else None, method=explainer,
                       max_evals=max_evals, output=output, nuclei=nuclei, nuclei_method=nuclei_method,
                       nuclei_model=nuclei_model, fill=fill, batch_size=batch_size, seed=seed, progress=progress)
        attr.write(sdir)
        summ = summarise(attr)
        for name, df in (("correlation", summ.correlation), ("morphology", summ.morphology),
                         ("celltypes", summ.celltypes)):
            write_csv(df, sdir / f"summary_{name}.csv")
        for g in attr.genes:
            fig = plot_summary(summ, g)
            save_figure(fig, sdir / f"summary_{g}.png", dpi=90)
        rec = {"attributions": attr.to_json(), "files": {}}
        if faithfulness_check:
            f = faithfulness(attr, ens, sec, sanity=sanity, seed=seed, batch_size=batch_size, progress=progress)
            write_csv(f.scores, sdir / "faithfulness_scores.csv")
            write_csv(f.curves, sdir / "faithfulness_curves.csv")
            if len(f.sanity):
                write_csv(f.sanity, sdir / "faithfulness_sanity.csv")
            for g in attr.genes:
                save_figure(plot_curves(f, g), sdir / f"faithfulness_{g}.png", dpi=90)
            rec["faithfulness"] = f.to_json()
        from ._explain import section_stain_source

        src = section_stain_source(ens, sec) if figures else None
        for spot in list(attr.spots.index)[: int(figures or 0)]:
            game = spot_game(ens, sec, spot, attr.nuclei, fill=attr.meta.get("fill", "background"))
            pm = pixel_map(ens, game, list(attr.genes), src, output=output, seed=seed, batch_size=batch_size,
                           max_evals=min(int(max_evals or 500), 500), nsamples=64)
            for g in attr.genes:
                save_figure(plot_spot(attr, spot, g, sec.image, pixel=pm), sdir / f"spot_{spot}_{g}.png", dpi=90)
        if exports:
            paths = export_attributions(attr, sdir, formats=list(exports), image=sec.image, base_level=zarr_level,
                                        progress=progress)
            rec["files"] = {k: str(v) for k, v in paths.items()}
        record["sections"][sec.name] = rec
    out.mkdir(parents=True, exist_ok=True)
    if faithfulness_check:
        fj = {"model": str(model), "explainer": explainer, "output": output, "genes": list(genes),
              "sections": {k: v.get("faithfulness") for k, v in record["sections"].items()}}
        write_json(fj, out / "faithfulness.json")
    write_json(record, out / "interpret.json")
    return record


def _cmd_interpret(a) -> int:
    from ..errors import StimageInputError

    genes = _csv(a.genes)
    if not genes:
        raise StimageInputError("--genes needs at least one gene (G1,G2).")
    if a.spots is None and a.top_k is None:
        a.top_k = 5
    exports = [] if a.exports in ("none", "") else _csv(a.exports)
    rec = run_interpret(a.model, a.manifest, _csv(a.sections), genes, a.out, spots=_csv(a.spots), top_k=a.top_k,
                        explainer=a.explainer, max_evals=a.max_evals, output=a.output, seed=a.seed,
                        nuclei=a.nuclei, nuclei_method=a.nuclei_method, nuclei_model=a.nuclei_model, fill=a.fill,
                        device=a.device, batch_size=a.batch_size, faithfulness_check=not a.no_faithfulness,
                        sanity=not a.no_sanity, exports=exports, zarr_level=a.zarr_level, figures=a.figures,
                        progress=not a.quiet)
    for name, r in rec["sections"].items():
        at = r["attributions"]
        line = (f"{name}: {at['n_spots']} spots, {at['n_nuclei']} nuclei, {at['method']} "
                f"({at['max_evals']} evaluations/spot)")
        f = r.get("faithfulness")
        if f:
            d = f["overall"].get("deletion", {}).get("vs_random", {})
            ci = d.get("ci95", [float("nan")] * 2)
            line += f"; deletion gap vs random {d.get('mean_gap', float('nan')):+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
            if f.get("randomised_heads"):
                line += f"; randomised heads passed={f['randomised_heads']['passed']}"
        print(line)
    print(json.dumps({"out": str(a.out)}))
    return 0


def add_cli(sub) -> None:
    """Register ``stimage-nb interpret``."""
    from ._explain import DEFAULT_MAX_EVALS, METHODS

    p = sub.add_parser("interpret", help="attribute predicted genes to nuclei (SHAP/LIME), check faithfulness, export",
                       description=__doc__.replace("\n::\n", "\n"))
    p.add_argument("--model", required=True, type=Path, help="run directory written by `train`")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--sections", help="comma-separated sections (default: all)")
    p.add_argument("--genes", required=True, help="comma-separated genes to explain")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--spots", help="comma-separated spot ids (SECTION:ID to name the section)")
    g.add_argument("--top-k", type=int, help="the N spots with the highest predicted mean of each gene (default 5)")
    p.add_argument("--explainer", default="permutation", choices=list(METHODS),
                   help="permutation (default: Owen values from hierarchy-respecting permutations), partition (their "
                        "recursion, cut at the budget), lime, gradient (timm models)")
    p.add_argument("--max-evals", type=int, default=None,
                   help=f"model evaluations per spot (gradient: samples); default {DEFAULT_MAX_EVALS}")
    p.add_argument("--output", default="log_mean", choices=["log_mean", "mean", "log_share"],
                   help="explain the log of the predictive mean (default), the mean (expected counts), or the log "
                        "of the gene's share of the spot's predicted counts (log_share: depth-normalised, the "
                        "gene-specific part without the library size all genes share)")
    p.add_argument("--nuclei", type=Path, default=None, help="QuPath GeoJSON of cells/detections to use as nuclei")
    p.add_argument("--nuclei-method", default="watershed", choices=["watershed", "stardist", "cellpose"],
                   help="segmentation without --nuclei (stardist/cellpose need --nuclei-model)")
    p.add_argument("--nuclei-model", type=Path, default=None, help="local StarDist/Cellpose weights")
    p.add_argument("--fill", default="background", choices=["background", "white", "mean"],
                   help="colour of masked nuclei: the tile's non-nuclear tissue (default), glass, the tile mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the deletion/insertion curves")
    p.add_argument("--no-sanity", action="store_true", help="skip the randomised-heads check")
    p.add_argument("--exports", default="qupath,ome-zarr", help="qupath, ome-zarr, both (default) or none")
    p.add_argument("--zarr-level", type=int, default=0, help="source pyramid level of the OME-Zarr's level 0")
    p.add_argument("--figures", type=int, default=3, help="side-by-side figures for the first N spots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=_cmd_interpret)
