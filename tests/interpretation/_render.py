"""A rendered H&E image with known nuclei (for the segmentation test the issue asks for).

Beer-Lambert with the Ruifrok-Johnston stain vectors: every pixel's optical density is
``h * H + e * E`` (log10 units), with eosin everywhere (cytoplasm/stroma, smoothly varying) and
haematoxylin in the nuclei (textured) plus a faint haze; the image is blurred by a small point
spread and given sensor noise. Nuclei are ellipses of known size and orientation, some in touching
pairs (the case the watershed must split).
"""

from __future__ import annotations

import numpy as np

from stimage_nb.stain import RUIFROK_HED


def render_nuclei(size: int = 512, um_per_px: float = 0.5, n_single: int = 30, n_pairs: int = 6, seed: int = 0):
    """(rgb uint8 (size, size, 3), labels int32 of the true nuclei, true areas in µm² (n,))."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    labels = np.zeros((size, size), np.int32)
    centres: list[tuple[float, float, float]] = []

    def free(cx, cy, r):
        return all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 4) ** 2 for x, y, rr in centres)

    def draw(cx, cy, a, b, th):
        k = labels.max() + 1
        c, s = np.cos(th), np.sin(th)
        u = (xx - cx) * c + (yy - cy) * s
        v = -(xx - cx) * s + (yy - cy) * c
        m = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        labels[m & (labels == 0)] = k

    margin = 24
    placed = 0
    while placed < n_pairs:  # touching pairs: two round-ish nuclei whose outlines meet
        r1, r2 = rng.uniform(3.2, 4.2, 2) / um_per_px
        cx, cy = rng.uniform(margin + 20, size - margin - 20, 2)
        ang = rng.uniform(0, np.pi)
        dx, dy = np.cos(ang) * (r1 + r2) * 0.98, np.sin(ang) * (r1 + r2) * 0.98
        if free(cx, cy, r1 + r2 * 2) and free(cx + dx, cy + dy, r2):
            draw(cx, cy, r1, r1 * 0.9, ang)
            draw(cx + dx, cy + dy, r2, r2 * 0.9, ang)
            centres += [(cx, cy, r1), (cx + dx, cy + dy, r2)]
            placed += 1
    placed = 0
    while placed < n_single:
        a = rng.uniform(3.0, 5.0) / um_per_px
        b = a * rng.uniform(0.55, 0.95)
        cx, cy = rng.uniform(margin, size - margin, 2)
        if free(cx, cy, a):
            draw(cx, cy, a, b, rng.uniform(0, np.pi))
            centres.append((cx, cy, a))
            placed += 1
    eosin = 0.25 + 0.08 * ndi.gaussian_filter(rng.normal(size=(size, size)), 12) * 12
    hema = 0.04 + 0.02 * ndi.gaussian_filter(rng.normal(size=(size, size)), 3) * 3
    tex = 0.85 + 0.1 * ndi.gaussian_filter(rng.normal(size=(size, size)), 1.0) * 2
    nuc = labels > 0
    hema = np.where(nuc, np.clip(tex, 0.5, 1.3), hema)
    eosin = np.where(nuc, 0.12, eosin)
    od = hema[..., None] * RUIFROK_HED[0] + np.clip(eosin, 0.05, None)[..., None] * RUIFROK_HED[1]
    od = ndi.gaussian_filter(od, (0.4 / um_per_px, 0.4 / um_per_px, 0))
    rgb = 255.0 * 10.0 ** (-od) + rng.normal(0, 2.0, od.shape)
    areas = np.bincount(labels.ravel())[1:] * um_per_px ** 2
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8), labels, areas
