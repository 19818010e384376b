"""Image similarities for optimisation-based registration (affine and instance optimisation).

The fixed image does not change while a pair is optimised, so its local statistics are
computed once (:class:`LocalNCC`); each step then filters three moving-dependent channels
instead of five, which is what makes a step cheap on a CPU (the box filters dominate it).
Mutual information (:class:`MutualInformation`, MONAI's Parzen-window estimate) is for
pairs of different modalities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ranreg.data.preprocess import HU_THRESHOLD

__all__ = [
    "BODY_THRESHOLD",
    "box_mean",
    "LocalNCC",
    "MutualInformation",
    "robust_normalise",
    "normalised_volumes",
    "build_similarity",
    "with_mask",
    "with_moving_mask",
]


def _box_sum_axis(x: Tensor, window: int, axis: int) -> Tensor:
    """Sum over ``window`` (odd) voxels centred on each voxel along ``axis``, zeros outside:
    differences of a cumulative sum (about twice as fast as average pooling on a CPU, and
    its backward is another cumulative sum)."""
    half, n = window // 2, x.shape[axis]
    pad = [0] * (2 * x.dim())
    at = 2 * (x.dim() - 1 - axis)  # F.pad lists the last axis first
    pad[at], pad[at + 1] = half + 1, half
    c = F.pad(x, pad).cumsum(axis)
    return c.narrow(axis, window, n) - c.narrow(axis, 0, n)


def _in_image_count(shape: tuple[int, ...], window: int, device: torch.device) -> Tensor:
    """Voxels of each centred box that lie inside the image, ``(1, 1, *shape)``."""
    count = torch.ones((), device=device)
    for axis, n in enumerate(shape):
        i = torch.arange(n, device=device, dtype=torch.float32)
        c = (i + window // 2).clamp(max=n - 1) - (i - window // 2).clamp(min=0) + 1
        view = [1] * len(shape)
        view[axis] = n
        count = count * c.view(view)
    return count[None, None]


def box_mean(x: Tensor, window: int) -> Tensor:
    """Mean of ``x`` ``(B, C, X, Y, Z)`` over a centred box of ``window`` (odd) voxels per
    axis, counting only voxels inside the image (separable)."""
    y = x
    for axis in range(2, x.dim()):
        y = _box_sum_axis(y, window, axis)
    return y / _in_image_count(tuple(x.shape[2:]), window, x.device)


#: the fixed voxels local NCC counts: intensity above this after :func:`robust_normalise`
#: (the body, not air)
BODY_THRESHOLD = 0.1


def _in_region(body: Tensor, region: Tensor | None) -> Tensor:
    """The voxels a similarity averages over: the fixed body, within the user's region."""
    return body if region is None else body & (region > 0.5)


class LocalNCC:
    """``-mean(cc)`` over a mask, ``cc`` the squared local correlation coefficient of the
    fixed image and a warped moving image in a box of ``window`` voxels (odd).

    ``cc = cov^2 / (var_f var_w + eps)``; the mask is ``fixed > 0.1`` (intensities
    normalised to [0, 1]: the body, not air), within ``region`` (a fixed mask, 0/1, the
    shape of ``fixed``) when one is given. Identical textured images give -1.
    """

    def __init__(
        self,
        fixed: Tensor,
        window: int = 5,
        region: Tensor | None = None,
        eps: float = 1e-8,
    ) -> None:
        if window < 1 or window % 2 == 0:
            raise ValueError(f"LocalNCC: window must be odd and >= 1, got {window}")
        self.window, self.eps = window, eps
        self.fixed = fixed
        mf, mff = box_mean(torch.cat([fixed, fixed * fixed], dim=1), window).chunk(2, dim=1)
        self.mean_f = mf
        self.var_f = (mff - mf * mf).clamp_min(0.0)
        self.mask = _in_region(fixed > BODY_THRESHOLD, region).to(fixed.dtype)
        self.count = self.mask.sum().clamp_min(1.0)

    def __call__(self, warped: Tensor, valid: Tensor | None = None) -> Tensor:
        """``-mean(cc)`` over the mask; ``valid`` (0/1, the shape of ``fixed``): the moving
        mask carried onto the fixed image by the current transform, which also limits it."""
        f, w = self.fixed, warped
        mw, mww, mfw = box_mean(torch.cat([w, w * w, f * w], dim=1), self.window).chunk(3, dim=1)
        var_w = (mww - mw * mw).clamp_min(0.0)
        cov = mfw - self.mean_f * mw
        cc = cov.square() / (self.var_f * var_w + self.eps)
        if valid is None:
            return -(cc * self.mask).sum() / self.count
        weight = self.mask * valid
        return -(cc * weight).sum() / weight.sum().clamp_min(1.0)


