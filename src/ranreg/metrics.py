"""Registration accuracy metrics: per-label Dice and surface distances, Jacobian statistics.

Label maps are integer arrays (``numpy.ndarray`` or ``torch.Tensor``) of spatial shape ``S``
with 2 or 3 dims; the batched ``(1, 1, *S)`` layout used by :func:`ranreg.spatial.warp_labels`
is accepted too (the two leading singleton dims are dropped). Both maps of a pair must live on
the same grid.

Surface distances are computed with MONAI (:func:`monai.metrics.compute_average_surface_distance`
and :func:`monai.metrics.compute_hausdorff_distance`) and follow MONAI's definitions, which are
worth knowing when comparing numbers with other papers:

* The *surface* of a mask is its set of inner boundary voxels: foreground voxels removed by one
  binary erosion with the face-connected structuring element (4-neighbourhood in 2-D,
  6-neighbourhood in 3-D). Voxels on the image border count as surface. Distances are measured
  between voxel centres (scaled by ``spacing``), with no sub-voxel surface or surfel-area
  weighting (DeepMind's ``surface-distance`` package weights by surfel area instead).
* ``asd`` is the mean of the *pooled* distances: every surface voxel of A to the nearest
  surface voxel of B, together with every surface voxel of B to the nearest of A. It is the
  average of the two directed means weighted by the two surface sizes, not their plain average.
* ``hd95`` is the larger of the two *directed* 95th percentiles (``torch.quantile``, linear
  interpolation), not the 95th percentile of the pooled distances.
* Where MONAI would return ``inf`` (a label present in only one map) or warn and return NaN or
  ``0`` (absent from both), the functions here return NaN without calling MONAI.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ranreg.data.preprocess import ABDOMEN_ORGANS
from ranreg.spatial import folding_fraction, jacobian_determinant, std_log_jacobian

__all__ = [
    "ORGAN_NAMES",
    "PAPER_ORGANS",
    "dice",
    "surface_distances",
    "jacobian_stats",
    "evaluate_pair",
]

#: Label values of the 13-organ abdomen CT set (BTCV / Learn2Reg AbdomenCTCT numbering).
ORGAN_NAMES: dict[int, str] = {
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic vein",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}

#: The nine organs the RAN paper reports on (the others are dropped there).
#: The 9 organs the paper evaluates (the data module's default label selection).
PAPER_ORGANS: tuple[int, ...] = tuple(ABDOMEN_ORGANS)

ArrayLike = np.ndarray | Tensor


# --------------------------------------------------------------------------------------------
# input helpers
# --------------------------------------------------------------------------------------------


def _label_array(x: ArrayLike, fn: str, name: str) -> np.ndarray:
    """Return an integer label map as a numpy array of spatial shape ``S`` (2 or 3 dims)."""
    if isinstance(x, Tensor):
        arr = x.detach().cpu().numpy()
    elif isinstance(x, np.ndarray):
        arr = x
    else:
        raise ValueError(
            f"{fn}: {name} must be a numpy array or torch.Tensor, got {type(x).__name__}"
        )
    if arr.ndim in (4, 5) and arr.shape[:2] == (1, 1):
        arr = arr[0, 0]
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{fn}: {name} must be a label map of shape S (2 or 3 dims) or (1, 1, *S); "
            f"got shape {tuple(arr.shape)}"
        )
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"{fn}: {name} must have an integer dtype, got {arr.dtype}")
    return arr


def _label_pair(
    pred: ArrayLike, ref: ArrayLike, fn: str, names: tuple[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    a = _label_array(pred, fn, names[0])
    b = _label_array(ref, fn, names[1])
    if a.shape != b.shape:
        raise ValueError(
            f"{fn}: {names[0]} and {names[1]} must have the same spatial shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a, b


def _label_list(labels: Sequence[int], fn: str) -> list[int]:
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise ValueError(f"{fn}: labels must be a sequence of ints, got {labels!r}")
    return [int(v) for v in labels]


def _spacing_list(spacing: float | Sequence[float], ndim: int, fn: str) -> list[float]:
    if isinstance(spacing, (int, float)):
        values = [float(spacing)] * ndim
    else:
        values = [float(s) for s in spacing]
    if len(values) != ndim or not all(s > 0 and math.isfinite(s) for s in values):
        raise ValueError(
            f"{fn}: spacing must be one positive number or {ndim} positive numbers (one per "
            f"spatial axis), got {spacing!r}"
        )
    return values


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


# --------------------------------------------------------------------------------------------
# overlap
# --------------------------------------------------------------------------------------------


def dice(pred_labels: ArrayLike, ref_labels: ArrayLike, labels: Sequence[int]) -> dict[int, float]:
    """Dice overlap ``2 |A ∩ B| / (|A| + |B|)`` per label.

    Args:
        pred_labels: integer label map of shape ``S`` (or ``(1, 1, *S)``), e.g. the warped
            moving labels.
        ref_labels: integer label map on the same grid, e.g. the fixed labels.
        labels: label values to score.

    Returns:
        ``{label: dice}`` in the order of ``labels``. NaN where the label is absent from both
        maps; 0 where it is in only one.
    """
    fn = "dice"
    a, b = _label_pair(pred_labels, ref_labels, fn, ("pred_labels", "ref_labels"))
    out: dict[int, float] = {}
    for lab in _label_list(labels, fn):
        in_a = a == lab
        in_b = b == lab
        total = int(in_a.sum()) + int(in_b.sum())
        if total == 0:
            out[lab] = math.nan
        else:
            out[lab] = 2.0 * int(np.logical_and(in_a, in_b).sum()) / total
    return out


# --------------------------------------------------------------------------------------------
# surface distances
# --------------------------------------------------------------------------------------------


def _union_crop(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop two masks to the bounding box of their union.

    Distances are translation invariant, and everything outside the box is background, so
    this changes neither MONAI's surfaces (erosion treats outside-the-image as background)
    nor its distances; it only saves the conversion of the whole volume to float.
    """
    coords = np.nonzero(a | b)
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
    return a[box], b[box]


