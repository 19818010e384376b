"""Random-contrast images painted from label maps (SynthMorph's recipe, Hoffmann et al.,
IEEE TMI 2022), so that a network learns anatomy rather than one scanner's intensities.

:func:`tissue_map` turns an organ label map into a map of "tissues": the organs keep their
labels, the body around them (an ellipse grown from the organs, :func:`body_mask`) and its
fat rim become tissues of their own, and the unlabelled body is cut into random sub-regions
(a Voronoi partition around random seeds) so that it has structure too; air is 0.
:func:`random_contrast_image` paints every tissue with a random mean and spread, then
applies a random blur, a smooth multiplicative bias field, a gamma and noise, and scales
the result to [0, 1]. Tissue maps are warped like label maps, so the two images of a
training pair can share anatomy under a known field while their contrasts differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ranreg.data.synth_images import body_mask, smooth_field

__all__ = ["random_contrast_image", "tissue_map"]


def tissue_map(
    labels: np.ndarray,
    spacing: Sequence[float],
    rng: np.random.Generator,
    *,
    subregions: tuple[int, int] = (4, 12),
    body_axis: int = 2,
) -> np.ndarray:
    """int32 tissue map: organ labels as they are, then (above the largest label) the fat
    rim, and ``subregions`` (random count in the range) Voronoi cells of the remaining body;
    0 outside the body."""
    lab = np.asarray(labels)
    if lab.ndim != 3 or lab.dtype.kind not in "iu":
        raise ValueError(f"expected a 3D integer label map, got {lab.dtype} {lab.shape}")
    body, fat = body_mask(lab, spacing, rng, body_axis=body_axis)
    top = int(lab.max()) + 1
    out = lab.astype(np.int32)
    tissue = body & (lab == 0)
    cells = int(rng.integers(subregions[0], subregions[1] + 1))
    where = np.argwhere(tissue)
    if len(where) and cells > 0:
        seeds = where[rng.choice(len(where), size=min(cells, len(where)), replace=False)]
        nearest = _nearest_seed(lab.shape, seeds, np.asarray(spacing, dtype=np.float64))
        out[tissue] = top + 1 + nearest[tissue]
    out[fat & (lab == 0)] = top
    return out


def _nearest_seed(shape: tuple[int, ...], seeds: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Index of the nearest seed (in mm) for every voxel."""
    best = np.full(shape, np.inf, dtype=np.float32)
    index = np.zeros(shape, dtype=np.int32)
    axes = [(np.arange(n, dtype=np.float32) * s) for n, s in zip(shape, spacing, strict=True)]
    for k, seed in enumerate(seeds):
        d = [((a - float(c) * s) ** 2) for a, c, s in zip(axes, seed, spacing, strict=True)]
        dist = d[0][:, None, None] + d[1][None, :, None] + d[2][None, None, :]
        closer = dist < best
        best[closer] = dist[closer]
        index[closer] = k
    return index


def random_contrast_image(
    tissues: np.ndarray,
    rng: np.random.Generator,
    *,
    spacing: Sequence[float] = (8.0, 8.0, 8.0),
    spread: float = 0.1,
    blur_mm: tuple[float, float] = (0.0, 8.0),
    bias: float = 0.3,
    gamma_sd: float = 0.25,
    noise: tuple[float, float] = (0.0, 0.05),
) -> np.ndarray:
    """float32 image in [0, 1] of a tissue map (see :func:`tissue_map`).

    Each tissue value gets a mean ``U(0, 1)`` and a within-tissue noise sd ``U(0, spread)``
    (air too: a tissue like the others, so the network never relies on a dark background).
    Then: gaussian blur of sd ``U(*blur_mm)`` mm, a multiplicative bias
    ``exp(bias * N(0, 1) smooth over 100 mm)``, min-max scaling, a gamma ``exp(N(0,
    gamma_sd))``, additive gaussian noise of sd ``U(*noise)``, and min-max scaling again.
    """
    tis = np.asarray(tissues)
    if tis.dtype.kind not in "iu" or tis.size == 0 or tis.min() < 0:
        raise ValueError("tissues must be a non-empty, non-negative integer map")
    n = int(tis.max()) + 1
    means = rng.uniform(0.0, 1.0, size=n).astype(np.float32)
    sds = rng.uniform(0.0, spread, size=n).astype(np.float32)
    img = means[tis] + sds[tis] * rng.standard_normal(tis.shape, dtype=np.float32)
    sp = [float(s) for s in spacing]
    sigma_mm = float(rng.uniform(*blur_mm))
    if sigma_mm > 0:
        img = ndimage.gaussian_filter(img, [sigma_mm / s for s in sp], mode="nearest")
    if bias > 0:
        img *= np.exp(np.float32(bias) * smooth_field(tis.shape, sp, 100.0, rng))
    img = _unit_range(img)
    img **= np.float32(np.exp(rng.normal(0.0, gamma_sd)))
    img += np.float32(rng.uniform(*noise)) * rng.standard_normal(tis.shape, dtype=np.float32)
    return _unit_range(img)


def _unit_range(img: np.ndarray) -> np.ndarray:
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros_like(img, dtype=np.float32)
    return ((img - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32, copy=False)
