"""Spatial core: warping, label warping, DDF resizing and composition, Jacobian metrics.

Conventions used throughout (and checked by the public functions):

* A DDF (dense displacement field) has shape ``(B, d, *S)`` with ``d = len(S)`` in ``{2, 3}``.
  Values are in voxel units of the grid it lives on. Channel ``i`` is the displacement along
  spatial tensor axis ``i`` (the order of ``S``), *not* ``grid_sample``'s reversed ``(x, y, z)``
  order; the conversion happens only inside this module.
* ``warped(x) = moving(x + ddf(x))`` (backward warping, "pull" convention).
* Voxel centres are at integer indices ``0 .. N-1`` (``align_corners=True`` for sampling).
* Shape problems raise :class:`ValueError` with a message naming the offending shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "identity_grid",
    "warp",
    "one_hot",
    "warp_labels",
    "resize_ddf",
    "compose_ddf",
    "integrate_velocity",
    "jacobian_determinant",
    "folding_fraction",
    "std_log_jacobian",
]

_WARP_MODES = {
    "linear": "bilinear",
    "nearest": "nearest",
}  # grid_sample's "bilinear" is trilinear in 3-D
_PADDING_MODES = ("border", "zeros")
_LABEL_METHODS = ("nearest", "linear")
_RESIZE_MODES = ("linear", "nearest")
# Largest integer that float32 represents exactly; bigger label values are warped in float64.
_FLOAT32_EXACT_INT = 2**24


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_ddf(ddf: Tensor, fn: str, name: str = "ddf") -> tuple[int, tuple[int, ...]]:
    """Validate a DDF and return ``(d, spatial_shape)``."""
    if not isinstance(ddf, Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(ddf).__name__}")
    if ddf.ndim not in (4, 5):
        raise ValueError(
            f"{fn}: {name} must have shape (B, d, *S) with d = len(S) in (2, 3), i.e. 4 or 5 "
            f"dims; got shape {_shape(ddf)}"
        )
    d = ddf.ndim - 2
    if ddf.shape[1] != d:
        raise ValueError(
            f"{fn}: {name} of shape {_shape(ddf)} has {ddf.shape[1]} channels but {d} spatial "
            f"dims; expected shape (B, {d}, *S) (channel i displaces spatial axis i)"
        )
    if not ddf.is_floating_point():
        raise ValueError(f"{fn}: {name} must be floating point, got dtype {ddf.dtype}")
    return d, _shape(ddf)[2:]


def _check_image_vs_ddf(
    image: Tensor, ddf: Tensor, fn: str, image_name: str = "image"
) -> tuple[int, tuple[int, ...]]:
    """Validate an image ``(B, C, *S)`` against a DDF; return ``(d, S)``."""
    d, spatial = _check_ddf(ddf, fn)
    if not isinstance(image, Tensor):
        raise ValueError(f"{fn}: {image_name} must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim != ddf.ndim:
        raise ValueError(
            f"{fn}: {image_name} of shape {_shape(image)} must have shape (B, C, *S) with the "
            f"same number of spatial dims as ddf of shape {_shape(ddf)}"
        )
    if _shape(image)[2:] != spatial:
        raise ValueError(
            f"{fn}: spatial sizes differ: {image_name} has shape {_shape(image)}, ddf has shape "
            f"{_shape(ddf)} (both must be (B, ., *S) with the same S)"
        )
    _broadcast_batch(image, ddf, fn, image_name, "ddf")
    return d, spatial


def _broadcast_batch(a: Tensor, b: Tensor, fn: str, a_name: str, b_name: str) -> int:
    """Batch size after broadcasting; sizes must be equal or one of them 1."""
    ba, bb = a.shape[0], b.shape[0]
    if ba != bb and 1 not in (ba, bb):
        raise ValueError(
            f"{fn}: batch sizes are incompatible: {a_name} has shape {_shape(a)}, {b_name} has "
            f"shape {_shape(b)} (batch sizes must be equal or one of them 1)"
        )
    return max(ba, bb)


def _check_choice(value: str, allowed: Sequence[str], fn: str, name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{fn}: {name} must be one of {tuple(allowed)}, got {value!r}")


# --------------------------------------------------------------------------------------------
# grids and warping
# --------------------------------------------------------------------------------------------


def identity_grid(
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Voxel coordinates of a grid: a tensor ``(d, *shape)`` whose channel ``i`` is the index
    along spatial axis ``i``.

    Adding it to a DDF gives the absolute sampling positions ``x + ddf(x)`` in voxels.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) == 0 or any(n < 1 for n in shape):
        raise ValueError(f"identity_grid: shape must be non-empty positive sizes, got {shape}")
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _sampling_grid(ddf: Tensor, dtype: torch.dtype) -> Tensor:
    """Turn a voxel DDF ``(B, d, *S)`` into a ``grid_sample`` grid ``(B, *S, d)``.

    The grid is in normalised ``[-1, 1]`` coordinates (align_corners=True: -1 and 1 are the
    centres of the first and last voxel) with the last dim in grid_sample's reversed
    ``(x, y, z)`` = (last axis, ..., first axis) order.
    """
    spatial = ddf.shape[2:]
    d = len(spatial)
    pos = ddf.to(dtype) + identity_grid(spatial, device=ddf.device, dtype=dtype)
    # 2 / (N - 1) per axis; a size-1 axis gets scale 0 so every position maps to its only voxel
    # (grid_sample un-normalises size-1 axes to index 0 anyway) and nothing divides by zero.
    scale = torch.tensor(
        [2.0 / (n - 1) if n > 1 else 0.0 for n in spatial], device=ddf.device, dtype=dtype
    ).view(1, d, *([1] * d))
    norm = pos * scale - 1.0
    return norm.flip(1).movedim(1, -1)


def warp(
    image: Tensor,
    ddf: Tensor,
    *,
    mode: str = "linear",
    padding_mode: str = "border",
) -> Tensor:
    """Warp ``image`` with a DDF: ``warped(x) = image(x + ddf(x))``.

    Args:
        image: floating-point tensor ``(B, C, *S)``.
        ddf: displacement field ``(B or 1, d, *S)`` in voxels, channel ``i`` along axis ``i``.
            A batch of 1 on either side is broadcast against the other.
        mode: ``"linear"`` (bi-/trilinear) or ``"nearest"``.
        padding_mode: ``"border"`` (repeat edge voxels) or ``"zeros"`` outside the grid.

    Returns:
        The warped image ``(B, C, *S)`` with the dtype of ``image`` (float64 works too).
    """
    fn = "warp"
    _check_image_vs_ddf(image, ddf, fn)
    _check_choice(mode, tuple(_WARP_MODES), fn, "mode")
    _check_choice(padding_mode, _PADDING_MODES, fn, "padding_mode")
    if not image.is_floating_point():
        raise ValueError(
            f"{fn}: image must be floating point, got dtype {image.dtype}; "
            "use warp_labels for integer label maps"
        )
    batch = _broadcast_batch(image, ddf, fn, "image", "ddf")
    # grid_sample needs grid and input in the same dtype; the image's dtype decides.
    grid = _sampling_grid(ddf, image.dtype)
    if grid.shape[0] != batch:
        grid = grid.expand(batch, *grid.shape[1:])
    if image.shape[0] != batch:
        image = image.expand(batch, *image.shape[1:])
    return F.grid_sample(
        image, grid, mode=_WARP_MODES[mode], padding_mode=padding_mode, align_corners=True
    )


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------


def _check_label_map(labels: Tensor, fn: str) -> None:
    if not isinstance(labels, Tensor):
        raise ValueError(f"{fn}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim not in (4, 5) or labels.shape[1] != 1:
        raise ValueError(
            f"{fn}: labels must be an integer label map of shape (B, 1, *S) with 2 or 3 "
            f"spatial dims; got shape {_shape(labels)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{fn}: labels must have an integer dtype, got {labels.dtype}")


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """One-hot encode an integer label map ``(B, 1, *S)`` into a float32 ``(B, K, *S)``.

    Raises ValueError if a label lies outside ``[0, num_classes)``.
    """
    fn = "one_hot"
    _check_label_map(labels, fn)
    if int(num_classes) < 1:
        raise ValueError(f"{fn}: num_classes must be >= 1, got {num_classes}")
    num_classes = int(num_classes)
    if labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{fn}: labels of shape {_shape(labels)} have values in [{lo}, {hi}], "
                f"outside [0, {num_classes}) for num_classes={num_classes}"
            )
    encoded = F.one_hot(labels[:, 0].long(), num_classes)  # (B, *S, K)
    return encoded.movedim(-1, 1).to(torch.float32)


def warp_labels(
    labels: Tensor,
    ddf: Tensor,
    *,
    method: str = "nearest",
    num_classes: int | None = None,
    padding_mode: str = "border",
) -> Tensor:
    """Warp a label map with a DDF (same convention as :func:`warp`).

    Integer label maps ``(B, 1, *S)``:

    * ``method="nearest"``: nearest-neighbour sampling; returns the input dtype and never
      creates a label that was not in the input.
    * ``method="linear"``: one-hot encode (``num_classes`` defaults to ``labels.max() + 1``),
      warp each class probability linearly, take the argmax; returns integer labels of the input
      dtype. Smoother boundaries than nearest; ties go to the lower class index.

    Floating-point inputs are taken to be soft labels (e.g. one-hot probabilities
    ``(B, K, *S)``) and are warped as images: ``method="linear"`` is
    ``warp(labels, ddf, mode="linear")``, ``"nearest"`` is ``warp(..., mode="nearest")``.

    ``padding_mode`` (``"border"`` or ``"zeros"``) decides what lies outside the grid; with
    ``"zeros"`` an integer map gets label 0 (background) there.
    """
    fn = "warp_labels"
    _check_choice(method, _LABEL_METHODS, fn, "method")
    _check_choice(padding_mode, _PADDING_MODES, fn, "padding_mode")
    if isinstance(labels, Tensor) and labels.is_floating_point():
        _check_image_vs_ddf(labels, ddf, fn, "labels")
        return warp(labels, ddf, mode=method, padding_mode=padding_mode)

    _check_label_map(labels, fn)
    _check_image_vs_ddf(labels, ddf, fn, "labels")
    work_dtype = ddf.dtype
    if method == "nearest":
        # Label values must survive the float round trip exactly.
        if work_dtype != torch.float64 and labels.numel() > 0:
            if int(labels.abs().max()) > _FLOAT32_EXACT_INT:
                work_dtype = torch.float64
        warped = warp(labels.to(work_dtype), ddf, mode="nearest", padding_mode=padding_mode)
        return warped.round().to(labels.dtype)

    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() > 0 else 1
    probs = one_hot(labels, num_classes).to(work_dtype)
    warped = warp(probs, ddf, mode="linear", padding_mode=padding_mode)
    return warped.argmax(dim=1, keepdim=True).to(labels.dtype)


# --------------------------------------------------------------------------------------------
# DDF resizing and composition
# --------------------------------------------------------------------------------------------


def resize_ddf(ddf: Tensor, size: Sequence[int], *, mode: str = "linear") -> Tensor:
    """Resample a DDF onto a grid of ``size`` voxels and rescale it to the new voxel units.

    Resampling uses the ``align_corners=False`` convention: a grid of ``n`` voxels covers the
    interval ``[0, n)`` with voxel centres at ``i + 0.5``, so a factor-2 upsample is the
    counterpart of 2x average pooling (a coarse voxel is exactly two fine voxels). Component
    ``i`` is multiplied by ``size[i] / old_size[i]`` so displacements stay in voxels of the
    new grid. Outside the outermost centres values are extended as constants.

    Args:
        ddf: ``(B, d, *S)``.
        size: the new spatial size, ``d`` positive integers.
        mode: ``"linear"`` (bi-/trilinear) or ``"nearest"`` (centre-aligned nearest, i.e.
            PyTorch's ``"nearest-exact"``).
    """
    fn = "resize_ddf"
    d, spatial = _check_ddf(ddf, fn)
    _check_choice(mode, _RESIZE_MODES, fn, "mode")
    size = tuple(int(n) for n in size)
    if len(size) != d or any(n < 1 for n in size):
        raise ValueError(
            f"{fn}: size must be {d} positive integers for ddf of shape {_shape(ddf)}, got {size}"
        )
    if mode == "linear":
        interp = {2: "bilinear", 3: "trilinear"}[d]
        resized = F.interpolate(ddf, size=size, mode=interp, align_corners=False)
    else:
        # "nearest-exact" picks the voxel whose centre is nearest under the i + 0.5 convention;
        # plain "nearest" would be shifted by half a voxel.
        resized = F.interpolate(ddf, size=size, mode="nearest-exact")
    factors = torch.tensor(
        [new / old for new, old in zip(size, spatial, strict=True)],
        device=ddf.device,
        dtype=ddf.dtype,
    ).view(1, d, *([1] * d))
    return resized * factors


def compose_ddf(ddf_first: Tensor, ddf_second: Tensor) -> Tensor:
    """Compose two DDFs into one.

    Returns ``phi`` with ``warp(img, phi) == warp(warp(img, ddf_first), ddf_second)`` (up to
    interpolation error), i.e. ``phi(x) = ddf_second(x) + ddf_first(x + ddf_second(x))`` where
    ``ddf_first`` is sampled with linear interpolation and border padding. Both fields are
    ``(B or 1, d, *S)`` on the same grid.
    """
    fn = "compose_ddf"
    d1, s1 = _check_ddf(ddf_first, fn, "ddf_first")
    d2, s2 = _check_ddf(ddf_second, fn, "ddf_second")
    if d1 != d2 or s1 != s2:
        raise ValueError(
            f"{fn}: fields must live on the same grid: ddf_first has shape "
            f"{_shape(ddf_first)}, ddf_second has shape {_shape(ddf_second)}"
        )
    _broadcast_batch(ddf_first, ddf_second, fn, "ddf_first", "ddf_second")
    # The first field is pulled back along the second (the image is moved by the first warp,
    # then sampled at x + ddf_second(x)).
    return ddf_second + warp(ddf_first, ddf_second, mode="linear", padding_mode="border")


#: squarings of the scaling-and-squaring integration (velocity / 2^7 per step)
SQUARINGS = 7


def integrate_velocity(velocity: Tensor, squarings: int = SQUARINGS) -> Tensor:
    """Displacement of the flow of a stationary velocity field (voxels), by scaling and
    squaring: ``u <- v / 2^n``, then ``n`` times ``u <- u + u o (id + u)``."""
    u = velocity / (2**squarings)
    for _ in range(squarings):
        u = u + warp(u, u)
    return u


# --------------------------------------------------------------------------------------------
# Jacobian metrics
# --------------------------------------------------------------------------------------------


def jacobian_determinant(ddf: Tensor, spacing: Sequence[float] | None = None) -> Tensor:
    """Determinant of the Jacobian of ``x -> x + ddf(x)``: ``det(I + grad ddf)``, ``(B, *S)``.

    Derivatives are central differences (``torch.gradient``; one-sided at the borders), so an
    affine field gives its exact determinant everywhere. If ``spacing`` is given, the DDF is
    taken to be in those physical units (e.g. mm) along each axis and ``d ddf_i / d x_j`` uses
    ``spacing[j]``; otherwise everything is in voxels. Every spatial size must be >= 2.
    """
    fn = "jacobian_determinant"
    d, spatial = _check_ddf(ddf, fn)
    if any(n < 2 for n in spatial):
        raise ValueError(
            f"{fn}: every spatial size must be >= 2 for finite differences; ddf has shape "
            f"{_shape(ddf)}"
        )
    if spacing is None:
        steps = [1.0] * d
    else:
        steps = [float(s) for s in spacing]
        if len(steps) != d or any(not s > 0 for s in steps):
            raise ValueError(
                f"{fn}: spacing must be {d} positive numbers for ddf of shape {_shape(ddf)}, "
                f"got {tuple(spacing)}"
            )
    # grads[j][:, i] = d ddf_i / d x_j
    grads = torch.gradient(ddf, spacing=steps, dim=tuple(range(2, 2 + d)), edge_order=1)
    jac = [[grads[j][:, i] + (1.0 if i == j else 0.0) for j in range(d)] for i in range(d)]
    if d == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    # Explicit cofactor expansion: cheaper than stacking and calling torch.linalg.det.
    return (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )


def _check_jac_and_mask(
    jac_det: Tensor, mask: Tensor | None, fn: str
) -> tuple[Tensor, Tensor | None]:
    """Validate a determinant map ``(B, *S)`` and an optional mask; return them flattened to
    ``(B, N)`` with the mask as bool (broadcast over the batch if it has batch size 1)."""
    if not isinstance(jac_det, Tensor):
        raise ValueError(f"{fn}: jac_det must be a torch.Tensor, got {type(jac_det).__name__}")
    if jac_det.ndim not in (3, 4):
        raise ValueError(
            f"{fn}: jac_det must have shape (B, *S) with 2 or 3 spatial dims; got shape "
            f"{_shape(jac_det)}"
        )
    if not jac_det.is_floating_point():
        raise ValueError(f"{fn}: jac_det must be floating point, got dtype {jac_det.dtype}")
    flat = jac_det.flatten(1)
    if mask is None:
        return flat, None
    m = mask
    # Accept label-style masks (B, 1, *S) too.
    if m.ndim == jac_det.ndim + 1 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != jac_det.ndim or _shape(m)[1:] != _shape(jac_det)[1:]:
        raise ValueError(
            f"{fn}: mask of shape {_shape(mask)} does not match jac_det of shape "
            f"{_shape(jac_det)} (expected (B or 1, *S) or (B or 1, 1, *S))"
        )
    batch = _broadcast_batch(jac_det, m, fn, "jac_det", "mask")
    if batch != jac_det.shape[0]:
        raise ValueError(
            f"{fn}: mask of shape {_shape(mask)} has a larger batch than jac_det of shape "
            f"{_shape(jac_det)}"
        )
    m = m.to(torch.bool).expand(batch, *m.shape[1:]).flatten(1)
    return flat, m


def folding_fraction(jac_det: Tensor, mask: Tensor | None = None) -> Tensor:
    """Fraction (0..1) of voxels with ``det <= 0`` per batch item, shape ``(B,)``.

    With a mask (nonzero = inside), only voxels inside it count; an empty mask gives NaN.
    """
    flat, m = _check_jac_and_mask(jac_det, mask, "folding_fraction")
    folded = (flat <= 0).to(flat.dtype)
    if m is None:
        return folded.mean(dim=1)
    w = m.to(flat.dtype)
    return (folded * w).sum(dim=1) / w.sum(dim=1)


def std_log_jacobian(jac_det: Tensor, mask: Tensor | None = None, eps: float = 1e-9) -> Tensor:
    """Standard deviation of ``log(clamp(det, eps))`` per batch item, shape ``(B,)``.

    The population SD (divide by N, like ``numpy.std``) over all voxels, or over the voxels
    inside ``mask`` (nonzero = inside; an empty mask gives NaN). Clamping keeps folded voxels
    finite (they count as ``log(eps)``).
    """
    flat, m = _check_jac_and_mask(jac_det, mask, "std_log_jacobian")
    if not eps > 0:
        raise ValueError(f"std_log_jacobian: eps must be > 0, got {eps}")
    logs = flat.clamp_min(eps).log()
    if m is None:
        return logs.std(dim=1, correction=0)
    w = m.to(logs.dtype)
    count = w.sum(dim=1)
    mean = (logs * w).sum(dim=1) / count
    var = ((logs - mean[:, None]) ** 2 * w).sum(dim=1) / count
    return var.sqrt()
