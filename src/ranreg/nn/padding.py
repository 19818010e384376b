"""Input checks and the pad/crop that let the networks take any spatial size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def validate_pair(moving: torch.Tensor, fixed: torch.Tensor, ndim: int, channels: int) -> None:
    """Raise ValueError unless both are (B, channels, *S) with len(S) == ndim, same shape."""
    for name, x in (("moving", moving), ("fixed", fixed)):
        if x.dim() != ndim + 2:
            raise ValueError(
                f"{name} must be (B, C, {', '.join('S' * ndim)}) for a {ndim}D model, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != channels:
            raise ValueError(f"{name} has {x.shape[1]} channels, the model takes {channels}")
    if moving.shape != fixed.shape:
        raise ValueError(
            f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} differ in shape"
        )


def padded_shape(shape: Sequence[int], multiple: int, minimum: int = 0) -> tuple[int, ...]:
    """Each size rounded up to a multiple of ``multiple`` and at least ``minimum``."""
    return tuple(max(minimum, -(-n // multiple) * multiple) for n in shape)


def pad_to_multiple(x: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    """Zero-pad the spatial axes of (B, C, *S) at their high end to :func:`padded_shape`.

    Padding at the high end keeps voxel indices (and so displacements) unchanged and lets
    a level with pooling size p be cropped back to ceil(n / p) voxels.
    """
    target = padded_shape(x.shape[2:], multiple, minimum)
    pads: list[int] = []
    for n, t in zip(reversed(x.shape[2:]), reversed(target), strict=True):
        pads += [0, t - n]
    return F.pad(x, pads) if any(pads) else x


def crop_to(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Keep the low-index corner of shape ``shape`` of the spatial axes of (B, C, *S)."""
    return x[(slice(None), slice(None), *(slice(0, n) for n in shape))]
