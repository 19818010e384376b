"""Preprocessing used by the RAN paper for abdominal CT.

Defaults (``/work/shared/notes/paper-facts.md``): resample by 0.5 (2 mm -> 4 mm,
192x160x256 -> 96x80x128), clip intensities to [-100, 300] HU and scale to
[0, 1]; labels are resampled with nearest neighbour and only the 9 evaluated
organs are kept (1 spleen, 2 right kidney, 3 left kidney, 5 esophagus, 6 liver,
8 aorta, 9 inferior vena cava, 10 portal & splenic vein, 11 pancreas).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ranreg.errors import RanregError

__all__ = [
    "ABDOMEN_ORGANS",
    "DEFAULT_FACTOR",
    "DEFAULT_WINDOW",
    "HU_THRESHOLD",
    "Resampled",
    "resample",
    "window_normalize",
    "network_intensity",
    "select_labels",
    "preprocess_subject",
    "preprocess_pair",
]

#: The 9 organs the paper evaluates (Learn2Reg 2020 task 3 label values).
ABDOMEN_ORGANS: tuple[int, ...] = (1, 2, 3, 5, 6, 8, 9, 10, 11)
#: Resampling factor: 2 mm -> 4 mm.
DEFAULT_FACTOR: float = 0.5
#: Intensity window in HU.
DEFAULT_WINDOW: tuple[float, float] = (-100.0, 300.0)
#: Image minimum below which an image is taken to be CT in Hounsfield units.
HU_THRESHOLD = -500.0


@dataclass
class Resampled:
    """Result of :func:`resample`: the new array and its voxel-to-world geometry."""

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]


def _factors(factor: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    if np.isscalar(factor):
        factors = (float(factor),) * ndim
    else:
        factors = tuple(float(f) for f in factor)  # type: ignore[union-attr]
        if len(factors) != ndim:
            raise ValueError(f"need {ndim} resampling factors, got {len(factors)}")
    if not all(np.isfinite(f) and f > 0 for f in factors):
        raise ValueError(f"resampling factors must be positive, got {factors}")
    return factors


def resample(
    array: np.ndarray,
    factor: float | Sequence[float] = DEFAULT_FACTOR,
    order: int = 1,
    affine: np.ndarray | None = None,
) -> Resampled:
    """Resample ``array`` by ``factor`` per axis with :func:`scipy.ndimage.zoom`.

    Use ``order=1`` (linear) for images and ``order=0`` (nearest) for labels.
    The output shape is ``round(shape * factor)``. The sampling treats voxels as
    cells (``grid_mode=True``): the resampled grid covers the same physical
    extent, so the new spacing is exactly ``spacing * shape / new_shape`` (2 mm
    -> 4 mm for 192 -> 96) and the first voxel centre moves by half a new voxel
    minus half an old one. ``affine`` (identity if omitted) is updated to match.
    Integer arrays resampled with ``order=0`` keep their dtype; other orders
    return float32.
    """
    arr = np.asarray(array)
    factors = _factors(factor, arr.ndim)
    in_shape = np.array(arr.shape, dtype=np.float64)
    out_shape = np.maximum(np.round(in_shape * np.array(factors)), 1).astype(int)
    affine = np.eye(arr.ndim + 1) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (arr.ndim + 1, arr.ndim + 1):
        raise ValueError(f"affine must be {arr.ndim + 1}x{arr.ndim + 1}, got {affine.shape}")

    if np.array_equal(out_shape, arr.shape):
        out = arr.copy() if order == 0 else arr.astype(np.float32, copy=True)
    else:
        src = arr if order == 0 or arr.dtype == np.float32 else arr.astype(np.float32)
        # exact per-axis zoom so that scipy produces exactly out_shape
        zoom = tuple(float(o) / float(i) for o, i in zip(out_shape, arr.shape, strict=True))
        out = ndimage.zoom(src, zoom, order=order, mode="nearest", grid_mode=True)
        if tuple(out.shape) != tuple(out_shape):  # pragma: no cover - scipy rounding guard
            raise RuntimeError(f"zoom produced {out.shape}, expected {tuple(out_shape)}")

    step = in_shape / out_shape  # old voxels per new voxel
    scale = np.eye(arr.ndim + 1)
    scale[: arr.ndim, : arr.ndim] = np.diag(step)
    scale[: arr.ndim, arr.ndim] = 0.5 * (step - 1.0)
    new_affine = affine @ scale
    spacing = tuple(float(s) for s in np.sqrt((new_affine[: arr.ndim, : arr.ndim] ** 2).sum(0)))
    return Resampled(array=out, affine=new_affine, spacing=spacing)


def window_normalize(
    image: np.ndarray, low: float = DEFAULT_WINDOW[0], high: float = DEFAULT_WINDOW[1]
) -> np.ndarray:
    """Clip ``image`` to [low, high] and scale linearly to [0, 1] (float32)."""
    if not high > low:
        raise ValueError(f"window must have high > low, got [{low}, {high}]")
    img = np.asarray(image, dtype=np.float32)
    out = np.clip(img, low, high)
    out -= np.float32(low)
    out *= np.float32(1.0 / (high - low))
    return out


def network_intensity(
    image: Any, window: Sequence[float] | None, ct_only: bool, raw_min: float | None = None
) -> Any:
    """A network's input intensities in [0, 1] (numpy array or torch tensor alike).

    ``window`` (low, high) clips and scales; with ``ct_only`` it applies only to CT (raw
    minimum, ``raw_min`` or the image's own, below :data:`HU_THRESHOLD`) and any other image
    is min-max scaled, as for models trained on random contrast; ``window=None`` is min-max
    for every image. A constant image gives zeros.
    """
    raw_min = float(image.min()) if raw_min is None else raw_min
    if window is None or (ct_only and raw_min >= HU_THRESHOLD):
        lo, hi = float(image.min()), float(image.max())
        return image * 0 if hi <= lo else (image - lo) / (hi - lo)
    low, high = (float(w) for w in window)
    return (image.clip(low, high) - low) / (high - low)


def select_labels(labels: np.ndarray, keep: Sequence[int] | None = ABDOMEN_ORGANS) -> np.ndarray:
    """Zero every label not in ``keep``; kept labels keep their original values.

    ``keep=None`` keeps all labels. The dtype is unchanged.
    """
    lab = np.asarray(labels)
    if keep is None:
        return lab.copy()
    return np.where(np.isin(lab, np.asarray(list(keep))), lab, np.zeros((), dtype=lab.dtype))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected (4 in 2D) component of a boolean ``mask``: the body
    without the couch or the air pockets around it. An empty mask comes back empty."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def preprocess_subject(
    image: np.ndarray,
    label: np.ndarray | None = None,
    *,
    factor: float | Sequence[float] | None = DEFAULT_FACTOR,
    window: tuple[float, float] | None = DEFAULT_WINDOW,
    keep: Sequence[int] | None = ABDOMEN_ORGANS,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample, window and normalise an image (and its label map).

    Returns ``(image float32 in [0, 1], label or None)``. ``factor=None`` or 1
    skips resampling; ``window=None`` skips windowing (image only cast to
    float32); ``keep=None`` keeps every label.
    """
    img = np.asarray(image)
    if label is not None and tuple(np.shape(label)) != tuple(img.shape):
        raise RanregError(
            f"image shape {tuple(img.shape)} differs from label shape {tuple(np.shape(label))}"
        )
    if factor is not None:
        img = resample(img, factor, order=1).array
    img = (
        window_normalize(img, *window) if window is not None else np.asarray(img, dtype=np.float32)
    )
    lab = None
    if label is not None:
        lab = np.asarray(label)
        if factor is not None:
            lab = resample(lab, factor, order=0).array
        lab = select_labels(lab, keep)
    return img, lab


def preprocess_pair(
    moving: np.ndarray,
    fixed: np.ndarray,
    moving_label: np.ndarray | None = None,
    fixed_label: np.ndarray | None = None,
    **kwargs,
) -> dict[str, np.ndarray | None]:
    """:func:`preprocess_subject` on both images of a pair; keyword options are shared.

    Returns a dict with keys ``moving``, ``fixed``, ``moving_label``, ``fixed_label``.
    """
    mov, mov_lab = preprocess_subject(moving, moving_label, **kwargs)
    fix, fix_lab = preprocess_subject(fixed, fixed_label, **kwargs)
    return {"moving": mov, "fixed": fix, "moving_label": mov_lab, "fixed_label": fix_lab}
