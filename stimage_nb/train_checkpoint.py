"""The run directory of :func:`stimage_nb.train.train`: its fingerprint, the members' checkpoints and state.

``RUN_DIR/run.json`` records the settings that must not change when a run resumes (:func:`_check_or_write_run`
refuses another recipe in the same folder, in one line naming what differs). Each member keeps, in
``RUN_DIR/members/m{i}/``, its last epoch's model and optimizer as safetensors and a ``state.json`` that names
them (written last, so a crash between the files leaves the previous epoch intact: :func:`_write_checkpoint`);
``state.json`` is strict JSON (no NaN/Infinity: a run without validation writes ``null``). The cross-fit of
``composition_shrinkage="cv"`` keeps its result in ``RUN_DIR/crossfit/``. A run that failed on its input before
any member trained is removed again (:func:`_forget_new_run`), so the corrected command starts clean.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .ensemble import save_state_dict, versions, write_json
from .errors import StimageInputError
from .io.section import Section
from .models.model import STModel
from .train_config import RESUMABLE_FIELDS as _RESUMABLE_FIELDS
from .train_config import TrainConfig

RUN_NAME = "run.json"


def _snapshot(sd: dict) -> dict:
    """Host copies of a state dict's tensors (safe to write while training goes on)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def _optimizer_snapshot(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The optimizer state as (tensors for safetensors, JSON-able rest)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v
            else:
                scalars[f"{pid}/{k}"] = v
    return _snapshot(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def _write_checkpoint(mdir: Path, model_sd: dict, optim_sd: dict, state: dict, improved: bool) -> None:
    """New files first, then the state JSON that names them, then drop the old ones (crash-safe)."""
    if improved:
        save_state_dict(model_sd, mdir / "best.safetensors")
    save_state_dict(model_sd, mdir / state["model_file"])
    save_state_dict(optim_sd, mdir / state["optim_file"])
    write_json(state, mdir / "state.json", strict=True)
    for old in mdir.glob("*-e*.safetensors"):
        if old.name not in (state["model_file"], state["optim_file"]):
            old.unlink(missing_ok=True)


def _load_optimizer(opt: torch.optim.Optimizer, path: Path, meta: dict) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _fingerprint(cfg: TrainConfig, genes, celltypes, train_names, val_names, tile_um) -> dict:
    c = {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE_FIELDS}
    c["tile_um"] = tile_um
    return {"config": c, "genes": list(genes), "celltypes": list(celltypes), "train_sections": list(train_names),
            "val_sections": list(val_names)}


def _training_data(manifest, sections: list[Section]) -> dict | None:
    """:func:`stimage_nb.io.provenance.record_training_data` of the manifest, or of in-memory Sections."""
    from .io.provenance import record_sections, record_training_data

    if isinstance(manifest, (str, os.PathLike)):
        return record_training_data(manifest, [s.name for s in sections])
    return record_sections(sections)


def _check_or_write_run(out: Path, fp: dict) -> dict:
    p = out / RUN_NAME
    if p.is_file():
        old = json.loads(p.read_text())
        diffs = [k for k in fp if old.get(k) != fp[k]]
        if "config" in diffs:
            keys = sorted(k for k in set(fp["config"]) | set(old.get("config", {}))
                          if fp["config"].get(k) != old.get("config", {}).get(k))
            diffs = [d if d != "config" else f"config {keys}" for d in diffs]
        if diffs:
            raise StimageInputError(
                f"{out}: this directory holds a run with different settings ({', '.join(diffs)} differ). "
                "Use another --out, or delete the directory to start over.")
        return old
    run = {**fp, "run_id": hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
           + "-" + _dt.datetime.now().strftime("%Y%m%d%H%M%S"),
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions()}
    out.mkdir(parents=True, exist_ok=True)
    write_json(run, p)
    return run


def _member_state(model: STModel, frozen: bool) -> dict:
    """What a checkpoint holds: the whole member, or only its heads when the extractor is frozen and shared."""
    sd = model.state_dict()
    return {k: v for k, v in sd.items() if not k.startswith("backbone.")} if frozen else sd


def _load_member_state(model: STModel, sd: dict, frozen: bool) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=not frozen)
    bad = [k for k in missing if not k.startswith("backbone.")] + list(unexpected)
    if bad:
        raise StimageInputError(f"checkpoint does not fit the member (e.g. {bad[:5]}); delete the run directory.")


def _member_dir(out: Path, i: int) -> Path:
    d = out / "members" / f"m{i}"
    d.mkdir(parents=True, exist_ok=True)
    return d


#: Where the cross-fit of ``composition_shrinkage="cv"`` keeps its result (and its heads while it runs).
CROSSFIT_DIR = "crossfit"


GENE_SHRINKAGE_FILE = "gene_shrinkage.json"


def _gene_shrinkage_of(out: Path) -> np.ndarray | None:
    """The applied per-gene factors recorded by :func:`_cross_fit_shrinkage`, or ``None``."""
    p = out / CROSSFIT_DIR / GENE_SHRINKAGE_FILE
    return np.asarray(json.loads(p.read_text())["applied"], np.float64) if p.is_file() else None


def _forget_new_run(out: Path, remove_dir: bool) -> None:
    """A run this call started that failed on its input before any member trained: remove what it wrote
    (``run.json``, ``gene_panel.json``, the feature cache, the cross-fit, empty member folders), so the
    corrected command starts clean instead of being refused as "a run with different settings"."""
    members = out / "members"
    if members.is_dir() and any(members.glob("m*/state.json")):
        return  # a member trained: keep everything (the run resumes with the same settings)
    for name in (RUN_NAME, "gene_panel.json"):
        (out / name).unlink(missing_ok=True)
    for name in ("cache", CROSSFIT_DIR, "members"):
        shutil.rmtree(out / name, ignore_errors=True)
    if remove_dir:
        try:
            out.rmdir()
        except OSError:
            pass
