"""Deep ensembles of :class:`~stimage_nb.models.STModel` members, saved as safetensors + JSON.

Prediction for each spot and gene (Lakshminarayanan et al. 2017, with negative-binomial members):

- predictive mean            E[y]       = mean over members of μ_m
- aleatoric variance         E[Var(y|m)] = mean over members of μ_m + μ_m²/θ_m
- epistemic variance         Var(E[y|m]) = variance over members of μ_m (population variance)

so that the predictive variance of the mixture is their sum. For cell types: the mean of the members'
softmax probabilities and their standard deviation across members.

Members with a regression head (``STModel(head="mlp")``, e.g. an imported Path2Space model) predict a
point value, not a count distribution: their predictive mean and epistemic variance are computed the
same way, and the aleatoric variance is NaN (not modelled). ``meta["mean_groups"]`` (lists of member
indices) averages within each group first and then across groups, to reproduce a published model's
averaging order exactly (Path2Space: inner mean over 7 folds, outer over 22).

On disk (``Ensemble.save(dir)``): ``member_{i}.safetensors`` per member and ``ensemble.json``
(genes, cell types, tile µm, out_px, how µm/px is handled, stain normalisation parameters, training
sections, member architectures and sha256 of their files, package/torch/timm versions). No pickle.
A backbone that several members share (a frozen extractor: the default's k-means + handcrafted stack,
or a frozen timm/foundation model) is written once, as ``backbone_{sha256[:16]}.safetensors``, and the
members' files hold only their heads; loading gives those members one backbone module, in memory too.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import uuid
from pathlib import Path

import numpy as np
import torch

from .atomic import write_atomic
from .atomic import write_json as _write_json
from .devices import autocast, channels_last, for_batches, resolve_device
from .domain import DomainModel
from .errors import StimageInputError
from .models.model import STModel, build_model
from .stain import BACKGROUNDS, MacenkoNormalizer, normalizer_from_dict, whiten_background
from .uncertainty import scale_prediction

log = logging.getLogger(__name__)

FORMAT = "stimage_nb.ensemble"
FORMAT_VERSION = 2  # 2: shared backbones in their own file (version 1 files still load)
CONFIG_NAME = "ensemble.json"
UM_PER_PX_HANDLING = ("Tiles are squares of tile_um micrometres around each spot, read from the pyramid level "
                      "nearest to (not coarser than) tile_um/out_px µm/px and resampled to out_px pixels, so a "
                      "slide scanned at any resolution gives tiles of the same physical field; the image's "
                      "µm/px comes from its metadata or the manifest.")


def versions() -> dict:
    """Versions recorded with every saved model and prediction."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("stimage_nb", "timm", "safetensors", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            out[pkg] = None
    return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_state_dict(module_or_sd, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    sd = module_or_sd.state_dict() if hasattr(module_or_sd, "state_dict") else module_or_sd
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    return write_atomic(path, lambda tmp: save_file(sd, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()}))


