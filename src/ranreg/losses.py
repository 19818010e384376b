"""Training losses of RAN (torch; 2D and 3D; inputs shaped ``(B, C, *S)``).

* Stage 1 (synthetic DDF, supplement Eq. 11): :func:`synthetic_ddf_loss`, plus
  :func:`mse_loss` between the warped and the fixed image.
* Stage 2 (unsupervised): :func:`local_ncc_loss` (squared local correlation, window 8, masked
  by a fixed-image threshold) and :func:`edge_aware_smoothness`.
* Evaluation-style overlap loss: :func:`dice_loss`.

A DDF is ``(B, d, *S)`` in voxel units, channel ``i`` displacing tensor axis ``2 + i``. All
reductions are means (not the sums written in Eq. 11) so that the loss weights do not depend on
the image size or the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ddf_gradient",
    "dice_loss",
    "edge_aware_smoothness",
    "gradient_l1",
    "gradient_l2",
    "local_ncc_loss",
    "mse_loss",
    "synthetic_ddf_loss",
]


def _check_spatial(x: torch.Tensor, name: str) -> int:
    if x.ndim not in (4, 5):
        raise ValueError(
            f"{name} must have shape (B, C, *S) with 2 or 3 spatial dims, got {tuple(x.shape)}"
        )
    return x.ndim - 2


def _forward_diff(x: torch.Tensor, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    return x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)


def ddf_gradient(ddf: torch.Tensor) -> list[torch.Tensor]:
    """Forward differences of a field along every spatial axis.

    Args:
        ddf: ``(B, C, *S)`` tensor (usually a DDF with ``C = d``).

    Returns:
        ``d`` tensors; entry ``i`` is ``ddf[..., x_i + 1, ...] - ddf[..., x_i, ...]`` with shape
        ``(B, C, *S)`` except ``S_i - 1`` along spatial axis ``i``.
    """
    d = _check_spatial(ddf, "ddf")
    return [_forward_diff(ddf, 2 + i) for i in range(d)]


def gradient_l2(ddf: torch.Tensor) -> torch.Tensor:
    """Mean squared forward differences, summed over the differentiation axes.

    ``sum_i mean_{b, c, x}(D_i ddf)^2``: per voxel this is the squared Frobenius norm of the
    displacement Jacobian divided by the number of channels, averaged over voxels and batch.
    For a linear field ``ddf_c(x) = sum_i G[c, i] x_i`` it equals ``||G||_F^2 / C``.

    MONAI's ``DiffusionLoss`` is not used: it takes central differences
    ``(x[i+1] - x[i-1]) / 2`` on the interior, a different quantity.
    """
    return sum((g.square().mean() for g in ddf_gradient(ddf)), ddf.new_zeros(()))


def gradient_l1(ddf: torch.Tensor) -> torch.Tensor:
    """Mean absolute forward differences, summed over the differentiation axes."""
    return sum((g.abs().mean() for g in ddf_gradient(ddf)), ddf.new_zeros(()))


def mse_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error, optionally restricted to a mask.

    Args:
        a, b: tensors of the same shape.
        mask: boolean or float weights broadcastable to ``a``; the result is
            ``sum(m (a - b)^2) / sum(m)`` with ``m`` the mask broadcast to ``a``'s shape
            (0 when the mask is empty).
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    sq = (a - b).square()
    if mask is None:
        return sq.mean()
    m = torch.broadcast_to(mask.to(sq.dtype), sq.shape)
    total = m.sum()
    # an empty mask divides by 1, not by a tiny number: 1/tiny times a loss weight
    # overflows to inf in the backward pass, and inf * 0 makes every gradient NaN
    return (sq * m).sum() / torch.where(total > 0, total, torch.ones_like(total))


def synthetic_ddf_loss(ddf: torch.Tensor, ddf_true: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Stage-1 loss, supplement Eq. (11), with means instead of sums.

    ``mean((ddf - ddf_true)^2) + lam * gradient_l2(ddf)``. Eq. (11) sums over voxels; the mean
    divides both terms by (nearly) the same number of elements, so it only rescales the loss
    and ``lam`` keeps its meaning up to the ``(S_i - 1) / S_i`` edge effect of the differences.
    """
    if ddf.shape != ddf_true.shape:
        raise ValueError(f"shapes differ: {tuple(ddf.shape)} vs {tuple(ddf_true.shape)}")
    return mse_loss(ddf, ddf_true) + lam * gradient_l2(ddf)


def _box_mean(x: torch.Tensor, window: int, d: int) -> torch.Tensor:
    """Windowed sum over ``window`` voxels per axis with zero padding (separable).

    The window of output voxel ``x`` covers ``x - window // 2 ... x + (window - 1) // 2``
    along every axis (the convention of ``scipy.ndimage.uniform_filter``); voxels outside the
    image are zeros. Returns the box *sum* divided by ``window ** d``.
    """
    before, after = window // 2, (window - 1) // 2
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    y = x.reshape(b * c, 1, *spatial)
    pool = F.avg_pool2d if d == 2 else F.avg_pool3d
    for i in range(d):
        pad = [0, 0] * d
        # F.pad lists the last axis first.
        pad[2 * (d - 1 - i)] = before
        pad[2 * (d - 1 - i) + 1] = after
        y = F.pad(y, pad)
        kernel = [1] * d
        kernel[i] = window
        y = pool(y, kernel_size=kernel, stride=1)
    return y.reshape(b, c, *spatial)


