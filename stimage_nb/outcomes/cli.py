"""``stimage-nb outcomes``: features (slides or patients) against survival or a clinical status, with baselines.

    stimage-nb outcomes --features F.csv --clinical C.csv [--time-col time --event-col event | --target COL]
                        --out DIR [--columns REGEX] [--covariates age,stage] [--random-sets 10] ...

Both tables are keyed by ``patient_id`` (a features table may hold several slides per patient: they are
averaged). Writes ``DIR/results.json`` (the model's Harrell's and Uno's C or ROC AUC, mean over the outer
folds with a bootstrap CI, per fold, and the baselines), ``comparison.csv``, ``folds.csv``,
``predictions.csv`` (out-of-fold risk or probabilities per patient), ``coefficients.csv`` and
``figures/`` (Kaplan-Meier curves of the risk groups or the ROC curve, and model vs baselines). Files are
replaced atomically, so a re-run overwrites a complete set.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from pathlib import Path

from ..atomic import save_figure, write_atomic
from ..errors import StimageInputError

log = logging.getLogger(__name__)


def add_cli(sub) -> None:
    p = sub.add_parser("outcomes", help="survival or status models on slide/patient features, with baselines "
                                        "(nested cross-validation)")
    p.add_argument("--features", required=True, type=Path, help="CSV with patient_id and feature columns "
                   "(several rows per patient = slides, averaged)")
    p.add_argument("--clinical", required=True, type=Path, help="CSV with patient_id and the outcome columns")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--time-col", default="time", help="survival time column (any unit; > 0)")
    p.add_argument("--event-col", default="event", help="event column (1 = event, 0 = censored)")
    p.add_argument("--target", default=None, help="a binary or class column: classification instead of survival")
    p.add_argument("--columns", default=None,
                   help="the model's feature columns: a regular expression or a comma-separated list (default: "
                        "all); random baseline sets of the same size come from the other columns")
    p.add_argument("--covariates", default=None,
                   help="comma-separated clinical-table columns for the clinical baseline (e.g. age,stage)")
    p.add_argument("--random-sets", type=int, default=10, help="random feature sets of the model's size (0: none)")
    p.add_argument("--permutations", type=int, default=0,
                   help="rerun the nested CV on shuffled outcomes N times for a p-value against chance (0: none)")
    p.add_argument("--folds", type=int, default=5, help="outer cross-validation folds")
    p.add_argument("--inner-folds", type=int, default=3, help="inner folds (hyper-parameter choice)")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap replicates for the CIs (0: none)")
    p.add_argument("--k-best", type=int, default=None, help="univariate pre-selection of k features inside the folds")
    p.add_argument("--times", default=None, help="evaluation times of AUC(t)/Brier, comma-separated (time unit)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_outcomes)


def _list(v: str | None) -> list[str] | None:
    return None if v is None else [x.strip() for x in v.split(",") if x.strip()]


def _columns(v: str | None):
    if v is None:
        return None
    if "," in v:
        return _list(v)
    return v  # a regular expression (a single name matches itself)


def run_outcomes(features: Path, clinical: Path, out: Path, *, time_col: str = "time", event_col: str = "event",
                 target: str | None = None, columns=None, covariates: list[str] | None = None, random_sets: int = 10,
                 permutations: int = 0, params=None, progress: bool = True) -> dict:
    """What ``stimage-nb outcomes`` does (the files written are listed in the module docstring); returns results.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._compare import compare
    from ._cv import CVParams
    from ._tables import align, class_target, patient_features, read_table, survival_outcome

    params = params or CVParams()
    ftab = read_table(features, "features table")
    ctab = read_table(clinical, "clinical table")
    outcome_cols = [target] if target else [time_col, event_col]
    leak = [c for c in outcome_cols if c in ftab.columns and c != "patient_id"]
    if leak:
        raise StimageInputError(f"{features}: the features table holds the outcome column(s) {leak}; drop them "
                                "(a model must not see its target)")
    pool = patient_features(ftab, source="features")
    X = patient_features(ftab, columns=columns, source="features") if columns is not None else pool
    model_cols = list(X.columns)
    if target:
        y = class_target(ctab, target)
    else:
        y = survival_outcome(ctab, time_col=time_col, event_col=event_col)
    clin = None
    if covariates:
        missing = [c for c in covariates if c not in ctab.columns]
        if missing:
            raise StimageInputError(f"{clinical}: no covariate column(s) {missing} (columns: {list(ctab.columns)[:10]})")
        if any(c in outcome_cols for c in covariates):
            raise StimageInputError("a covariate cannot be the outcome itself")
        clin = patient_features(ctab, columns=covariates, source="clinical")
    pool, y = align(pool, y)
    if clin is not None:
        clin = clin.reindex(pool.index)  # patients without covariates: NaN, imputed inside the folds
    n = len(pool)
    log.info("%d patients, %d model features, %d in the pool", n, len(model_cols), pool.shape[1])
    comp = compare(pool, y, model_features=model_cols, name="model", clinical=clin, n_random=random_sets,
                   n_permutations=permutations, params=params, progress=progress)
    model = comp.results["model"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    figs = {}
    if model.kind == "survival":
        fig, ax = plt.subplots(figsize=(6, 4.8))
        model.plot_km(ax=ax)
        figs["km"] = _savefig(fig, out / "figures" / "km_risk_groups.png")
    else:
        fig, ax = plt.subplots(figsize=(4.8, 4.5))
        model.plot_roc(ax=ax)
        figs["roc"] = _savefig(fig, out / "figures" / "roc.png")
    fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.5 * (len(comp.results) + 1)))
    comp.plot(ax=ax)
    figs["comparison"] = _savefig(fig, out / "figures" / "comparison.png")
    tables = {
        "comparison": write_atomic(out / "comparison.csv", lambda p: comp.to_frame().to_csv(p, index=False)),
        "folds": write_atomic(out / "folds.csv", lambda p: model.to_frame().to_csv(p, index=False)),
        "predictions": write_atomic(out / "predictions.csv", lambda p: model.predictions.to_csv(p, index=False)),
        "coefficients": write_atomic(out / "coefficients.csv",
                                      lambda p: model.coefficients.to_csv(p, index_label="feature")),
    }
    res = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": _version(),
        "task": model.kind,
        "inputs": {"features": str(Path(features).resolve()), "clinical": str(Path(clinical).resolve()),
                   "outcome": {"target": target} if target else {"time": time_col, "event": event_col},
                   "columns": columns if isinstance(columns, (str, type(None))) else list(columns),
                   "covariates": covariates, "n_patients": n, "n_model_features": len(model_cols),
                   "n_pool_features": int(pool.shape[1])},
        "model": model.to_json(),
        "baselines": {k: v.summary() for k, v in comp.results.items() if k != "model"},
        "clinical_baseline": "run" if clin is not None else "not run (name clinical columns with --covariates)",
        "random_sets": comp.to_json()["random"],
        "permutation_test": comp.to_json()["permutation"],
        "comparison": comp.to_json()["table"],
        "tables": {k: str(v) for k, v in tables.items()},
        "figures": {k: str(v) for k, v in figs.items()},
    }
    write_atomic(out / "results.json", lambda p: p.write_text(json.dumps(res, indent=1, allow_nan=False)))
    return res