def write_json(obj, path: str | os.PathLike, *, strict: bool = False) -> Path:
    """Write JSON atomically. ``strict``: non-finite floats (NaN, ±inf) are written as ``null``, so that any
    JSON reader (``jq``, JavaScript, ``json.loads(..., parse_constant=...)``) can read the file."""
    return _write_json(path, obj, strict=strict, indent=1, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _digests(members) -> list[str]:
    """Each member's backbone digest, computed once per backbone module (a shared 1B-parameter encoder is
    hashed once, not once per member)."""
    seen: dict[int, str] = {}
    return [seen.setdefault(id(m.backbone), m.backbone_digest()) if id(m.backbone) not in seen else seen[id(m.backbone)]
            for m in members]


def rescale_to_depth(pred: dict, depth: float) -> dict:
    """Predictions of one section (:meth:`Ensemble.predict_tiles` output) at another sequencing depth.

    Every member's NB mean ``mu_m`` becomes ``f mu_m`` with ``f = depth / mean_spots(sum_genes mean)``, so the
    mean predicted counts per spot equal ``depth``; the dispersions are kept. Exact from the outputs: the
    mean scales by ``f``, the epistemic variance by ``f^2``, and the aleatoric variance
    ``mean_m(mu_m + mu_m^2 / theta_m)`` becomes ``f mean + f^2 (aleatoric - mean)``. ``pred["depth_factor"]``
    records ``f``. A single member's outputs (``member_*``) are rescaled by the same ``f``.
    """
    if not depth > 0:
        raise StimageInputError(f"a section's depth must be positive counts per spot, not {depth!r}")
    now = float(pred["mean"].astype(np.float64).sum(1).mean()) if pred["mean"].size else 0.0
    f = float(depth) / now if now > 0 else 1.0
    out = scale_prediction(pred, f)
    out["depth_factor"] = f
    return out


class Ensemble:
    """N members predicting the same genes and cell types from tiles of the same size.

    Parameters
    ----------
    members
        The trained :class:`STModel` members.
    genes, celltypes
        Output names, in the heads' order.
    tile_um, out_px
        Tile side in µm and in pixels (after resampling).
    stain
        The stain normaliser fitted at training (``None``: no normalisation).
    meta
        Extra provenance (training sections, config, per-member info...).
    domain
        The :class:`~stimage_nb.domain.DomainModel` of member 0's training features (``None``: no
        domain-shift score).
    background
        How tiles' masked black background is handled before anything else (:func:`stimage_nb.stain.
        whiten_background`: ``"white"`` turns it into glass; ``"keep"``, the behaviour before it existed).
    reference_depth
        The sequencing depth (mean counts per spot over the genes) the predicted means refer to when no
        depth is given: the median of the training sections' depths (the offset origin when trained with
        depth offsets, ``TrainConfig.depth="section"``). A section's own depth given at prediction
        (``predict_tiles(depth=...)``) rescales the negative binomials to it; ``None``: not recorded
        (older ensembles).
    """

    def __init__(self, members: list[STModel], *, genes: list[str], celltypes: list[str], tile_um: float, out_px: int,
                 stain: MacenkoNormalizer | None = None, meta: dict | None = None, domain: DomainModel | None = None,
                 background: str = "keep", reference_depth: float | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        for m in members:
            if m.n_genes != len(genes) or m.n_celltypes != len(celltypes):
                raise ValueError(f"member outputs ({m.n_genes} genes, {m.n_celltypes} cell types) do not match "
                                 f"{len(genes)} genes and {len(celltypes)} cell types")
        self.members = list(members)
        self.genes, self.celltypes = list(genes), list(celltypes)
        self.tile_um, self.out_px = float(tile_um), int(out_px)
        self.stain = stain
        self.domain = domain
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, not {background!r}")
        self.background = background
        self.reference_depth = None if reference_depth is None else float(reference_depth)
        self.meta = dict(meta or {})
        self.meta.setdefault("run_id", uuid.uuid4().hex[:12])
        self._digests: list[str] | None = self.meta.get("_digests")
        self.meta.pop("_digests", None)
        self.device = torch.device("cpu")
        groups = self.meta.get("mean_groups")
        if groups is not None:
            flat = sorted(int(i) for g in groups for i in g)
            if flat != list(range(len(self.members))) or not all(len(g) for g in groups):
                raise ValueError("meta['mean_groups'] must split the member indices 0..n-1 into non-empty groups")
        for m in self.members:
            m.eval()

    # ------------------------------------------------------------------ basics
    @property
    def n_members(self) -> int:
        return len(self.members)

    @property
    def run_id(self) -> str:
        return self.meta["run_id"]

    @property
    def has_distribution(self) -> bool:
        """Whether every member predicts a count distribution (so an aleatoric variance exists)."""
        return all(getattr(m, "has_distribution", True) for m in self.members)

    def __repr__(self) -> str:
        bbs = sorted({m.backbone_name for m in self.members})
        return (f"Ensemble({self.n_members} members of {bbs}, {len(self.genes)} genes, {len(self.celltypes)} cell types, "
                f"tiles {self.tile_um:g} µm at {self.out_px} px)")

    def to(self, device) -> "Ensemble":
        self.device = resolve_device(device)
        for m in self.members:
            m.to(self.device)
            if channels_last(self.device):
                m.to(memory_format=torch.channels_last)
        return self

    def _groups(self) -> list[list[int]]:
        """Members sharing an identical backbone and input normalisation (features computed once)."""
        if self._digests is None:
            self._digests = _digests(self.members)
        keys: dict[tuple, list[int]] = {}
        for i, m in enumerate(self.members):
            key = (self._digests[i], tuple(m.mean.flatten().tolist()), tuple(m.std.flatten().tolist()))
            keys.setdefault(key, []).append(i)
        return list(keys.values())

    # ------------------------------------------------------------------ prediction
    def prepare_tiles(self, tiles):
        """Tiles as the members' input pipeline starts from: the masked background handled
        (:attr:`background`); numpy or torch uint8 ``(n, h, w, 3)``, same type back."""
        return whiten_background(tiles, self.background)

    def stain_source(self, tiles):
        """The stain estimate of a set of tiles (one section), or ``None`` without normalisation."""
        return None if self.stain is None else self.stain.estimate(self.prepare_tiles(tiles))

    def _stain_map(self, x, stain_source):
        """The per-pixel OD map to the reference stain for tiles ``x`` (``None``: leave them as they are).
        ``stain_source``: ``"auto"`` (estimate from ``x``), a :meth:`stain_source` estimate, or ``None``."""
        if self.stain is None or stain_source is None:
            return None
        src = self.stain.estimate(x) if isinstance(stain_source, str) and stain_source == "auto" else stain_source
        return None if src is None else self.stain._mapping(src, self.device)[0]

    @torch.no_grad()
    def predict_tiles(self, tiles, *, batch_size: int = 256, stain_source="auto", progress: bool = False,
                      amp: bool = True, depth: float | None = None, member: int | None = None) -> dict[str, np.ndarray]:
        """Predict uint8 tiles (n, out_px, out_px, 3) of one section.

        Parameters
        ----------
        tiles
            uint8 array or tensor.
        stain_source
            The section's stain estimate (:meth:`stain_source`); ``"auto"`` estimates it from ``tiles``;
            ``None`` skips stain normalisation.
        amp
            bf16 autocast where the device's fast paths are on (CUDA; see :mod:`stimage_nb.devices`).
        depth
            The section's sequencing depth (mean counts per spot over the model's genes), when known: the
            members' NB means are scaled by one factor so that the predicted mean depth over these tiles
            equals it (:func:`rescale_to_depth`; the spots' relative depths and compositions come from the
            image). Give the tiles of a whole section. ``None``: the training depth.
        member
            Also return that member's own prediction, from the same features (``member_mean``,
            ``member_aleatoric_var``, ``member_celltype_mean``): a single network beside the ensemble at no
            extra cost (the validation harness scores both).

        Returns
        -------
        dict of float32 arrays: ``mean``, ``aleatoric_var``, ``epistemic_var`` (n, genes),
        ``celltype_mean``, ``celltype_std`` (n, cell types), and ``domain_distance`` (n,) when the
        ensemble has a domain model.

        A batch that does not fit in the device's memory is retried at half the size (with a warning),
        down to one tile; the results do not depend on the batch size.
        """
        x = tiles if isinstance(tiles, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(tiles))
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[3] != 3:
            raise StimageInputError(f"tiles must be uint8 (n, h, w, 3), got {tuple(x.shape)} {x.dtype}")
        if x.shape[1] != self.out_px or x.shape[2] != self.out_px:
            raise StimageInputError(f"tiles are {x.shape[1]}x{x.shape[2]} px but the model was trained on "
                                    f"{self.out_px} px tiles of {self.tile_um:g} µm; extract tiles with these sizes.")
        dev = self.device
        x = self.prepare_tiles(x)
        M = self._stain_map(x, stain_source)
        n, G, C = x.shape[0], len(self.genes), len(self.celltypes)
        out = {"mean": np.empty((n, G), np.float32), "aleatoric_var": np.empty((n, G), np.float32),
               "epistemic_var": np.empty((n, G), np.float32), "celltype_mean": np.empty((n, C), np.float32),
               "celltype_std": np.empty((n, C), np.float32)}
        if self.domain is not None:
            out["domain_distance"] = np.empty(n, np.float32)
        if member is not None:
            if not 0 <= int(member) < self.n_members:
                raise StimageInputError(f"member {member} of an ensemble of {self.n_members}")
            out.update({"member_mean": np.empty((n, G), np.float32), "member_aleatoric_var": np.empty((n, G), np.float32),
                        "member_celltype_mean": np.empty((n, C), np.float32)})
        groups = self._groups()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="predict", leave=False, unit="tile")

        def run(i, j):
            for k, v in self._predict_batch(x[i:j], M, groups, amp, member).items():
                out[k][i:j] = v

        for_batches(run, n, batch_size, dev, "prediction", bar)
        if bar is not None:
            bar.close()
        return rescale_to_depth(out, depth) if depth is not None else out

    def _predict_batch(self, xb, M, groups, amp: bool, member: int | None = None) -> dict[str, np.ndarray]:
        """One batch of :meth:`predict_tiles` (uint8 tiles on any device) -> host arrays."""
        from .augment import to_float

        dev, C = self.device, len(self.celltypes)
        xb = xb.to(dev, non_blocking=True)
        if M is not None:
            xb = self.stain.apply(xb, M)
        xf = to_float(xb)
        res: dict[str, np.ndarray] = {}
        mus, vars_, probs = [None] * self.n_members, [None] * self.n_members, [None] * self.n_members
        for grp in groups:
            with autocast(dev, amp):
                f = self.members[grp[0]].features(xf)
            if self.domain is not None and grp[0] == 0:
                res["domain_distance"] = self.domain.distance(f.float().cpu().numpy())
            for j in grp:
                o = self.members[j].heads(f.float())
                if o.mean is not None:  # a regression member: a point value, no count distribution
                    mus[j] = o.mean.double()
                    vars_[j] = torch.full_like(mus[j], float("nan"))
                else:
                    mu = torch.exp(o.log_mu.double())
                    theta = torch.exp(o.log_theta.double())
                    mus[j], vars_[j] = mu, mu + mu * mu / theta
                if C:
                    probs[j] = torch.softmax(o.logits.double(), dim=1)
        mu = torch.stack(mus)
        order = self.meta.get("mean_groups")
        if order:  # within each group, then across groups (a published model's averaging order)
            res["mean"] = torch.stack([mu[list(g)].mean(0) for g in order]).mean(0).cpu().numpy()
        else:
            res["mean"] = mu.mean(0).cpu().numpy()
        res["aleatoric_var"] = torch.stack(vars_).mean(0).cpu().numpy()
        res["epistemic_var"] = mu.var(0, correction=0).cpu().numpy()
        if C:
            p = torch.stack(probs)
            res["celltype_mean"] = p.mean(0).cpu().numpy()
            res["celltype_std"] = p.std(0, correction=0).cpu().numpy()
        if member is not None:
            res["member_mean"] = mus[member].cpu().numpy()
            res["member_aleatoric_var"] = vars_[member].cpu().numpy()
            if C:
                res["member_celltype_mean"] = probs[member].cpu().numpy()
        return res

    @torch.no_grad()
    def features(self, tiles, *, batch_size: int = 256, stain_source="auto", amp: bool = True) -> np.ndarray:
        """Member 0's features ``(n, F)`` of uint8 tiles, stain-normalised as :meth:`predict_tiles` does
        (the features the domain model scores)."""
        from .augment import to_float

        x = tiles if isinstance(tiles, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(tiles))
        x = self.prepare_tiles(x)
        M = self._stain_map(x, stain_source)
        out = np.empty((x.shape[0], self.members[0].feat_dim), np.float32)

        def run(i, j):
            xb = x[i:j].to(self.device, non_blocking=True)
            if M is not None:
                xb = self.stain.apply(xb, M)
            with autocast(self.device, amp):
                out[i:j] = self.members[0].features(to_float(xb)).float().cpu().numpy()

        for_batches(run, x.shape[0], batch_size, self.device, "features")
        return out

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        """The JSON config written by :meth:`save` (without per-file hashes)."""
        meta = {k: v for k, v in self.meta.items() if not k.startswith("_")}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "genes": self.genes, "celltypes": self.celltypes,
                "tile_um": self.tile_um, "out_px": self.out_px, "model_um_per_px": self.tile_um / self.out_px,
                "um_per_px_handling": UM_PER_PX_HANDLING,
                "stain_normalization": self.stain.to_dict() if self.stain is not None else {"method": "none"},
                "background": self.background, "reference_depth": self.reference_depth,
                "versions": versions(), **meta}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``member_{i}.safetensors`` and ``ensemble.json`` into ``directory`` (atomically per file;
        ``ensemble.json``, written last, marks a complete ensemble)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = self.config()
        cfg.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        members_meta = list(self.meta.get("members") or [{} for _ in self.members])
        digests = self._digests or _digests(self.members)
        entries, shared = [], {}
        for i, m in enumerate(self.members):
            f = d / f"member_{i}.safetensors"
            extra = members_meta[i] if i < len(members_meta) else {}
            extra = {k: v for k, v in extra.items() if k not in ("backbone_file", "backbone_file_sha256")}
            entry = {**extra, **m.config(), "file": f.name, "backbone_sha256": digests[i]}
            if digests.count(digests[i]) > 1:  # written once, beside the heads-only member files
                if digests[i] not in shared:
                    bf = d / f"backbone_{digests[i][:16]}.safetensors"
                    save_state_dict(m.backbone, bf, metadata={"format": FORMAT, "backbone_sha256": digests[i]})
                    shared[digests[i]] = (bf.name, sha256_file(bf))
                entry["backbone_file"], entry["backbone_file_sha256"] = shared[digests[i]]
                sd = {k: v for k, v in m.state_dict().items() if not k.startswith("backbone.")}
            else:
                sd = m
            save_state_dict(sd, f, metadata={"format": FORMAT, "member": i})
            entry["sha256"] = sha256_file(f)
            entries.append(entry)
        cfg["members"] = entries
        cfg["n_members"] = len(entries)
        cfg["weights_sha256"] = hashlib.sha256("".join(
            e["sha256"] + e.get("backbone_file_sha256", "") for e in entries).encode()).hexdigest()
        dfile = d / "domain.safetensors"
        if self.domain is not None:
            save_state_dict(self.domain.tensors(), dfile, metadata={"format": FORMAT})
            cfg["domain"] = {**self.domain.meta, "file": dfile.name, "sha256": sha256_file(dfile)}
        else:
            cfg.pop("domain", None)
            dfile.unlink(missing_ok=True)
        write_json(cfg, d / CONFIG_NAME, strict=True)
        for old in d.glob("backbone_*.safetensors"):  # of an ensemble saved here before
            if old.name not in {v[0] for v in shared.values()}:
                old.unlink()
        self.meta.update({k: cfg[k] for k in ("members", "weights_sha256", "created")})
        log.info("saved %r to %s", self, d)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu", *, verify: bool = True) -> "Ensemble":
        """Load an ensemble saved by :meth:`save` onto ``device`` (``"cpu"``, ``"cuda"``, ``"auto"``)."""
        from safetensors.torch import load_file

        d = Path(directory)
        p = d / CONFIG_NAME
        if not p.is_file():
            hint = (" It holds an unfinished training run: run the same `stimage-nb train` command again to resume."
                    if (d / "run.json").is_file() else " Is this the --out directory of `stimage-nb train`?")
            raise StimageInputError(f"{d}: no {CONFIG_NAME}; not a trained model directory.{hint}")
        try:
            cfg = json.loads(p.read_text())
        except Exception as e:  # noqa: BLE001
            raise StimageInputError(f"{p}: unreadable model config ({e}).") from e
        if cfg.get("format") != FORMAT:
            raise StimageInputError(f"{p}: not a stimage_nb ensemble config (format={cfg.get('format')!r}).")
        if int(cfg.get("format_version", 1)) > FORMAT_VERSION:
            raise StimageInputError(f"{p}: written by a newer stimage_nb (format version {cfg['format_version']}); "
                                    "upgrade the package to load it.")
        members, backbones = [], {}
        for e in cfg["members"]:
            f = d / e["file"]
            if not f.is_file():
                raise StimageInputError(f"{f}: member weights missing (listed in {p}).")
            if verify and e.get("sha256") and sha256_file(f) != e["sha256"]:
                raise StimageInputError(f"{f}: sha256 does not match {p}; the file is corrupt or was replaced.")
            bname = e.get("backbone_file")
            # members that share a backbone get the one already built; the others are allocated without
            # random initialisation where the file holds every tensor (checked below)
            m = build_model(e, "none", backbone=backbones.get(bname) if bname else None, init=False)
            sd = load_file(str(f))
            if bname:
                if bname not in backbones:
                    bf = d / bname
                    if not bf.is_file():
                        raise StimageInputError(f"{bf}: shared backbone weights missing (listed in {p}).")
                    if verify and e.get("backbone_file_sha256") and sha256_file(bf) != e["backbone_file_sha256"]:
                        raise StimageInputError(f"{bf}: sha256 does not match {p}; the file is corrupt or was replaced.")
                    bsd = load_file(str(bf))
                    bad = m.backbone.load_state_dict(bsd, strict=False)
                    if bad.missing_keys or bad.unexpected_keys:
                        raise StimageInputError(f"{bf}: weights do not fit the recorded backbone {e['backbone']!r} "
                                                f"(missing {bad.missing_keys[:5]}, unexpected {bad.unexpected_keys[:5]}).")
                    backbones[bname] = m.backbone
                m.backbone = backbones[bname]  # one module for every member that shares it
                sd = {**{f"backbone.{k}": v for k, v in m.backbone.state_dict().items()}, **sd}
            missing, unexpected = m.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise StimageInputError(f"{f}: weights do not fit the recorded architecture {e['backbone']!r} "
                                        f"(missing {missing[:5]}, unexpected {unexpected[:5]}).")
            members.append(m)
        domain = None
        if cfg.get("domain"):
            df = d / cfg["domain"]["file"]
            if not df.is_file():
                raise StimageInputError(f"{df}: domain model missing (listed in {p}).")
            if verify and cfg["domain"].get("sha256") and sha256_file(df) != cfg["domain"]["sha256"]:
                raise StimageInputError(f"{df}: sha256 does not match {p}; the file is corrupt or was replaced.")
            domain = DomainModel.from_tensors(load_file(str(df)), {k: v for k, v in cfg["domain"].items()
                                                                   if k not in ("file", "sha256")})
        meta = {k: v for k, v in cfg.items() if k not in ("genes", "celltypes", "tile_um", "out_px", "domain",
                                                         "stain_normalization", "format", "format_version",
                                                         "background", "reference_depth")}
        meta["_digests"] = [e.get("backbone_sha256") for e in cfg["members"]] if all(
            e.get("backbone_sha256") for e in cfg["members"]) else None
        ens = cls(members, genes=cfg["genes"], celltypes=cfg["celltypes"], tile_um=cfg["tile_um"], out_px=cfg["out_px"],
                  stain=normalizer_from_dict(cfg.get("stain_normalization")), meta=meta, domain=domain,
                  background=cfg.get("background", "keep"), reference_depth=cfg.get("reference_depth"))
        ens.path = d
        return ens.to(device)
