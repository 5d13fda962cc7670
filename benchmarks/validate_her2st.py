"""The validation harness on the bundled her2st data: choosing the default recipe, then the full protocol.

Two steps, both through :func:`stimage_nb.validation.validate` (769 genes of ``genes_stimage_her2st.txt``):

1. ``--candidates``: every recipe of :data:`CANDIDATES` is run on **leave-one-patient-out in both directions**
   (train C -> test B4, train B4 -> test each C section) and on the **acquisition protocol** of those folds
   (the held-out patients' sections re-made by ``stimage_nb.shifts.ACQUISITION_SHIFTS``), the ridge
   baseline beside it in the same run. The recipe is chosen by :func:`choose` — the most targets met per
   held-out patient and acquisition (the unit the targets are stated in), then per held-out section, then the higher mean r over
   the held-out patients — never by a section of a training patient (leave-one-section-out is not consulted). Writes ``OUT/candidates/<name>/`` (each a report folder) and ``OUT/candidates.md``.
   The shifted images are made once (``OUT/shifted``) and shared by the candidates.
2. ``--full``: the whole protocol (``protocol="all"``: leave-one-section-out, leave-one-patient-out,
   acquisition; cross-platform is reported as not possible on one platform) with ``TrainConfig()``, timed;
   writes ``OUT/full/`` (report folder) and ``OUT/full/timing.json``.

``--readme README.md`` writes both generated tables into the README between the markers
``<!-- validation-candidates:begin -->``/``end`` and ``<!-- validation-default:begin -->``/``end``.

Usage::

    python benchmarks/validate_her2st.py --out bench_out/validate --candidates
    python benchmarks/validate_her2st.py --out bench_out/validate --full --readme README.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import pandas as pd

#: Recipes tried, as TrainConfig fields. The first is the offline default before these studies (written out,
#: so it stays reachable whatever TrainConfig's defaults become); the "library size by ridge" recipes are the
#: second study (the composition trained at the observed library size, the library size regressed from the
#: image, the composition shrunk toward its mean; stimage_nb.models.library_size); the last of them shrinks each gene by
#: its own cross-fitted factor (composition_shrinkage="cv"); the next two add simulated acquisitions of the training
#: tiles as training views (acquisition_views), every view equally likely or drawn half the time (acquisition_share
#: 0.5); the last two let the coarse scan view bracket the supported range (4.5 um/px in place of, or beside, the
#: 3 um/px one; the first is the default since). The earlier recipes pin acquisition_views="none".
_NO_VIEWS = {"acquisition_views": "none"}  # the recipes before the acquisition views were added
#: the per-gene cross-fitted shrinkage (the default since the third study)
_PER_GENE = {"composition": True, "library_size": "ridge", "composition_shrinkage": "cv", "composition_cv_scale": 0.25}


def _views(coarse: str, share: float) -> dict:
    """The per-gene recipe with simulated acquisitions as training views: ``coarse`` scan view(s), then the
    defocused JPEG and the two restainings, a spot drawn in one of them with probability ``share``."""
    return {**_PER_GENE, "acquisition_views": f"{coarse},defocus_1um+jpeg_q60,stain_H1.2_E0.85,stain_H0.85_E1.2",
            "acquisition_share": share}


CANDIDATES: dict[str, dict] = {
    "before": {"background": "keep", "depth": "none", "member_data": "all", "composition": False, **_NO_VIEWS},
    "library size by ridge, composition as fitted": {"composition": True, "library_size": "ridge",
                                                      "composition_shrinkage": 1.0, **_NO_VIEWS},
    "library size by ridge, composition shrunk 0.5": {"composition": True, "library_size": "ridge",
                                                       "composition_shrinkage": 0.5, **_NO_VIEWS},
    "library size by ridge, composition shrunk 0.25": {"composition": True, "library_size": "ridge",
                                                        "composition_shrinkage": 0.25, **_NO_VIEWS},
    "library size by ridge, composition shrunk per gene (cross-fitted x 0.25)": {**_PER_GENE, **_NO_VIEWS},
    "per gene shrinkage + simulated acquisitions as training views": _views("scan_3um", 0.8),  # every view equally likely
    "per gene shrinkage + simulated acquisitions, drawn half the time": _views("scan_3um", 0.5),
    "views bracket the scan range (4.5 instead of 3 um/px)": _views("scan_4.5um", 0.5),
    "five views (3 and 4.5 um/px)": _views("scan_3um,scan_4.5um", 0.5),
    "white background": {"background": "white", "depth": "none", "member_data": "all", "composition": False,
                         **_NO_VIEWS},
    "white + depth offsets": {"background": "white", "depth": "section", "member_data": "all", "composition": False,
                              **_NO_VIEWS},
    "white + depth + composition head": {"background": "white", "depth": "section", "member_data": "all",
                                         "composition": True, **_NO_VIEWS},
    "white + depth + members leave a group out": {"background": "white", "depth": "section", "member_data": "groups",
                                                  "composition": False, **_NO_VIEWS},
}
TARGETS = ("beats_baseline", "not_worse_cp10k", "coverage_ok", "epistemic_ranks")
#: The acquisitions the candidates are compared under (the hardest of ACQUISITION_SHIFTS: the black background
#: alone and with a 3.2 µm/px scan, the 4 µm/px scan, the eosin-heavy stain, a cheap scanner), to fit the study
#: on a shared 2-core machine; the chosen default then runs all of them (--full). No bootstrap CI in the study
#: (the Wilcoxon test decides "beats"; the CI is reported by --full).
CANDIDATE_SHIFTS = ("black_background", "black_background+scan_3.2um", "scan_4um", "stain_H0.8_E1.3",
                    "scan_2x+defocus+jpeg_q50")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def summarize(name: str, res) -> dict:
    """One row of the candidates table."""
    t = res.table()
    lopo = t[(t["protocol"] == "lopo") & (t["acquisition"] == "reference")]
    met = res.targets_met()
    row = {"recipe": name, "folds done": f"{len(res.splits)}/4"}
    for fold, d in lopo.groupby("fold", sort=False):
        tag = "B4" if fold.endswith("_B") else "C (mean of 5)"
        row[f"{tag}: ens r / base r"] = f"{d['ensemble r'].mean():.3f} / {d['baseline r'].mean():.3f}"
        row[f"{tag}: CP10k ens / base"] = f"{d['ensemble r CP10k'].mean():.3f} / {d['baseline r CP10k'].mean():.3f}"
        row[f"{tag}: cov90"] = (f"{d['coverage 90%'].min():.2f}" if len(d) == 1 else
                                f"{d['coverage 90%'].min():.2f}–{d['coverage 90%'].max():.2f}")
    mp = res.targets_met("patient")
    row["targets per patient"] = f"{sum(mp[k]['met'] for k in TARGETS if k in mp)}/{sum(mp[k]['of'] for k in TARGETS if k in mp)}"
    for k in TARGETS:
        row[k] = f"{met[k]['met']}/{met[k]['of']}" if k in met else "–"
    row["cov90 range (all)"] = "{:.2f}–{:.2f}".format(*met["coverage_90_range"]) if met.get("coverage_90_range") else "–"
    row["_score_patient"] = sum(mp[k]["met"] for k in TARGETS if k in mp)
    row["_score"] = sum(met[k]["met"] for k in TARGETS if k in met)
    row["_mean_r"] = float(lopo["ensemble r"].mean())
    row["minutes (sum of folds)"] = round(res.timings.get("wall_seconds", 0) / 60, 1)
    return row


def choose(rows: list[dict]) -> str:
    """Among the candidates whose four folds all finished: the recipe meeting the most targets per held-out
    patient and acquisition (the unit the targets are stated in), then the most per held-out section (one test each, stricter),
    then the higher mean ensemble r over the held-out patients' sections as scanned."""
    done = [r for r in rows if r["folds done"] == "4/4"] or rows
    best = max(done, key=lambda r: (r.get("_score_patient", 0), r["_score"], r["_mean_r"]))
    return best["recipe"]


