"""Sliding motion: regions that move rigidly against each other, with a discontinuous field.

The paper's motivation (Theorem 1): organs slide past each other, so a registration field
is discontinuous at their boundaries. :func:`sliding_ddf` builds such a field from region
maps, :func:`random_sliding_ddf` draws one for organ groups of a label map,
:func:`shapes_regions` gives simple test regions and :func:`sliding_boundary_mask` the band
where errors are measured. Conventions are those of :mod:`ranreg.synth`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from ranreg.synth import affine_ddf, as_shape, grid_centre, index_grid, per_axis, random_rotation

__all__ = [
    "DEFAULT_SLIDING_GROUPS",
    "random_sliding_ddf",
    "shapes_regions",
    "sliding_boundary_mask",
    "sliding_ddf",
]

#: Default organ groups of :func:`random_sliding_ddf`: the right-sided upper-abdominal block
#: (liver, right kidney, gallbladder, inferior vena cava, right adrenal) versus all the other
#: organs. Every voxel not in a group (label 0 and unlisted labels) is background, region 0.
DEFAULT_SLIDING_GROUPS: tuple[tuple[int, ...], ...] = (
    (2, 4, 6, 9, 12),
    (1, 3, 5, 7, 8, 10, 11, 13),
)

#: Evaluation chunk (grid points) of :func:`tps_ddf`, bounds the kernel matrix to ~50 MB.


def sliding_ddf(
    regions: ArrayLike,
    motions: Mapping[int, tuple[ArrayLike, ArrayLike]],
    center: ArrayLike | None = None,
) -> NDArray[np.float32]:
    """Piecewise-rigid DDF: every region moves with its own rigid (affine) motion.

    Inside region ``r`` the field is ``affine_ddf(S, A_r, t_r, center)``, so it is exactly
    rigid inside each region and discontinuous across region boundaries wherever the motions
    differ. Regions missing from ``motions`` do not move (zero displacement).

    Args:
        regions: integer region map of shape ``S`` (2 or 3 dims), defined on the fixed grid.
        motions: ``{region value: (matrix (d, d), translation (d,))}``.
        center: rotation centre shared by all regions (default: grid centre).

    Returns:
        ``(d, *S)`` float32 DDF.
    """
    reg = np.asarray(regions)
    if not np.issubdtype(reg.dtype, np.integer) and reg.dtype != np.bool_:
        raise ValueError(f"regions must be an integer array, got dtype {reg.dtype}")
    shp = as_shape(reg.shape)
    out = np.zeros((len(shp), *shp), dtype=np.float32)
    for value, (matrix, translation) in motions.items():
        inside = reg == value
        if not inside.any():
            continue
        field = affine_ddf(shp, matrix, translation, center)
        out[:, inside] = field[:, inside]
    return out


def random_sliding_ddf(
    label_map: ArrayLike,
    rng: np.random.Generator,
    groups: Sequence[Sequence[int]] | None = None,
    max_angle: float = math.pi / 18,
    max_translation: float | Sequence[float] | None = None,
    static_background: bool = False,
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Random sliding motion: groups of organs move with different random rigid motions.

    Region ``k`` (1-based) is the union of the labels in ``groups[k - 1]``; everything else
    (label 0 and labels in no group) is the background, region 0. Every region gets an
    independent rigid motion about the grid centre: angle ``U(-max_angle, max_angle)``
    (random axis in 3D) and translation ``t_i ~ U(-T_i, T_i)``; with ``static_background``
    region 0 does not move.

    ``label_map`` is taken as the label map of the *moving* image. The returned ``regions`` live
    on the fixed grid (where the DDF is defined): a fixed voxel ``x`` belongs to organ group
    ``k`` when the rigid motion of group ``k`` maps it into that group in the moving label map,
    ``group(label_map)[R_k(x)] == k`` (nearest neighbour; the first group wins on overlaps); all
    other voxels are background. So warping ``label_map`` with the DDF (nearest neighbour) moves
    every organ group rigidly as a whole, and the DDF is discontinuous where the regions meet.

    Defaults: ``groups`` = :data:`DEFAULT_SLIDING_GROUPS` (liver, right kidney, gallbladder,
    IVC, right adrenal vs the remaining eight organs vs background), ``max_angle`` = pi/18
    (10 degrees), ``max_translation = 0.05 s_i`` voxels per axis (4.8, 4, 6.4 at 96x80x128).

    Args:
        label_map: integer label map of shape ``S`` (2D or 3D).
        rng: random generator.
        groups: label groups, each a sequence of label values; at least one group.
        max_angle: maximum absolute rotation angle per region, radians.
        max_translation: maximum absolute translation per axis, voxels.
        static_background: keep the background still instead of moving it randomly.

    Returns:
        ``(ddf, regions)``: the ``(d, *S)`` float32 DDF and the int64 region map on the fixed
        grid (0 background, ``k`` for ``groups[k - 1]``).
    """
    labels = np.asarray(label_map)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label_map must be an integer array, got dtype {labels.dtype}")
    shp = as_shape(labels.shape)
    d = len(shp)
    grp = DEFAULT_SLIDING_GROUPS if groups is None else tuple(tuple(g) for g in groups)
    if len(grp) < 1:
        raise ValueError("groups must hold at least one group of labels")
    size = np.asarray(shp, dtype=np.float64)
    max_t = (
        0.05 * size if max_translation is None else per_axis(max_translation, d, "max_translation")
    )

    moving_regions = np.zeros(shp, dtype=np.int64)
    for k, g in reversed(list(enumerate(grp, start=1))):  # first group wins on overlaps
        moving_regions[np.isin(labels, np.asarray(g, dtype=labels.dtype))] = k

    motions: dict[int, tuple[NDArray[np.float64], NDArray[np.float64]]] = {}
    for k in range(len(grp) + 1):
        matrix, _, _ = random_rotation(d, rng, max_angle)
        translation = rng.uniform(-max_t, max_t)
        if k == 0 and static_background:
            matrix, translation = np.eye(d), np.zeros(d)
        motions[k] = (matrix, translation)

    centre = grid_centre(shp)
    grid = index_grid(shp)
    fixed_regions = np.zeros(shp, dtype=np.int64)
    for k in range(len(grp), 0, -1):  # reverse so the first group wins
        field = affine_ddf(shp, motions[k][0], motions[k][1], centre)
        sampled = ndimage.map_coordinates(
            moving_regions, grid + field, order=0, mode="constant", cval=0
        )
        fixed_regions[sampled == k] = k
    return sliding_ddf(fixed_regions, motions, centre), fixed_regions