def surface_distances(
    pred_labels: ArrayLike,
    ref_labels: ArrayLike,
    labels: Sequence[int],
    spacing: float | Sequence[float],
) -> dict[int, dict[str, float]]:
    """Symmetric surface distances per label, in the units of ``spacing`` (normally mm).

    For each label the two binary masks are passed, as ``(1, 1, *S)`` one-hot tensors, to
    MONAI's ``compute_average_surface_distance(symmetric=True, spacing=...)`` and
    ``compute_hausdorff_distance(percentile=95, spacing=...)``; see the module docstring for
    MONAI's surface and distance definitions.

    Args:
        pred_labels: integer label map of shape ``S`` (or ``(1, 1, *S)``).
        ref_labels: integer label map on the same grid.
        labels: label values to score.
        spacing: voxel size, one number (isotropic) or one per spatial axis in the order of
            ``S``.

    Returns:
        ``{label: {"asd": ..., "hd95": ...}}``. Both are NaN (never ``inf``) when the label is
        missing from either map; 0 for identical masks.
    """
    # imported here: MONAI takes about a second to import, which `ranreg --help` and
    # registrations without labels should not pay
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    fn = "surface_distances"
    a, b = _label_pair(pred_labels, ref_labels, fn, ("pred_labels", "ref_labels"))
    steps = _spacing_list(spacing, a.ndim, fn)
    out: dict[int, dict[str, float]] = {}
    for lab in _label_list(labels, fn):
        in_a = a == lab
        in_b = b == lab
        if not in_a.any() or not in_b.any():
            out[lab] = {"asd": math.nan, "hd95": math.nan}
            continue
        ca, cb = _union_crop(in_a, in_b)
        ya = torch.from_numpy(ca)[None, None]
        yb = torch.from_numpy(cb)[None, None]
        with warnings.catch_warnings():
            # MONAI 1.6 passes its own deprecated ``always_return_as_numpy`` argument
            # internally; hide that FutureWarning, which is not the caller's business.
            warnings.filterwarnings(
                "ignore", message=".*always_return_as_numpy.*", category=FutureWarning
            )
            asd = compute_average_surface_distance(
                ya, yb, include_background=True, symmetric=True, spacing=steps
            )
            hd95 = compute_hausdorff_distance(
                ya, yb, include_background=True, percentile=95, spacing=steps
            )
        out[lab] = {"asd": float(asd.item()), "hd95": float(hd95.item())}
    return out


# --------------------------------------------------------------------------------------------
# Jacobian statistics
# --------------------------------------------------------------------------------------------


