"""The training recipe: :class:`TrainConfig`, everything that defines a training run, and its defaults.

The defaults are the package's offline default method (chosen by the validation harness, README); the
mode (frozen fast path or full fine-tuning) sets the optimiser's defaults (:data:`MODE_DEFAULTS`).
:func:`stimage_nb.train.train` runs a config; the run directory records it (``run.json``), so a run is
resumed only with the same recipe (:data:`RESUMABLE_FIELDS` may change between the two).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import asdict, dataclass, field

from .augment import AugmentConfig
from .errors import StimageInputError
from .models.features import DEFAULT_EXTRACTOR

log = logging.getLogger(__name__)

#: Settings that may change between an interrupted run and its resumption.
RESUMABLE_FIELDS = {"device", "amp", "channels_last", "progress", "eval_batch_size"}

#: Defaults that depend on the mode: the offline default's frozen fast path vs full fine-tuning.
#: (``library_size`` and ``composition_shrinkage`` follow from the resolved ``composition``/``depth``: see TrainConfig.)
MODE_DEFAULTS = {
    "frozen": dict(epochs=150, batch_size=1024, lr=3e-3, weight_decay=1e-2, patience=20, stain="macenko", dropout=0.2,
                   rank=8, early_stop="none", composition=True),
    "finetune": dict(epochs=12, batch_size=32, lr=1e-3, weight_decay=1e-4, patience=4, stain="macenko", dropout=0.1,
                     rank=0, early_stop="loss", composition=False),
}


@dataclass
class TrainConfig:
    """Everything that defines a training run. The defaults are the package's offline default method.

    The offline default (``frozen=True``, ``extractor="kmeans+handcrafted"``; measured in
    ``docs/offline_default.md``): every tile (150 µm at 112 px, Macenko-normalised per section to the
    training sections' stain; ``docs/robustness.md``) is described once by frozen features — k-means
    convolutional features learned from the training sections' own tiles plus 40 handcrafted
    colour/texture statistics, standardised with the training spots' mean/SD; every training tile is also
    described as four simulated acquisitions would have made it (a 4.5 µm/px scan, a 1 µm defocus with JPEG 60,
    both restainings x1.2/0.85; ``acquisition_views``), extra views a spot is drawn in half the time during
    training (``acquisition_share``) — and
    each member trains a low-rank (k = 8) negative-binomial head and a cell-type head on them (AdamW lr 3e-3, weight decay
    1e-2, cosine, full batch, 150 epochs, the last kept; the validation sections are scored every
    epoch). The NB mean is a spot's library size times a composition over the genes
    (``composition=True``): the composition is trained at each spot's observed library size, the library
    size is regressed from the same features by ridge (``library_size="ridge"``, each member on a
    bootstrap sample of the spots), and each gene's deviations from the mean composition are shrunk by
    a factor cross-fitted over the training sections, scaled by 0.25 (``composition_shrinkage="cv"``,
    ``composition_cv_scale=0.25``). Chosen by leave-one-patient-out and simulated acquisitions
    (README, "Validation"; ``benchmarks/validate_her2st.py``). ``frozen=False`` fine-tunes the timm
    ``backbone`` end to end (per-gene NB head).

    Settings left ``None`` take the default of the mode (:data:`MODE_DEFAULTS`) when the config is
    built; ``to_dict()`` records the resolved values. As on the command line, naming a ``backbone``
    alone means fine-tuning it: ``TrainConfig()`` is the offline default, ``TrainConfig(backbone=
    "resnet18")`` fine-tunes resnet18, ``TrainConfig(backbone="resnet18", frozen=True)`` trains heads
    on its frozen features.

    Attributes
    ----------
    frozen
        ``True``: frozen features (``extractor``) computed once, only the heads are trained.
        ``False``: full fine-tuning of the timm ``backbone``. ``None``: frozen unless a ``backbone``
        is named without an ``extractor``; a registered pathology foundation encoder (``"uni"``,
        ``"uni,virchow2"``...; :mod:`stimage_nb.models.encoders`) is always frozen unless ``frozen=False``.
    extractor
        Frozen feature branches joined by ``+``: ``kmeans`` (Coates & Ng k-means filters fitted on the
        training tiles), ``handcrafted`` (the baseline's 40 statistics), ``timm`` (the frozen timm
        ``backbone`` with ``weights``, e.g. a pathology foundation model in a local safetensors file).
        ``None``: ``"timm"`` when a backbone is named, else ``"kmeans+handcrafted"``. Recorded as
        ``""`` when fine-tuning.
    kmeans_k, kmeans_patches
        Number of k-means centroids (features: 2 K) and of random training patches they are fitted on.
    member_features
        ``"shared"``: all members use one fitted frozen feature stack (only the heads differ).
        ``"per_member"``: member ``i`` fits its own k-means dictionary (seed ``seed + i``, its own random
        patch sample), so members see different features and disagree more (a larger epistemic
        variance); costs one k-means fit and feature pass per member. Only matters with a ``kmeans``
        branch; see ``docs/offline_default.md``.
    backbone
        timm model name or registered encoder (fine-tuned, or the ``timm`` extractor branch; ``None``:
        resnet18); several names separated by commas are cycled over the members (members that differ by
        encoder: ``"uni,virchow2"``).
    weights
        ``"none"`` (train from scratch), a local ``.safetensors``/``.bin`` file or downloaded Hugging Face
        folder, ``"pretrained"``, a timm ``name.tag`` or ``"hf-hub:org/repo"`` (see
        :func:`stimage_nb.models.create_backbone`); with several backbones, one per backbone separated by
        commas (:meth:`weights_for`).
    backbone_kwargs
        Extra arguments for :func:`timm.create_model`.
    tile_um, out_px
        Tile side in µm (``None``: 1.5 x the spot diameter) and in pixels after resampling. ``"auto"``/
        ``None`` (the defaults): a registered encoder's own input (``input_px`` pixels at its ``um_per_px``;
        UNI: 224 px = 112 µm), else 150 µm at 112 px; giving only one keeps the other from the encoder
        (``out_px`` alone keeps its µm/px).
    epochs, batch_size, lr, weight_decay, patience
        Optimisation (AdamW, warm-up then cosine schedule, early stopping after ``patience`` epochs
        without a better validation criterion; the best epoch is kept). A batch size at least the
        number of training spots is full-batch training.
    early_stop
        The validation criterion for early stopping and for the epoch that is kept: ``"loss"`` (NB NLL
        + cell-type loss), ``"pearson"`` (mean over genes of the Pearson correlation of log1p predicted
        means with log1p counts on the validation sections), or ``"none"`` (both are still computed
        and logged every epoch, but the run trains all epochs and keeps the last one). The frozen path
        uses ``"none"``: on her2st its validation NLL is flat within noise after ~10 epochs, and its
        validation correlation peaks at epochs 4–6 (a depth-only fit, CP10k correlation ~0) before the
        annealed epochs learn gene-specific signal, so selecting on either picked early epochs that
        were 0.02–0.04 worse on the held-out sections than the recipe's fixed 150 epochs.
    rank
        Rank of the NB head's gene map (0: a full linear head).
    bagging
        Train each member on a bootstrap sample of the training spots (more diverse members, so a
        larger epistemic variance when they share frozen features).
    members, seed
        Ensemble size; member ``i`` is seeded from ``seed`` and ``i``.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    frozen_views
        Dihedral views per tile whose features are cached for the frozen path (1 or 8).
    acquisition_views
        Simulated acquisitions of the training tiles whose features the frozen path adds as further training
        views (each epoch a spot is seen in one of its views), comma-separated names of
        :mod:`stimage_nb.shifts` applied to the tiles as read (:func:`stimage_nb.shifts.shift_tiles`), then
        stain-normalised per section like any slide. ``None``: on the frozen path
        :data:`stimage_nb.shifts.TRAINING_SHIFTS` (a 4.5 µm/px scan, a 1 µm defocus with JPEG 60, and the
        stains x1.2 / x0.85 both ways), so the heads lean on features that hold under another scanner or lab;
        ``"none"``: the tiles only. Costs one feature pass over the training tiles per view.
    acquisition_share
        With ``acquisition_views``, the probability that a spot is drawn in one of its simulated acquisitions
        in a training step (uniform among them; else in its tile as scanned). ``None``: 0.5 with views
        (chosen by leave-one-patient-out and the acquisitions over every view equally likely, 0.8 with the
        default four: README, "Validation"), stays ``None`` without. The library-size ridge, the shrinkage's mean and the cross-fit's scores use the tiles as
        scanned. Chosen by leave-one-patient-out and the acquisitions (README, "Validation"). Fine-tuning
        augments its own tiles (``augment``): recorded as ``""`` there, and an error if given.
    val_sections
        Default validation sections when the caller names none.
    amp, channels_last
        bf16 autocast and channels_last memory format where the device's fast paths are on (CUDA;
        :func:`stimage_nb.devices.fast_paths`).
    stain
        ``"macenko"`` or ``"none"``.
    augment
        :class:`~stimage_nb.augment.AugmentConfig` fields (fine-tuning only).
    celltype_weight
        Weight of the cell-type loss relative to the gene NLL.
    dropout
        Dropout on the features before the heads.
    background
        ``"white"``: a black, masked background (an exported crop) is turned into white glass in every
        tile before stain normalisation and features, at training and prediction
        (:func:`stimage_nb.stain.whiten_background`); ``"keep"``: tiles as read.
    depth
        ``"section"``: the NB mean of a spot is its section's sequencing depth times a rate the heads
        predict from the image (``log mu = log(D_section / D_ref) + heads(x)``, ``D`` = mean counts per
        spot over the genes, ``D_ref`` = the training sections' median), so sections sequenced at other
        depths train together and a prediction can be given the depth of the section it is for
        (``predict_section(..., depth=...)``); ``"none"``: the heads predict counts at whatever depth the
        training sections had.
    composition
        The NB head's mean factorised as the spot's depth (a scalar head on the image features) times a
        composition over the genes (a softmax), :class:`stimage_nb.models.heads.NBHead` (``None``: on for
        the frozen path, off when fine-tuning); with
        ``depth="section"`` the section's sequencing depth multiplies both: ``mu = D_section / D_ref x
        depth(x) x composition(x)``.
    library_size
        With a composition head, how a spot's library size (its counts over the genes) is modelled.
        ``"ridge"``: the composition is trained with each spot's *observed* library size as the NB offset
        (so a spot's depth never leaks into the gene-specific part), and the log library size, centred per
        section, is regressed from the frozen features by ridge (penalty by grouped CV over the training
        sections, or quarters of a single section; member ``i`` refits it on its own bootstrap sample, so
        the members disagree about depth where the features extrapolate: epistemic variance). Its offset
        is the median over the training sections of their mean log library size, so an undirected
        prediction is at the training depth (``predict(..., depth=...)`` rescales it). ``"joint"``: the
        depth head is trained with the composition through the genes' likelihood. ``None``: ``"ridge"``
        on the frozen path with a composition head and ``depth="none"``, else ``"joint"``. ``"ridge"``
        needs the frozen path and ``depth="none"`` (it already models every spot's depth).
    composition_shrinkage
        How far the composition's deviations from the training mean composition are kept, applied after
        training to the low-rank map (``W -> s W``): the composition learned from one patient transfers only
        partly to another (README, "Validation": 1.0 loses to the ridge baseline across patients).
        ``"cv"``: a factor per gene, cross-fitted (a head trained without each group of training spots — a
        section, or a quarter of a single section —, the held-out spots' NB likelihood at factors 0, 0.1,
        ..., 1; :func:`stimage_nb.models.library_size.cross_fitted_shrinkage`), times
        ``composition_cv_scale``; costs one extra head per group. A number in (0, 1]: one factor for every
        gene (0.25 was the default before "cv"). ``None``: ``"cv"`` with ``library_size="ridge"``, else 1.0;
        anything but 1 needs ``library_size="ridge"`` (it is applied when the library size is fitted).
    composition_cv_scale
        With ``composition_shrinkage="cv"``, the fraction of each gene's cross-fitted factor applied, in
        (0, 1]: the groups of the cross-fit are sections of the training patients, which overstates how well
        a composition transfers to another patient. Default 0.25, chosen by leave-one-patient-out and the
        acquisitions among 0.25, 0.35, 0.5, 0.7 and 1 (README, "Validation"). ``None``: 0.25 (given with
        another ``composition_shrinkage``, an error; stays ``None`` there).
    member_data
        ``"all"``: every member trains on all training spots (or a bootstrap sample with ``bagging``).
        ``"groups"``: member ``i`` leaves out one group of training spots, the training sections in turn
        (a spatial quarter of the section when there is only one), so members differ in what they learned
        from and disagree more where the data they lacked matters (a larger epistemic variance off the
        training data).
    """

    frozen: bool | None = None
    extractor: str | None = None
    kmeans_k: int = 128
    kmeans_patches: int = 60000
    member_features: str = "shared"
    backbone: str | None = None
    weights: str = "none"
    backbone_kwargs: dict = field(default_factory=dict)
    tile_um: float | str | None = "auto"
    out_px: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float | None = None
    rank: int | None = None
    early_stop: str | None = None
    bagging: bool = False
    members: int = 5
    seed: int = 0
    device: str = "auto"
    frozen_views: int = 1
    acquisition_views: str | None = None
    acquisition_share: float | None = None
    patience: int | None = None
    val_sections: list[str] | None = None
    amp: bool = True
    channels_last: bool = True
    stain: str | None = None
    augment: dict = field(default_factory=lambda: AugmentConfig().to_dict())
    celltype_weight: float = 1.0
    dropout: float | None = None
    eval_batch_size: int = 256
    background: str = "keep"
    depth: str = "none"
    member_data: str = "all"
    composition: bool | None = None
    library_size: str | None = None
    composition_shrinkage: float | str | None = None
    composition_cv_scale: float | None = None

    def __post_init__(self):
        named = self.backbone is not None
        encs = _registered(self.backbone) if named else []
        if self.frozen is None:
            self.frozen = bool(self.extractor) or not named or bool(encs)
        self._resolve_geometry(encs)
        if self.extractor is None:
            self.extractor = ("timm" if named else DEFAULT_EXTRACTOR) if self.frozen else ""
        if self.backbone is None:
            self.backbone = "resnet18"
        for k, v in MODE_DEFAULTS["frozen" if self.frozen else "finetune"].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.frozen:
            from .models.features import parse_extractor

            self.extractor = "+".join(parse_extractor(self.extractor))
            if self.kmeans_k < 2 or self.kmeans_patches < self.kmeans_k:
                raise StimageInputError(f"invalid k-means settings: kmeans_k={self.kmeans_k}, "
                                        f"kmeans_patches={self.kmeans_patches}")
        if self.member_features not in ("shared", "per_member"):
            raise StimageInputError(f"member_features must be 'shared' or 'per_member', not {self.member_features!r}")
        if self.early_stop not in ("loss", "pearson", "none"):
            raise StimageInputError(f"early_stop must be 'loss', 'pearson' or 'none', not {self.early_stop!r}")
        if self.rank < 0:
            raise StimageInputError(f"rank must be >= 0 (0: full NB head), not {self.rank}")
        if self.stain not in ("macenko", "none"):
            raise StimageInputError(f"stain must be 'macenko' or 'none', not {self.stain!r}")
        if self.background not in ("keep", "white"):
            raise StimageInputError(f"background must be 'keep' or 'white', not {self.background!r}")
        if self.depth not in ("none", "section"):
            raise StimageInputError(f"depth must be 'none' or 'section', not {self.depth!r}")
        if self.library_size is None:
            self.library_size = "ridge" if (self.frozen and self.composition and self.depth == "none") else "joint"
        if self.library_size not in ("ridge", "joint"):
            raise StimageInputError(f"library_size must be 'ridge' or 'joint', not {self.library_size!r}")
        if self.library_size == "ridge":
            why = self._why_not_ridge()
            if why:
                raise StimageInputError(f"--library-size ridge (library_size='ridge') cannot be used with {why}.")
        if self.composition_shrinkage is None:
            self.composition_shrinkage = "cv" if self.library_size == "ridge" else 1.0
        if isinstance(self.composition_shrinkage, str) and self.composition_shrinkage.strip().lower() == "cv":
            self.composition_shrinkage = "cv"
        else:
            try:
                self.composition_shrinkage = float(self.composition_shrinkage)
            except (TypeError, ValueError):
                raise StimageInputError(f"--composition-shrinkage (composition_shrinkage) must be 'cv' or a number "
                                        f"in (0, 1], not {self.composition_shrinkage!r}") from None
            if not 0 < self.composition_shrinkage <= 1:
                raise StimageInputError(f"--composition-shrinkage (composition_shrinkage) must be 'cv' or in (0, 1], "
                                        f"not {self.composition_shrinkage}")
        if self.composition_cv_scale is not None and self.composition_shrinkage != "cv":
            why = (self._why_not_ridge() if self.library_size != "ridge"
                   else f"--composition-shrinkage {self.composition_shrinkage:g} (one factor for every gene)")
            raise StimageInputError(f"--composition-cv-scale scales the cross-fitted factors of --composition-shrinkage cv; "
                                    f"it does not apply with {why}.")
        if self.composition_shrinkage == "cv":
            self.composition_cv_scale = float(0.25 if self.composition_cv_scale is None else self.composition_cv_scale)
        if self.composition_cv_scale is not None and not 0 < self.composition_cv_scale <= 1:
            raise StimageInputError(f"--composition-cv-scale (composition_cv_scale) must be in (0, 1], not "
                                    f"{self.composition_cv_scale}")
        if self.composition_shrinkage != 1 and self.library_size != "ridge":
            raise StimageInputError(f"--composition-shrinkage shrinks the composition of --library-size ridge (the "
                                    f"frozen default); it does not apply with {self._why_not_ridge()}.")
        if self.member_data not in ("all", "groups"):
            raise StimageInputError(f"member_data must be 'all' or 'groups', not {self.member_data!r}")
        for flag, name, v, lo in (("--members", "members", self.members, 1), ("--epochs", "epochs", self.epochs, 1),
                                  ("--batch-size", "batch_size", self.batch_size, 2), ("--out-px", "out_px", self.out_px, 8)):
            if v < lo:
                raise StimageInputError(f"{flag} ({name}) must be at least {lo}, not {v}")
        for flag, name, v in (("--lr", "lr", self.lr), ("TrainConfig.head_lr", "head_lr", self.head_lr)):
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                      and v > 0):
                raise StimageInputError(f"{flag} ({name}) must be a finite number > 0, not {v!r}")
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise StimageInputError(f"TrainConfig.weight_decay must be a finite number >= 0, not {self.weight_decay!r}")
        ws = [w.strip() for w in str(self.weights).split(",")]
        if len(ws) > 1 and len(ws) != len(self.backbones):
            raise StimageInputError(f"{len(ws)} weights for {len(self.backbones)} backbones ({self.backbone}): give one "
                                    "weights entry per backbone, in the same order, separated by commas.")
        if self.frozen_views not in (1, 8):
            raise StimageInputError("frozen_views must be 1 or 8")
        self._resolve_acquisition_views()
        if isinstance(self.augment, AugmentConfig):
            self.augment = self.augment.to_dict()

    def _resolve_acquisition_views(self) -> None:
        from .shifts import TRAINING_SHIFTS, known_shifts

        v, share = self.acquisition_views, self.acquisition_share
        if share is not None:
            try:
                if isinstance(share, bool):
                    raise TypeError
                share = float(share)
            except (TypeError, ValueError):
                raise StimageInputError(f"--acquisition-share (acquisition_share) must be a number in (0, 1], not "
                                        f"{share!r}") from None
        if not self.frozen:
            if v not in (None, "", "none") or share is not None:
                raise StimageInputError("--acquisition-views/--acquisition-share add simulated acquisitions to the "
                                        "frozen path; fine-tuning augments its own tiles (leave them out).")
            self.acquisition_views, self.acquisition_share = "", None
            return
        if v is None:
            v = ",".join(s.name for s in TRAINING_SHIFTS)
        if isinstance(v, (list, tuple)):  # names, or Shift objects, from Python
            v = ",".join(getattr(x, "name", x) for x in v)
        names = [n.strip() for n in str(v).split(",") if n.strip()]
        if not names or names == ["none"]:
            if share is not None:
                raise StimageInputError("--acquisition-share weighs the simulated acquisitions; it does nothing "
                                        "with --acquisition-views none.")
            self.acquisition_views, self.acquisition_share = "", None
            return
        usable = {n: s for n, s in known_shifts().items() if s.background == "keep" and not s.is_identity}
        for n in names:
            if n in usable:
                continue
            why = ("a black background needs the whole image, not cut tiles" if "black" in n else
                   "the reference changes nothing" if n == "reference" else
                   "a whole set, not a name" if n in ("standard", "acquisition", "training") else "unknown")
            raise StimageInputError(f"--acquisition-views: {n!r}: {why}; give names from {sorted(usable)}, "
                                    "separated by commas, or 'none'.")
        if len(set(names)) < len(names):
            raise StimageInputError(f"--acquisition-views lists a name twice: {','.join(names)}")
        if share is None:
            share = 0.5
        if not 0 < share <= 1:
            raise StimageInputError(f"--acquisition-share (acquisition_share) must be in (0, 1] (0: use "
                                    f"--acquisition-views none), not {share}")
        self.acquisition_views, self.acquisition_share = ",".join(names), share

    def acquisition_shifts(self) -> list:
        """The :class:`~stimage_nb.shifts.Shift` objects of ``acquisition_views`` (empty when none)."""
        from .shifts import known_shifts

        return [known_shifts()[n] for n in self.acquisition_views.split(",")] if self.acquisition_views else []

    def _why_not_ridge(self) -> str | None:
        """What rules out ``library_size="ridge"`` in this config, in the user's terms, or ``None``."""
        if not self.frozen:
            return "fine-tuning (it regresses the library size on frozen features; add --frozen)"
        if not self.composition:
            return "--composition off (it needs the composition head)"
        if self.depth != "none":
            return f"--depth {self.depth} (it models every spot's depth itself; use --depth none)"
        if self.library_size != "ridge":
            return f"--library-size {self.library_size}"
        return None

    @property
    def backbones(self) -> list[str]:
        return [b.strip() for b in str(self.backbone).split(",") if b.strip()]

    def weights_for(self, backbone: str) -> str:
        """The weights of one backbone: ``weights`` itself, or its entry in a comma-separated list aligned
        with ``backbone`` (``backbone="uni,virchow2", weights="uni.safetensors,virchow2_dir"``)."""
        names = self.backbones
        ws = [w.strip() for w in str(self.weights).split(",")]
        if len(names) > 1 and len(ws) == len(names):
            return ws[names.index(backbone)]
        return str(self.weights)

    def _resolve_geometry(self, encs) -> None:
        """Tile µm and px: the user's, else the registered encoders' own (they must agree), else 150 µm/112 px."""
        um = self.tile_um
        if isinstance(um, str):
            if um.strip().lower() != "auto":
                try:
                    um = float(um)
                except ValueError:
                    raise StimageInputError(f"tile_um must be a number of µm, None or 'auto', not {um!r}") from None
            else:
                um = "auto"
        if not encs:
            self.out_px = 112 if self.out_px is None else self.out_px
            self.tile_um = 150.0 if um == "auto" else um
            return
        geo = {(e.input_px, e.um_per_px) for e in encs}
        if len(geo) > 1 and (self.out_px is None or um == "auto"):
            desc = ", ".join(f"{e.name}: {e.input_px} px at {e.um_per_px:g} µm/px" for e in encs)
            raise StimageInputError(f"the encoders were trained on different tiles ({desc}); members of one ensemble "
                                    "share one tile geometry: give --tile-um and --out-px (TrainConfig tile_um/out_px).")
        px, res = next(iter(geo))
        if self.out_px is None:
            self.out_px = int(px)
        self.tile_um = float(self.out_px) * float(res) if um == "auto" else um

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise StimageInputError(f"unknown training settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_cli(cls, args) -> "TrainConfig":
        """A config from ``stimage-nb train`` arguments; options left unset keep the defaults."""
        d = {}
        for name in ("backbone", "weights", "epochs", "members", "device", "seed", "tile_um", "out_px",
                     "batch_size", "lr", "patience", "rank", "kmeans_k", "stain"):
            v = getattr(args, name, None)
            if v is not None:
                d[name] = v
        # --backbone NAME alone fine-tunes it; with --frozen its frozen features are used; --extractor
        # names frozen branches (a 'timm' branch is the --backbone). See TrainConfig.frozen/extractor.
        if getattr(args, "extractor", None):
            d["extractor"] = args.extractor
        if getattr(args, "frozen", False):
            d["frozen"] = True
        if getattr(args, "finetune", False):
            d["frozen"] = False
        if getattr(args, "bagging", False):
            d["bagging"] = True
        if getattr(args, "member_features", None):
            d["member_features"] = args.member_features
        for name in ("background", "depth", "member_data"):
            if getattr(args, name, None):
                d[name] = getattr(args, name)
        if getattr(args, "composition", None) in ("on", "off"):
            d["composition"] = args.composition == "on"
        if getattr(args, "library_size", None):
            d["library_size"] = args.library_size
        if getattr(args, "composition_shrinkage", None) is not None:
            d["composition_shrinkage"] = args.composition_shrinkage
        if getattr(args, "composition_cv_scale", None) is not None:
            d["composition_cv_scale"] = args.composition_cv_scale
        if getattr(args, "acquisition_views", None) is not None:
            if not str(args.acquisition_views).strip(" ,"):  # e.g. an unset shell variable: say so, do not drop the views
                raise StimageInputError("--acquisition-views is empty; give names of stimage_nb.shifts separated by "
                                        "commas, or 'none' for the tiles only (leave the flag out for the default).")
            d["acquisition_views"] = args.acquisition_views
        if getattr(args, "acquisition_share", None) is not None:
            d["acquisition_share"] = args.acquisition_share
        if getattr(args, "val_sections", None):
            v = args.val_sections
            d["val_sections"] = [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v)
        return cls(**d)


def _registered(backbone: str | None) -> list:
    """The registry entries of ``backbone`` when every comma-separated name is a registered encoder, else []."""
    from .models.encoders import find_encoder

    names = [b.strip() for b in str(backbone or "").split(",") if b.strip()]
    entries = [find_encoder(n) for n in names]
    return entries if names and all(entries) else []
