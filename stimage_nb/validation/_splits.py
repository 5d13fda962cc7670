"""Validation protocols as splitters: each yields :class:`Split` objects with whole sections or patients held out.

A protocol is a splitter in the sense of scikit-learn's model selection (``LeaveOneGroupOut`` with groups =
sections, patients or platforms): :meth:`Protocol.split` takes the manifest's sections (as
:class:`SectionInfo`: name, patient, platform, whether it has counts) and yields the folds. A section is
never in the training and the test set of the same fold, and with the patient protocol no section of a
test patient is trained on (``tests/validation/test_splits.py`` checks both for every protocol).

- :class:`LeaveOneSectionOut`: every section with counts is tested once, trained on all the others.
- :class:`LeaveOnePatientOut`: every patient is held out once, trained on all other patients' sections
  and tested on each of its sections: with patients B and C, train C -> test B4 **and** train B4 -> test
  each C section.
- :class:`CrossPlatform`: train on the rows of one ``platform``, test on the rows of another (every
  ordered pair, or the pair named).
- :class:`Acquisition`: the folds of a base protocol (leave-one-patient-out by default) whose test sections
  are also re-made under simulated acquisitions (:data:`stimage_nb.shifts.ACQUISITION_SHIFTS`).

A protocol the manifest cannot support (one patient for leave-one-patient-out, one platform for
cross-platform) raises :class:`~stimage_nb.errors.StimageInputError` with a one-line reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from .. import _keys as K
from ..errors import StimageInputError
from ..shifts import ACQUISITION_SHIFTS, Shift

log = logging.getLogger(__name__)

#: The protocols by name (``stimage-nb validate --protocol``); ``"all"`` runs every one the manifest supports.
PROTOCOLS = ("loso", "lopo", "cross_platform", "acquisition")
DEFAULT_PLATFORM = "st"


def platform_of(section) -> str:
    """The platform of a :class:`~stimage_nb.io.section.Section`: ``section.platform`` when readers set it,
    else ``adata.uns["stimage_nb"]["platform"]``, else ``"st"`` (legacy Spatial Transcriptomics)."""
    p = getattr(section, "platform", None)
    if not p:
        uns = section.adata.uns.get(K.UNS) or {}
        p = uns.get("platform") if hasattr(uns, "get") else None
    p = str(p).strip().lower() if p is not None and str(p).strip() not in ("", "nan", "None") else DEFAULT_PLATFORM
    return p


@dataclass(frozen=True)
class SectionInfo:
    """What a protocol needs to know of a section."""

    name: str
    patient: str
    platform: str = DEFAULT_PLATFORM
    has_counts: bool = True

    @classmethod
    def of(cls, section) -> "SectionInfo":
        patient = section.patient if section.patient not in (None, "", "nan") else section.name
        return cls(section.name, str(patient), platform_of(section), bool(section.has_counts))


@dataclass(frozen=True)
class Split:
    """One fold: train on ``train`` (and ``val``, held out of fitting), score ``test``.

    Attributes
    ----------
    protocol
        The protocol's name (``"loso"``, ``"lopo"``, ``"cross_platform"``, ``"acquisition"``).
    fold
        A name unique within the protocol (e.g. ``"test_B"`` or ``"train_st_test_visium"``).
    train, val, test
        Section names; ``val`` (may be empty) is scored every epoch but never fitted on.
    held_out
        The group held out: a section, a patient or a platform.
    shifts
        Acquisitions under which every test section is also scored (``()``: only as scanned).
    """

    protocol: str
    fold: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    held_out: str
    val: tuple[str, ...] = ()
    shifts: tuple[Shift, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.protocol}:{self.fold}"

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "fold": self.fold, "train": list(self.train), "val": list(self.val),
                "test": list(self.test), "held_out": self.held_out, "shifts": [s.to_dict() for s in self.shifts]}


def _infos(sections) -> list[SectionInfo]:
    out = [s if isinstance(s, SectionInfo) else SectionInfo.of(s) for s in sections]
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise StimageInputError(f"duplicate section names {sorted({n for n in names if names.count(n) > 1})}")
    return out


def _with_counts(infos: list[SectionInfo]) -> list[SectionInfo]:
    return [s for s in infos if s.has_counts]


class Protocol:
    """Base class: ``split(sections) -> Iterator[Split]`` (cf. scikit-learn's splitters)."""

    name = ""

    def split(self, sections: Iterable) -> Iterator[Split]:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_n_splits(self, sections: Iterable) -> int:
        return sum(1 for _ in self.split(sections))


def _logo(groups: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """scikit-learn's LeaveOneGroupOut over ``groups``: (train idx, test idx, held-out group), in group order."""
    from sklearn.model_selection import LeaveOneGroupOut

    g = np.asarray(groups, dtype=object)
    order = list(dict.fromkeys(groups))
    folds = list(LeaveOneGroupOut().split(np.zeros(len(g)), groups=g))
    folds.sort(key=lambda f: order.index(g[f[1][0]]))
    for tr, te in folds:
        yield tr, te, str(g[te[0]])


class LeaveOneSectionOut(Protocol):
    """Test every section with counts once; train on every other section with counts."""

    name = "loso"

    def split(self, sections) -> Iterator[Split]:
        infos = _with_counts(_infos(sections))
        if len(infos) < 2:
            raise StimageInputError(f"leave-one-section-out needs at least 2 sections with counts, the manifest has "
                                    f"{len(infos)} ({[s.name for s in infos]}).")
        for tr, _te, held in _logo([s.name for s in infos]):
            yield Split(self.name, f"test_{held}", tuple(infos[i].name for i in tr), (held,), held)


class LeaveOnePatientOut(Protocol):
    """Hold out each patient in turn (every direction); its sections are the test set.

    Parameters
    ----------
    patients
        Only these held-out patients (default: every patient).
    """

    name = "lopo"

    def __init__(self, patients: Sequence[str] | None = None):
        self.patients = None if patients is None else [str(p) for p in patients]

    def split(self, sections) -> Iterator[Split]:
        infos = _with_counts(_infos(sections))
        pats = list(dict.fromkeys(s.patient for s in infos))
        if len(pats) < 2:
            raise StimageInputError(f"leave-one-patient-out needs sections of at least 2 patients with counts; the "
                                    f"manifest has {len(pats)} ({pats}): add the 'patient' column or more patients.")
        if self.patients is not None:
            bad = [p for p in self.patients if p not in pats]
            if bad:
                raise StimageInputError(f"leave-one-patient-out: unknown patients {bad}; the manifest has {pats}.")
        for tr, te, held in _logo([s.patient for s in infos]):
            if self.patients is not None and held not in self.patients:
                continue
            yield Split(self.name, f"test_{held}", tuple(infos[i].name for i in tr), tuple(infos[i].name for i in te),
                        held)


class CrossPlatform(Protocol):
    """Train on the sections of one platform, test on those of another.

    Parameters
    ----------
    train_platform, test_platform
        The pair (default: every ordered pair of platforms with counts).
    """

    name = "cross_platform"

    def __init__(self, train_platform: str | None = None, test_platform: str | None = None):
        self.train_platform = train_platform.lower() if train_platform else None
        self.test_platform = test_platform.lower() if test_platform else None

    def split(self, sections) -> Iterator[Split]:
        infos = _with_counts(_infos(sections))
        plats = list(dict.fromkeys(s.platform for s in infos))
        if len(plats) < 2:
            raise StimageInputError(f"cross-platform validation needs sections of at least 2 platforms with counts; "
                                    f"the manifest has {plats} (set the manifest's 'platform' column).")
        for p in (self.train_platform, self.test_platform):
            if p is not None and p not in plats:
                raise StimageInputError(f"cross-platform: no sections with counts on platform {p!r}; the manifest "
                                        f"has {plats}.")
        for a in plats:
            for b in plats:
                if a == b or (self.train_platform and a != self.train_platform) or \
                        (self.test_platform and b != self.test_platform):
                    continue
                yield Split(self.name, f"train_{a}_test_{b}", tuple(s.name for s in infos if s.platform == a),
                            tuple(s.name for s in infos if s.platform == b), b)


class Acquisition(Protocol):
    """The folds of ``base`` with every test section also re-made under ``shifts``.

    Parameters
    ----------
    base
        The protocol whose folds are used (default :class:`LeaveOnePatientOut`: a new acquisition of another
        patient's slide, the hardest case).
    shifts
        Simulated acquisitions (default :data:`stimage_nb.shifts.ACQUISITION_SHIFTS`); the identity is
        always scored too, as ``reference``.
    """

    name = "acquisition"

    def __init__(self, base: Protocol | None = None, shifts: Sequence[Shift] | None = None):
        self.base = base or LeaveOnePatientOut()
        sh = list(shifts if shifts is not None else ACQUISITION_SHIFTS)
        if not any(s.is_identity for s in sh):
            sh.insert(0, Shift("reference"))
        self.shifts = tuple(sh)

    def split(self, sections) -> Iterator[Split]:
        for s in self.base.split(sections):
            yield Split(self.name, f"{s.protocol}_{s.fold}", s.train, s.test, s.held_out, s.val, self.shifts)


def make_protocol(name: str, **kw) -> Protocol:
    """A protocol by name (:data:`PROTOCOLS`), with its options."""
    n = str(name).strip().lower().replace("-", "_")
    if n == "loso":
        return LeaveOneSectionOut()
    if n == "lopo":
        return LeaveOnePatientOut(kw.get("patients"))
    if n == "cross_platform":
        return CrossPlatform(kw.get("train_platform"), kw.get("test_platform"))
    if n == "acquisition":
        base = make_protocol(kw.get("base", "lopo"), **{k: v for k, v in kw.items() if k != "base"})
        return Acquisition(base, kw.get("shifts"))
    raise StimageInputError(f"unknown validation protocol {name!r}; choose from {list(PROTOCOLS)} or 'all'.")


def make_splits(sections, protocol: str | Protocol | Sequence[str], *, val: str = "none", **kw) -> list[Split]:
    """The folds of one or several protocols over ``sections`` (Sections or :class:`SectionInfo`).

    Parameters
    ----------
    sections
        The manifest's sections.
    protocol
        A name of :data:`PROTOCOLS`, a :class:`Protocol`, a list of names, or ``"all"`` (every protocol the
        sections support; the others are skipped with a log line, not an error).
    val
        ``"none"``: no validation section (the default recipe trains a fixed number of epochs); ``"last"``:
        the last training section of the held-out group's complement is held out of fitting for validation
        (only where at least two training sections remain).
    kw
        Protocol options (``patients``, ``train_platform``, ``test_platform``, ``shifts``, ``base``).

    Raises
    ------
    StimageInputError
        When a named protocol cannot run on these sections (one patient, one platform, ...).
    """
    infos = _infos(sections)
    if isinstance(protocol, Protocol):
        protos, optional = [protocol], False
    else:
        names = [protocol] if isinstance(protocol, str) else list(protocol)
        optional = names == ["all"]
        if optional:
            names = list(PROTOCOLS)
        protos = [make_protocol(n, **kw) for n in names]
    out: list[Split] = []
    for p in protos:
        try:
            splits = list(p.split(infos))
        except StimageInputError as e:
            if not optional:
                raise
            log.info("protocol %s skipped: %s", p.name, e)
            continue
        out += [_with_val(s, val) for s in splits]
    if not out:
        raise StimageInputError("no validation fold can be made from these sections.")
    return out


def skipped_protocols(sections, protocol) -> dict[str, str]:
    """For ``protocol="all"``: the protocols the sections cannot support, with the reason."""
    if protocol != "all" and protocol != ["all"]:
        return {}
    infos = _infos(sections)
    out = {}
    for n in PROTOCOLS:
        try:
            list(make_protocol(n).split(infos))
        except StimageInputError as e:
            out[n] = str(e)
    return out


def _with_val(s: Split, val: str) -> Split:
    if val == "none" or len(s.train) < 2:
        return s
    if val != "last":
        raise StimageInputError(f"val must be 'none' or 'last', not {val!r}")
    return Split(s.protocol, s.fold, s.train[:-1], s.test, s.held_out, (s.train[-1],), s.shifts)