def _savefig(fig, path: Path) -> Path:

    return save_figure(fig, path, dpi=110)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("stimage_nb")
    except Exception:  # noqa: BLE001
        return "unknown"


def _cmd_outcomes(a) -> int:
    from ._cv import CVParams

    times = None
    if a.times:
        try:
            times = tuple(float(t) for t in _list(a.times))
        except ValueError:
            raise StimageInputError(f"--times must be numbers separated by commas, not {a.times!r}") from None
    params = CVParams(n_splits=a.folds, inner_splits=a.inner_folds, seed=a.seed, n_bootstrap=a.bootstrap,
                      k_best=a.k_best, times=times)
    res = run_outcomes(a.features, a.clinical, a.out, time_col=a.time_col, event_col=a.event_col, target=a.target,
                       columns=_columns(a.columns), covariates=_list(a.covariates), random_sets=a.random_sets,
                       permutations=a.permutations, params=params, progress=sys.stderr.isatty())
    m = res["model"]
    if res["task"] == "survival":
        h, u = m["harrell_c"], m["uno_c"]
        line = (f"Harrell's C {h['value']:.3f} [{_fmt(h['low'])}, {_fmt(h['high'])}], Uno's C {u['value']:.3f} "
                f"[{_fmt(u['low'])}, {_fmt(u['high'])}] ({m['n_patients']} patients, {m['n_events']} events)")
    else:
        r = m["roc_auc"]
        line = f"ROC AUC {r['value']:.3f} [{_fmt(r['low'])}, {_fmt(r['high'])}] ({m['n_patients']} patients)"
    print(f"model: {line}")
    for row in res["comparison"]:
        if row.get("set") != "model":
            key = "harrell_c" if res["task"] == "survival" else "roc_auc"
            print(f"  {row['set']}: {key} {_fmt(row.get(key))} [{_fmt(row.get(key + '_low'))}, {_fmt(row.get(key + '_high'))}]")
    perm = res["permutation_test"]
    if perm["n"]:
        print(f"  permutation test ({perm['n']} shuffles of the outcome): p = {_fmt(perm['p_value'])}")
    print(f"-> {a.out / 'results.json'}")
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