class MutualInformation:
    """``-MI`` (Parzen-window estimate, MONAI's ``GlobalMutualInformationLoss``) between the
    fixed image and a warped moving image, both in [0, 1], over the mask ``fixed > 0.05``
    (within ``region``, a fixed mask, when one is given)."""

    def __init__(self, fixed: Tensor, bins: int = 32, region: Tensor | None = None) -> None:
        from monai.losses import GlobalMutualInformationLoss  # slow import: only when used

        self.loss = GlobalMutualInformationLoss(num_bins=bins, sigma_ratio=0.5)
        mask = _in_region(fixed > 0.05, region)
        self.index = mask.flatten().nonzero()[:, 0]
        self.fixed = fixed.flatten()[self.index].view(1, 1, -1)

    def __call__(self, warped: Tensor, valid: Tensor | None = None) -> Tensor:
        """``-MI``; ``valid`` as for :class:`LocalNCC` (only the voxels it covers count)."""
        moving, fixed = warped.flatten()[self.index].view(1, 1, -1), self.fixed
        if valid is not None:
            keep = valid.flatten()[self.index] > 0.5
            if not bool(keep.any()):
                return warped.sum() * 0.0  # nothing left to compare: no preference
            moving, fixed = moving[..., keep], fixed[..., keep]
        return self.loss(moving.clamp(0, 1), fixed.clamp(0, 1))


def with_mask(image: Tensor, mask: Tensor | None) -> Tensor:
    """``image`` ``(1, 1, *S)`` with ``mask`` as a second channel (resampled with it), or
    ``image`` alone without a mask."""
    return image if mask is None else torch.cat([image, mask.to(image.dtype)], 1)


def with_moving_mask(similarity: Callable[..., Tensor], warped: Tensor) -> Tensor:
    """``similarity`` of a warped moving image ``(1, C, *S)``: with a second channel, the
    moving mask warped with it, only the fixed voxels that it then covers count."""
    if warped.shape[1] == 1:
        return similarity(warped)
    return similarity(warped[:, :1], (warped[:, 1:] >= 0.5).to(warped.dtype))


def robust_normalise(image: Tensor, low: float = 0.5, high: float = 99.5) -> Tensor:
    """Intensities clipped to their ``low``..``high`` percentiles and scaled to [0, 1]: one
    rule for CT (HU), MR and painted images (similarities need comparable ranges, not
    windows)."""
    flat = image.flatten()
    # percentiles from at most ~500k evenly strided voxels: quantile sorts its input
    flat = flat[:: max(1, flat.numel() // 500_000)]
    q = torch.quantile(flat.float(), torch.tensor([low / 100, high / 100], dtype=torch.float32))
    lo, hi = float(q[0]), float(q[1])
    if not hi > lo:
        lo, hi = float(image.min()), float(image.max())
    if not hi > lo:
        return torch.zeros_like(image)
    return ((image - lo) / (hi - lo)).clamp(0.0, 1.0)


def normalised_volumes(*volumes: Any) -> tuple[Tensor, ...]:
    """``(1, 1, *S)`` float32 tensors of volumes' arrays after :func:`robust_normalise`."""
    return tuple(
        robust_normalise(torch.from_numpy(np.asarray(v.array, dtype=np.float32)))[None, None]
        for v in volumes
    )


def build_similarity(
    name: str, fixed: Tensor, window: int = 5, region: Tensor | None = None
) -> LocalNCC | MutualInformation:
    """``"lncc"`` or ``"mi"`` on ``fixed`` ``(1, 1, *S)``, within ``region`` if given."""
    if name == "lncc":
        return LocalNCC(fixed, window, region)
    if name == "mi":
        return MutualInformation(fixed, region=region)
    raise ValueError(f"similarity must be lncc or mi, got {name!r}")


def is_ct(array: np.ndarray | Tensor) -> bool:
    """An image whose minimum is below ``HU_THRESHOLD`` (-500) is taken to be CT (HU)."""
    return float(array.min()) < HU_THRESHOLD