def shapes_regions(
    shape: Sequence[int], kind: str = "halves", axis: int = 0, radius: float | None = None
) -> NDArray[np.int64]:
    """Simple synthetic region maps for sliding-motion tests.

    Args:
        shape: spatial shape ``S`` (2 or 3 sizes).
        kind: ``"halves"``: region 0 for indices ``< s_axis // 2`` along ``axis``, region 1
            for the rest; ``"sphere"``: region 1 inside a ball (disc in 2D) of ``radius``
            voxels about the grid centre, region 0 outside.
        axis: split axis of ``"halves"``.
        radius: ball radius, default ``0.3 * min(S)``.

    Returns:
        int64 region map of shape ``S``.
    """
    shp = as_shape(shape)
    if kind == "halves":
        if not -len(shp) <= axis < len(shp):
            raise ValueError(f"axis {axis} out of range for {len(shp)}D shape")
        idx = np.arange(shp[axis]) >= shp[axis] // 2
        view = [1] * len(shp)
        view[axis] = shp[axis]
        return np.broadcast_to(idx.reshape(view), shp).astype(np.int64)
    if kind == "sphere":
        r = 0.3 * min(shp) if radius is None else float(radius)
        dist2 = np.sum(
            (index_grid(shp) - grid_centre(shp).reshape(-1, *[1] * len(shp))) ** 2, axis=0
        )
        return (dist2 <= r * r).astype(np.int64)
    raise ValueError(f"kind must be 'halves' or 'sphere', got {kind!r}")


def sliding_boundary_mask(regions: ArrayLike, width: float) -> NDArray[np.bool_]:
    """Voxels within ``width`` voxels of a region boundary.

    A voxel of region ``r`` is marked when its Euclidean distance to the nearest voxel of
    another region is at most ``width`` (:func:`scipy.ndimage.distance_transform_edt`). Voxels
    next to a boundary are at distance 1, so ``width=1`` marks the two voxel layers touching the
    boundary (one on each side), ``width=w`` a band ``2w`` voxels thick across a flat boundary,
    and ``width < 1`` nothing. The outer edge of the image is not a boundary.

    Args:
        regions: integer region map (any number of dims).
        width: band half-width in voxels.

    Returns:
        boolean mask of the shape of ``regions``.
    """
    reg = np.asarray(regions)
    mask = np.zeros(reg.shape, dtype=bool)
    values = np.unique(reg)
    if len(values) < 2 or width < 1:
        return mask
    for value in values:
        inside = reg == value
        dist = ndimage.distance_transform_edt(inside)
        mask |= inside & (dist <= width)
    return mask
