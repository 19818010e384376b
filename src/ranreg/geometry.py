"""World-space grids and sampling shared by the registration steps.

Every step of ``ranreg register`` (affine pre-alignment, network, instance optimisation,
output) works on a *cell grid* over the fixed image's field of view: ``n'`` cells per axis
laid out exactly like :func:`ranreg.data.preprocess.resample` lays them, so cell ``j``
has its centre at fixed voxel ``step * (j + 0.5) - 0.5`` with ``step = n / n'``. This is
also the ``align_corners=False`` convention of :func:`ranreg.spatial.resize_ddf`, so a
field moves between cell grids of one image with ``resize_ddf``. Points are kept as
``(3, *T)`` tensors of voxel coordinates; a 4x4 matrix maps them between frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ranreg.data.io import Volume, spacing_from_affine

__all__ = [
    "apply_affine",
    "cell_grid",
    "cell_centres",
    "sample",
    "area_downsample",
    "labels_on_grid",
    "label_tensor",
]


def apply_affine(matrix: np.ndarray | Tensor, points: Tensor) -> Tensor:
    """A 4x4 ``matrix`` applied to points ``(3, *T)``."""
    m = torch.as_tensor(matrix, dtype=points.dtype, device=points.device)
    shape = (3,) + (1,) * (points.dim() - 1)
    return torch.einsum("ij,j...->i...", m[:3, :3], points) + m[:3, 3].view(shape)


def cell_grid(
    fixed: Volume, spacing: Sequence[float] | None
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape of the cell grid of about ``spacing`` mm over ``fixed`` and its cell size in
    fixed voxels (``step`` per axis); ``None``: the fixed grid itself (step 1)."""
    shape = np.array(fixed.shape, dtype=np.float64)
    if spacing is None:
        return tuple(int(s) for s in shape), np.ones(3)  # type: ignore[return-value]
    out = np.maximum(np.round(shape * np.asarray(fixed.spacing) / np.asarray(spacing)), 2)
    return tuple(int(s) for s in out), shape / out  # type: ignore[return-value]


def cell_centres(shape: Sequence[int], step: np.ndarray, device: torch.device | str) -> Tensor:
    """``(3, *shape)`` centres of the cells of a cell grid, in fixed voxel coordinates."""
    axes = [
        torch.arange(int(n), dtype=torch.float64, device=device) * float(s) + 0.5 * (float(s) - 1)
        for n, s in zip(shape, step, strict=True)
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def sample(src: Tensor, coords: Tensor, mode: str, fill: float | None) -> Tensor:
    """Sample ``src`` ``(1, C, *S)`` at voxel coordinates ``coords`` ``(3, *T)``.

    Linear (``mode="bilinear"``) or ``"nearest"``; points within half a voxel of the grid
    take the border value, points further out take ``fill`` (``None``: the border value
    everywhere). Returns ``(*T)`` for one channel, else ``(C, *T)``.
    """
    shape = src.shape[2:]
    n = torch.tensor(shape, dtype=coords.dtype, device=coords.device).view(3, 1, 1, 1)
    scale = torch.where(n > 1, 2.0 / (n - 1).clamp_min(1), torch.zeros_like(n))
    grid = (coords * scale - 1.0).flip(0).movedim(0, -1)[None].to(src.dtype)
    out = F.grid_sample(src, grid, mode=mode, padding_mode="border", align_corners=True)[0]
    if fill is not None:
        outside = ((coords < -0.5) | (coords > n - 0.5)).any(dim=0)
        out = out.masked_fill(outside, fill)
    return out[0] if out.shape[0] == 1 else out


def area_downsample(image: Tensor, affine: np.ndarray, spacing: float) -> tuple[Tensor, np.ndarray]:
    """Average ``image`` ``(1, 1, *S)`` over blocks of whole voxels no larger than
    ``spacing`` mm per axis (anti-aliasing before sampling it on a coarse grid); returns the
    smaller image and its voxel-to-world affine (block centres)."""
    vox = spacing_from_affine(affine)
    k = [max(1, int(spacing // float(s))) for s in vox]
    k = [min(kk, int(n)) for kk, n in zip(k, image.shape[2:], strict=True)]
    if all(kk == 1 for kk in k):
        return image, np.asarray(affine, dtype=np.float64)
    out = F.avg_pool3d(image, kernel_size=k, stride=k, ceil_mode=False)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(k)
    scale[:3, 3] = [(kk - 1) / 2.0 for kk in k]
    return out, np.asarray(affine, dtype=np.float64) @ scale


def same_grid(a: Volume, b: Volume, atol_mm: float = 1e-3) -> bool:
    """Whether two volumes have the same shape and voxel-to-world affine."""
    return tuple(a.shape) == tuple(b.shape) and np.allclose(
        np.asarray(a.affine, dtype=np.float64), np.asarray(b.affine, dtype=np.float64), atol=atol_mm
    )


def label_tensor(labels: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """An integer label map as a ``(1, 1, *S)`` float tensor to sample with nearest
    neighbours: float32, or float64 for values float32 cannot hold exactly (>= 2^24)."""
    arr = np.asarray(labels)
    wide = arr.size > 0 and int(arr.max()) >= 2**24
    return torch.from_numpy(arr.astype(np.float64 if wide else np.float32))[None, None].to(device)


def labels_on_grid(label: Volume, image: Volume) -> Volume:
    """``label`` resampled onto ``image``'s grid through both affines (nearest; 0 outside
    the label map): a label map stored on another grid than its image is placed where its
    own affine says, never assumed aligned."""
    to_label = np.linalg.inv(np.asarray(label.affine, dtype=np.float64)) @ np.asarray(
        image.affine, dtype=np.float64
    )
    arr = np.asarray(label.array)
    src = label_tensor(arr)
    idx = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in image.shape], indexing="ij")
    )
    out = sample(src, apply_affine(to_label, idx), "nearest", 0.0).round().numpy()
    return Volume(out.astype(arr.dtype), np.asarray(image.affine), image.spacing, label.path)
