"""Procedural subjects (ellipsoid 'organs' in a body) for tests and quick smoke runs.

No files and no downloads: each subject is an image in [0, 1] and an integer label map
of the same shape, in 2D or 3D, drawn from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def shapes_subject(
    shape: Sequence[int], rng: np.random.Generator, n_organs: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """One subject: a bright elliptic body holding ``n_organs`` labelled ellipsoids.

    Organ k has label k and mean intensity 0.35 + 0.15 k (so neighbours differ); the
    image gets mild smooth texture and noise. Positions and radii vary per subject so
    that pairs of subjects need a real deformation to align.
    """
    shape = tuple(int(n) for n in shape)
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"))
    centre = np.array([(n - 1) / 2 for n in shape], dtype=np.float32)
    size = np.array(shape, dtype=np.float32)

    def ellipsoid(c: np.ndarray, r: np.ndarray) -> np.ndarray:
        d = (grid - c.reshape(-1, *([1] * len(shape)))) / r.reshape(-1, *([1] * len(shape)))
        return (d**2).sum(0) <= 1.0

    body = ellipsoid(centre, size * rng.uniform(0.40, 0.46, len(shape)))
    image = np.where(body, 0.2, 0.0).astype(np.float32)
    labels = np.zeros(shape, dtype=np.int16)
    for k in range(1, n_organs + 1):
        c = (
            centre
            + np.array([-0.15, 0.0, 0.15][(k - 1) % 3]) * size
            + size * rng.uniform(-0.07, 0.07, len(shape))
        )
        r = size * rng.uniform(0.09, 0.14, len(shape))
        organ = ellipsoid(c, r) & body
        labels[organ] = k
        image[organ] = 0.35 + 0.15 * k
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    image += body * 0.15 * texture / (np.abs(texture).max() + 1e-6)
    image += 0.01 * rng.standard_normal(shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels


def shapes_subjects(
    shape: Sequence[int], count: int, seed: int = 0, n_organs: int = 3
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``count`` subjects named ``shapes000``, ... each from ``default_rng([seed, i])``."""
    return [
        (f"shapes{i:03d}", *shapes_subject(shape, np.random.default_rng([seed, i]), n_organs))
        for i in range(count)
    ]