def candidates_markdown(rows: list[dict], chosen: str, load: str) -> str:
    df = pd.DataFrame(rows)
    cols = [c for c in df.columns if not c.startswith("_")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    df = df.fillna("not run")
    for _, r in df.iterrows():
        cells = [f"**{r[c]}**" if c == "recipe" and r[c] == chosen else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Folds: leave-one-patient-out train C → test B4 and train B4 → test C2–C6, and the same two folds "
              "under the acquisitions; a candidate with fewer than 4/4 folds was stopped early (see the text).",
              "", f"Chosen: **{chosen}** (most targets met per held-out patient and acquisition, the unit the targets are stated in; "
              "then per held-out section; then the higher mean r; leave-one-section-out not consulted). Targets per "
              "patient: a gene's r averaged over the patient's held-out sections, one Wilcoxon test across genes, "
              "coverage and sparsification on every section; the four columns after it count them per held-out "
              f"section of another patient (one test each). Both as scanned and under {len(CANDIDATE_SHIFTS)} "
              "acquisitions (" + ", ".join(CANDIDATE_SHIFTS) + f"), except the sparsification target (as scanned). "
              f"{load}"]
    return "\n".join(lines) + "\n"


def _load() -> str:
    try:
        return "load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg()) + " on 2 cores"
    except OSError:  # pragma: no cover
        return "unknown"


def run_candidates(args, manifest, genes) -> None:
    from stimage_nb.shifts import parse_shifts
    from stimage_nb.train import TrainConfig
    from stimage_nb.validation import load_result, validate, write_report

    rows, loads = [], []
    names = [n for n in CANDIDATES if not args.only or n in args.only]
    for name in names:
        t0 = time.perf_counter()
        cfg = TrainConfig(**CANDIDATES[name], members=args.members)
        out = args.out / "candidates" / _slug(name)
        if args.summarize_only:  # folds finished earlier (maybe by another process or version): read them back
            if not (out / "folds").is_dir():
                continue
            res = load_result(out)
        else:
            res = validate(manifest, out=out, protocol=["lopo", "acquisition"], genes=genes, config=cfg,
                           shifts=parse_shifts(args.candidate_shifts), shift_dir=args.out / "shifted",
                           keep_shifted=True, n_boot=0, progress=args.progress)
        write_report(res, out)
        loads.append(_load())
        rows.append(summarize(name, res))
        print(f"{name}: {rows[-1]} ({time.perf_counter() - t0:.0f} s, {loads[-1]})", flush=True)
    chosen = choose(rows)
    note = args.load_note or ("Machine load after each candidate: " + "; ".join(loads) + ".")
    md = candidates_markdown(rows, chosen, note)
    (args.out / "candidates.md").write_text(md)
    (args.out / "candidates.json").write_text(json.dumps({"rows": rows, "chosen": chosen}, indent=1))
    print(md)


def run_full(args, manifest, genes) -> None:
    from stimage_nb.train import TrainConfig
    from stimage_nb.validation import readme_table, validate, write_report

    out = args.out / "full"
    load0 = _load()
    t0 = time.perf_counter()
    res = validate(manifest, out=out, protocol="all", genes=genes, config=TrainConfig(members=args.members),
                   n_boot=args.n_boot, progress=args.progress)
    wall = time.perf_counter() - t0
    write_report(res, out)
    timing = {"wall_seconds": round(wall, 1), "load_before": load0, "load_after": _load(),
              "folds": res.timings, "cpus": os.cpu_count()}
    (out / "timing.json").write_text(json.dumps(timing, indent=1))
    (out / "readme_table.md").write_text(readme_table(res))
    print(f"full protocol: {wall / 60:.1f} min ({load0} -> {timing['load_after']})")
    print("targets per held-out patient:", res.targets_met("patient"))
    print("targets per held-out section:", res.targets_met())


def update_readme(readme: Path, out: Path) -> None:
    """Replace the text between the markers with the generated tables (a marker pair that is missing is
    appended at the end of the section 'Validation')."""
    text = readme.read_text()
    blocks = {}
    cand = out / "candidates.md"
    if cand.is_file():
        blocks["validation-candidates"] = cand.read_text()
    full = out / "full" / "readme_table.md"
    if full.is_file():
        t = json.loads((out / "full" / "timing.json").read_text())
        blocks["validation-default"] = (full.read_text() + f"\nFull protocol (leave-one-section-out, leave-one-patient-out, "
                                        f"acquisition; 769 genes): {t['wall_seconds'] / 60:.1f} min wall time on "
                                        f"{t['cpus']} CPU cores ({t['load_before']} before, {t['load_after']} after).\n")
    if "validation-default" not in blocks and (out / "candidates.json").is_file():
        # no --full run yet: the chosen candidate's folds (leave-one-patient-out and the study's acquisitions)
        from stimage_nb.validation import load_result, readme_table

        chosen = json.loads((out / "candidates.json").read_text())["chosen"]
        res = load_result(out / "candidates" / _slug(chosen))
        blocks["validation-default"] = (
            f"The default recipe (`TrainConfig()`, the candidate **{chosen}**), from the candidates study: "
            "leave-one-patient-out as scanned, then the acquisitions of the study (mean over the held-out "
            "patients' sections). The full protocol (leave-one-section-out too, all nine acquisitions, the "
            "bootstrap CI) has not been run on the bundle yet: `--full` writes it here.\n\n" + readme_table(res))
    for key, body in blocks.items():
        a, b = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
        if a not in text or b not in text:
            raise SystemExit(f"{readme}: markers {a} ... {b} not found")
        text = text[:text.index(a) + len(a)] + "\n" + body + text[text.index(b):]
    readme.write_text(text)
    print(f"updated {readme}: {sorted(blocks)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--candidates", action="store_true", help="compare the recipes of CANDIDATES (LOPO + acquisition)")
    p.add_argument("--only", nargs="*", help="only these candidates (names of CANDIDATES)")
    p.add_argument("--load-note", default=None,
                   help="the sentence on machine load written under the candidates table (default: the load "
                        "average measured after each candidate)")
    p.add_argument("--summarize-only", action="store_true",
                   help="with --candidates: only read back the candidates' finished folds and write the table")
    p.add_argument("--candidate-shifts", default=",".join(CANDIDATE_SHIFTS),
                   help="acquisitions of the candidates' study (default: the five hardest of the acquisition set)")
    p.add_argument("--full", action="store_true", help="the full protocol with TrainConfig()")
    p.add_argument("--readme", type=Path, default=None, help="write the generated tables into this README")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a machine shared with other jobs, two OpenMP threads "
                        "spin-wait on each other and train the heads ~6x slower than one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("stimage_nb.io.readers").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(max(1, args.threads))
    from stimage_nb._settings import data_dir, her2st_manifest
    from stimage_nb.io.readers import read_gene_list

    manifest = her2st_manifest()
    genes = read_gene_list(data_dir() / "her2st" / "genes_stimage_her2st.txt")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.candidates:
        run_candidates(args, manifest, genes)
    if args.full:
        run_full(args, manifest, genes)
    if args.readme:
        update_readme(args.readme, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
