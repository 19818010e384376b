"""Helpers shared by several test files: small synthetic NIfTI files and a tiny training config."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def smooth_image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Gaussian-smoothed white noise (sigma 2 voxels), float32: texture for registration."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None) -> Path:
    """Write ``array`` with ``affine`` as a NIfTI-1 file at ``path`` and return the path."""
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def shapes_config(steps=(3, 3), name="RAN0", size=(40, 48), **extra) -> dict:
    cfg = {
        "seed": 0,
        "model": {"name": name, "ndim": 2, "heads": 4},
        "data": {"shapes": {"size": list(size), "count": 6}, "val": 2, "organs": None},
        "stages": [
            {
                "kind": "synthetic",
                "steps": steps[0],
                "lr": 1e-3,
                "batch_size": 2,
                "deformation": {"max_angle": 0.2},
            },
            {
                "kind": "unsupervised",
                "steps": steps[1],
                "lr": 1e-3,
                "batch_size": 2,
                "ncc_window": 5,
                "weights": {"dice": 0.5},
            },
        ],
        "checkpoint_every": 2,
        "val_every": 100,
        "val_pairs": 2,
    }
    cfg.update(extra)
    return cfg