def local_ncc_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: int = 8,
    mask_threshold: float | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Negative mean squared local correlation coefficient.

    For every voxel and channel, over a box window of ``window`` voxels per axis:
    ``cc = cov(F, W)^2 / (var(F) var(W) + eps)`` with local means, variances and covariance
    taken over the part of the window inside the image (the window is clipped at the image
    border, so each statistic is normalised by the number of in-image voxels; this keeps ``cc``
    invariant to affine intensity changes everywhere). For an even ``window`` the box cannot be
    centred: it covers ``x - window // 2 ... x + (window - 1) // 2`` (one more voxel before
    than after, as ``scipy.ndimage.uniform_filter``).

    The loss is ``-mean(cc)`` over all voxels, channels and batch items, or, with
    ``mask_threshold``, over the voxels where ``fixed > mask_threshold`` only (pooled over the
    batch; 0 when no voxel passes). Identical textured images give ``-1`` (up to ``eps``).

    MONAI's ``LocalNormalizedCrossCorrelationLoss`` is not used: it requires an odd kernel
    size, zero-pads without count normalisation and has no mask.

    Args:
        fixed: ``(B, C, *S)`` fixed image.
        warped: ``(B, C, *S)`` warped moving image.
        window: window size per axis (>= 1).
        mask_threshold: average only where ``fixed > mask_threshold`` (paper: 0.1 abdomen,
            0.01 lung).
        eps: added to ``var(F) var(W)``. The variances are window *means*, so ``eps`` is
            compared with ``var^2`` (about 1e-7 to 1e-5 for soft tissue in a ``[0, 1]`` CT
            window): 1e-8 leaves such regions nearly unbiased, sends flat regions (float32
            round-off) to ``cc ~ 0`` and avoids 0/0. (DeepReg's 1e-5 is added to window-*sum*
            variances, i.e. about 4e-11 in these units for 8x8x8 windows.)
    """
    d = _check_spatial(fixed, "fixed")
    if fixed.shape != warped.shape:
        raise ValueError(f"shapes differ: {tuple(fixed.shape)} vs {tuple(warped.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    f, w = fixed, warped
    stacked = torch.cat([f, w, f * f, w * w, f * w], dim=1)
    sums = _box_mean(stacked, window, d)
    count = _box_mean(torch.ones_like(f[:1, :1]), window, d)
    mf, mw, mff, mww, mfw = (sums / count).chunk(5, dim=1)
    var_f = (mff - mf * mf).clamp_min(0.0)
    var_w = (mww - mw * mw).clamp_min(0.0)
    cov = mfw - mf * mw
    cc = cov.square() / (var_f * var_w + eps)
    if mask_threshold is None:
        return -cc.mean()
    mask = (fixed > mask_threshold).to(cc.dtype)
    return -(cc * mask).sum() / mask.sum().clamp_min(1.0)


def edge_aware_smoothness(
    ddf: torch.Tensor, image: torch.Tensor, alpha: float = 25.0
) -> torch.Tensor:
    """Edge-aware L1 smoothness of a DDF.

    ``sum_i mean_{b, c, x}( w_i |D_i ddf| )`` with forward differences ``D_i`` and, per axis,
    ``w_i = exp(-alpha (D_i I)^2 / (0.2 + I_i)^2)`` where ``D_i I`` is the forward difference of
    the image along axis ``i`` (squared and summed over image channels) and ``I_i`` is the mean
    of the two voxels of the difference (averaged over image channels). ``w = 1`` on a constant
    image (the loss then equals :func:`gradient_l1`) and drops at intensity edges so that the
    field may slide there. ``image`` is expected normalised to ``[0, 1]`` (the paper's alpha: 25
    abdomen, 9 lung); ``(0.2 + I)^2`` is clamped away from 0.

    Args:
        ddf: ``(B, d, *S)`` DDF.
        image: ``(B, C, *S)`` fixed image on the same grid (B may be 1 to broadcast).
        alpha: edge sensitivity.
    """
    d = _check_spatial(ddf, "ddf")
    if image.ndim != ddf.ndim or image.shape[2:] != ddf.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} does not match ddf {tuple(ddf.shape)}")
    total = ddf.new_zeros(())
    for i in range(d):
        dim = 2 + i
        n = image.shape[dim]
        grad2 = _forward_diff(image, dim).square().sum(dim=1, keepdim=True)
        mid = 0.5 * (image.narrow(dim, 1, n - 1) + image.narrow(dim, 0, n - 1)).mean(
            1, keepdim=True
        )
        weight = torch.exp(-alpha * grad2 / (0.2 + mid).square().clamp_min(1e-12))
        total = total + (weight * _forward_diff(ddf, dim).abs()).mean()
    return total


def dice_loss(pred_onehot: torch.Tensor, target_onehot: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss, mean over the foreground classes and the batch.

    ``monai.losses.DiceLoss(include_background=False)`` without activation: channel 0 is the
    background and is dropped; per item and class ``1 - (2 sum(p t) + 1e-5) / (sum p + sum t +
    1e-5)``. A class absent from both maps counts as a perfect match (loss 0).

    Args:
        pred_onehot: ``(B, K, *S)`` soft/one-hot prediction (e.g. warped one-hot labels).
        target_onehot: ``(B, K, *S)`` one-hot target, ``K >= 2``.
    """
    if pred_onehot.shape != target_onehot.shape:
        raise ValueError(
            f"shapes differ: {tuple(pred_onehot.shape)} vs {tuple(target_onehot.shape)}"
        )
    if pred_onehot.shape[1] < 2:
        raise ValueError("dice_loss needs a background channel plus at least one foreground class")
    from monai.losses import DiceLoss  # imported here: MONAI is slow to import

    return DiceLoss(include_background=False, reduction="mean")(pred_onehot, target_onehot)