def jacobian_stats(
    ddf: ArrayLike,
    spacing: Sequence[float] | None = None,
    mask: ArrayLike | None = None,
) -> dict[str, float]:
    """Regularity of one displacement field: folding and the spread of ``log det J``.

    Built on :func:`ranreg.spatial.jacobian_determinant` (central differences),
    :func:`~ranreg.spatial.folding_fraction` and :func:`~ranreg.spatial.std_log_jacobian`.

    Args:
        ddf: one DDF, ``(1, d, *S)`` or ``(d, *S)``, in voxels (or in the physical units of
            ``spacing`` when that is given; see :func:`~ranreg.spatial.jacobian_determinant`).
            A voxel-unit DDF needs no spacing: ``det J`` does not depend on the voxel size
            when the displacement is measured in voxels.
        spacing: optional voxel size per spatial axis, for a DDF in physical units.
        mask: optional region (nonzero = inside) of shape ``S``, ``(1, *S)`` or ``(1, 1, *S)``;
            only voxels inside it count. An empty mask gives NaN.

    Returns:
        ``{"folding_percent": 100 * fraction of voxels with det <= 0,
        "sd_log_jacobian": population SD of log(clamp(det, 1e-9))}``.
    """
    fn = "jacobian_stats"
    field = torch.as_tensor(ddf)
    if field.ndim in (3, 4) and field.shape[0] == field.ndim - 1:
        field = field[None]
    if field.ndim not in (4, 5) or field.shape[0] != 1:
        raise ValueError(
            f"{fn}: ddf must be one field of shape (1, d, *S) or (d, *S) with d in (2, 3); "
            f"got shape {tuple(field.shape)} (call it once per batch item)"
        )
    if not field.is_floating_point():
        field = field.to(torch.float32)
    jac = jacobian_determinant(field, spacing)
    m: Tensor | None = None
    if mask is not None:
        m = torch.as_tensor(mask, device=jac.device)
        if m.ndim == jac.ndim - 1:
            m = m[None]
    return {
        "folding_percent": 100.0 * float(folding_fraction(jac, m)[0]),
        "sd_log_jacobian": float(std_log_jacobian(jac, m)[0]),
    }


# --------------------------------------------------------------------------------------------
# everything for one pair
# --------------------------------------------------------------------------------------------


def evaluate_pair(
    warped_labels: ArrayLike,
    fixed_labels: ArrayLike,
    labels: Sequence[int],
    spacing: float | Sequence[float],
    ddf: ArrayLike | None = None,
    *,
    jacobian_mask: ArrayLike | None = None,
) -> dict[str, Any]:
    """All metrics for one registered pair.

    Args:
        warped_labels: the moving labels warped into the fixed space, shape ``S`` or
            ``(1, 1, *S)``.
        fixed_labels: the fixed labels, same grid.
        labels: label values to score (e.g. :data:`PAPER_ORGANS`).
        spacing: voxel size of the label grid (mm), for the surface distances.
        ddf: optional DDF ``(1, d, *S)`` or ``(d, *S)`` **in voxels** (as the models output);
            adds the Jacobian statistics. Its grid need not be the label grid.
        jacobian_mask: optional region on the DDF grid for the Jacobian statistics.

    Returns:
        A dict with

        * ``"labels"``: ``{label: {"dice": ..., "asd": ..., "hd95": ...}}``;
        * ``"mean_dice"``, ``"mean_asd"``, ``"mean_hd95"``: means over the labels, NaN entries
          skipped (NaN if every entry is NaN);
        * ``"folding_percent"`` and ``"sd_log_jacobian"`` when ``ddf`` is given
          (see :func:`jacobian_stats`).
    """
    dsc = dice(warped_labels, fixed_labels, labels)
    surf = surface_distances(warped_labels, fixed_labels, labels, spacing)
    per_label: dict[int, dict[str, float]] = {
        lab: {"dice": dsc[lab], "asd": surf[lab]["asd"], "hd95": surf[lab]["hd95"]} for lab in dsc
    }
    result: dict[str, Any] = {"labels": per_label}
    result.update(_means(per_label))
    if ddf is not None:
        result.update(jacobian_stats(ddf, mask=jacobian_mask))
    return result


def _means(per_label: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    return {
        f"mean_{key}": _nanmean([scores[key] for scores in per_label.values()])
        for key in ("dice", "asd", "hd95")
    }
