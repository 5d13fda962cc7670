"""Macenko stain normalisation in PyTorch (runs on the tiles' device: CPU or GPU).

Macenko et al. (ISBI 2009): in optical density (OD) space, H&E pixels lie in the plane of the two
stain vectors. The plane is found from the two main eigenvectors of the OD covariance; the stain
vectors are the extreme angles (``alpha`` and ``100 - alpha`` percentiles) of the pixels projected
onto it; concentrations are solved by least squares and their 99th percentile gives each stain's
maximum.

:class:`MacenkoNormalizer` is *fitted* to a reference tile set (the target stain matrix and maximum
concentrations). A section's own stain matrix is *estimated* once from all its tiles (pooled pixels
are far more stable than the few thousand tissue pixels of one small tile), and every tile of the
section is then mapped to the reference:

    C = pinv(HE_src) · OD,   C' = C · maxC_ref / maxC_src,   I = Io · exp(−HE_ref · C').

The mapping is a per-pixel linear map in OD space, so it is cheap on any device.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: Ruifrok & Johnston (2001) stain vectors (rows: hematoxylin, eosin, DAB; unit optical-density vectors
#: per RGB channel): the fixed colour deconvolution used by the handcrafted features and the simulated
#: restaining of :mod:`stimage_nb.shifts`.
RUIFROK_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
RUIFROK_HED = RUIFROK_HED / np.linalg.norm(RUIFROK_HED, axis=1, keepdims=True)

# A commonly used H&E reference (Macenko's/torchstain's defaults); columns = hematoxylin, eosin.
HE_REF = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MAXC_REF = (1.9705, 1.0308)
MIN_PIXELS = 500
MAX_PIXELS = 1_000_000


def _as_tensor(tiles, device=None) -> Tensor:
    t = tiles if isinstance(tiles, Tensor) else torch.from_numpy(np.ascontiguousarray(tiles))
    return t.to(device) if device is not None else t


def optical_density(rgb_uint8: Tensor, Io: float = 240.0) -> Tensor:
    """OD = −log((I + 1) / Io) of uint8 RGB (..., 3), as float32."""
    return -torch.log((rgb_uint8.float() + 1.0) / Io)


def estimate_stains(tiles, *, Io: float = 240.0, alpha: float = 1.0, beta: float = 0.15,
                    max_pixels: int = MAX_PIXELS, device=None) -> tuple[Tensor, Tensor] | None:
    """Stain matrix (3, 2: hematoxylin, eosin; unit columns) and 99th-percentile concentrations (2,).

    ``tiles``: uint8 (..., 3) array or tensor, any number of tiles. Returns ``None`` when fewer than
    500 pixels carry stain (e.g. blank glass).
    """
    x = _as_tensor(tiles, device).reshape(-1, 3)
    if x.shape[0] > max_pixels:  # a deterministic, evenly spread subsample
        step = -(-x.shape[0] // max_pixels)
        x = x[::step]
    od = optical_density(x, Io)
    od = od[(od > beta).all(dim=1)]
    if od.shape[0] < MIN_PIXELS:
        return None
    od64 = od.double()
    cov = torch.cov(od64.T)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    v = vecs[:, [1, 2]]
    proj = od64 @ v
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    lo, hi = torch.quantile(phi, torch.tensor([alpha / 100, 1 - alpha / 100], dtype=phi.dtype, device=phi.device))
    v1 = v @ torch.stack([torch.cos(lo), torch.sin(lo)])
    v2 = v @ torch.stack([torch.cos(hi), torch.sin(hi)])
    v1 = v1 * torch.sign(v1.sum())
    v2 = v2 * torch.sign(v2.sum())
    he = torch.stack([v1, v2], 1) if v1[0] > v2[0] else torch.stack([v2, v1], 1)  # hematoxylin has more red OD
    he = he / torch.linalg.norm(he, dim=0, keepdim=True)
    conc = torch.linalg.lstsq(he, od64.T).solution  # (2, n)
    maxc = torch.quantile(conc, 0.99, dim=1).clamp_min(1e-3)
    return he.float(), maxc.float()


class MacenkoNormalizer:
    """Macenko normalisation to a reference (see module docstring).

    Parameters
    ----------
    Io
        Transmitted light intensity (background brightness).
    alpha
        Percentile of the angle extremes.
    beta
        OD threshold below which pixels count as background.
    """

    method = "macenko"

    def __init__(self, Io: float = 240.0, alpha: float = 1.0, beta: float = 0.15):
        self.Io, self.alpha, self.beta = float(Io), float(alpha), float(beta)
        self.target_he = torch.tensor(HE_REF, dtype=torch.float32)
        self.target_maxc = torch.tensor(MAXC_REF, dtype=torch.float32)
        self.fitted = False

    def fit(self, reference_tiles) -> "MacenkoNormalizer":
        """Fit the target stain matrix and maximum concentrations to reference tiles (uint8, (..., 3))."""
        est = estimate_stains(reference_tiles, Io=self.Io, alpha=self.alpha, beta=self.beta)
        if est is None:
            log.warning("Macenko reference has too few stained pixels; keeping the default H&E reference")
        else:
            self.target_he, self.target_maxc = est[0].cpu(), est[1].cpu()
            self.fitted = True
        return self

    def estimate(self, tiles, device=None) -> tuple[Tensor, Tensor] | None:
        """The source stain matrix and maximum concentrations of some tiles (one section)."""
        return estimate_stains(tiles, Io=self.Io, alpha=self.alpha, beta=self.beta, device=device)

    def transform(self, tiles, source: tuple[Tensor, Tensor] | None = None, *, batch_size: int = 1024,
                  device=None) -> Tensor:
        """Normalise uint8 tiles (n, h, w, 3) to the reference; returns a uint8 tensor on ``device``.

        ``source``: the section's stain estimate (from :meth:`estimate`); estimated from ``tiles``
        themselves when omitted. When it cannot be estimated (blank tiles) the tiles are returned as
        they are.
        """
        x = _as_tensor(tiles)
        device = torch.device(device) if device is not None else x.device
        if source is None:
            source = self.estimate(x, device=device)
        if source is None:
            log.warning("too few stained pixels to estimate the stains; tiles left unnormalised")
            return x.to(device)
        M, shift = self._mapping(source, device)
        out = torch.empty(x.shape, dtype=torch.uint8, device=device)
        for i in range(0, x.shape[0], batch_size):
            out[i:i + batch_size] = self.apply(x[i:i + batch_size].to(device), M, shift)
        return out

    def _mapping(self, source, device) -> tuple[Tensor, Tensor]:
        he_s, maxc_s = (t.to(device).float() for t in source)
        he_t, maxc_t = self.target_he.to(device), self.target_maxc.to(device)
        # OD_out = HE_t · diag(maxC_t / maxC_s) · pinv(HE_s) · OD  -> one 3x3 matrix
        M = he_t @ torch.diag(maxc_t / maxc_s) @ torch.linalg.pinv(he_s)
        return M, torch.zeros(3, device=device)

    def apply(self, x_uint8: Tensor, M: Tensor, shift: Tensor | None = None) -> Tensor:
        """Map uint8 RGB (..., 3) through the OD-space matrix ``M``; returns uint8."""
        od = optical_density(x_uint8, self.Io)
        od = od @ M.T
        if shift is not None:
            od = od + shift
        return (self.Io * torch.exp(-od)).clamp_(0, 255).round_().to(torch.uint8)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return {"method": self.method, "Io": self.Io, "alpha": self.alpha, "beta": self.beta, "fitted": self.fitted,
                "target_he": self.target_he.tolist(), "target_maxc": self.target_maxc.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "MacenkoNormalizer":
        n = cls(Io=d.get("Io", 240.0), alpha=d.get("alpha", 1.0), beta=d.get("beta", 0.15))
        n.target_he = torch.tensor(d["target_he"], dtype=torch.float32)
        n.target_maxc = torch.tensor(d["target_maxc"], dtype=torch.float32)
        n.fitted = bool(d.get("fitted", True))
        return n


#: Pixels whose brightest channel is at most this are masked background (a black export), not tissue: on the
#: her2st scans 0.01-0.09% of tile pixels (the darkest nuclear specks) are that dark.
BLACK_LEVEL = 40
BACKGROUNDS = ("keep", "white")


def whiten_background(tiles, background: str = "white", *, level: int = BLACK_LEVEL):
    """Tiles with a black, masked background turned into white glass (uint8 (..., 3), numpy or torch).

    Images cropped or exported from analysis tools often carry a black background outside the tissue
    (``stimage_nb.shifts.Shift(background="black")`` simulates it); a scanner's glass is white. Black
    pixels have the highest optical density of all, so they break the stain estimate (Macenko) and every
    feature that counts dark or stained pixels, and the model sees tissue where there is none. With
    ``background="white"`` every pixel whose brightest channel is at most ``level`` becomes (255, 255,
    255), the glass a scan shows; ``"keep"`` returns the tiles unchanged. Same type and device as the input.
    """
    if background == "keep":
        return tiles
    if background != "white":
        raise ValueError(f"background must be one of {BACKGROUNDS}, not {background!r}")
    if isinstance(tiles, Tensor):
        dark = tiles.amax(dim=-1, keepdim=True) <= level
        return torch.where(dark, torch.full_like(tiles, 255), tiles)
    t = np.asarray(tiles)
    dark = t.max(axis=-1, keepdims=True) <= level
    return np.where(dark, np.uint8(255), t).astype(t.dtype, copy=False)


def normalizer_from_dict(d: dict | None) -> MacenkoNormalizer | None:
    """The normaliser described by a JSON config entry (``None`` or ``{"method": "none"}``: none)."""
    if not d or d.get("method", "none") == "none":
        return None
    if d["method"] != "macenko":
        raise ValueError(f"unknown stain normalisation {d['method']!r}")
    return MacenkoNormalizer.from_dict(d)
