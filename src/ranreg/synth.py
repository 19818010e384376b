"""Synthetic displacement fields for stage-1 pre-training and for sliding-motion experiments.

Supplement section 3: the networks are first trained on a synthetic DDF that combines a rigid
transformation (rotation angle ``U(-pi/4, pi/4)`` about an arbitrary axis, plus a translation)
with a thin-plate-spline and a gaussian deformation driven by 20 random control points drawn
uniformly in the image domain.

Conventions (shared with :mod:`ranreg.spatial` and :mod:`ranreg.losses`):

* a DDF is a ``numpy.float32`` array of shape ``(d, *S)`` with ``d`` in ``{2, 3}``;
* displacements are in **voxel** units and channel ``i`` displaces tensor axis ``i``;
* the warped image is ``warped(x) = moving(x + ddf(x))`` (the DDF lives on the fixed grid and
  points into the moving image);
* matrices act on voxel-index coordinates ordered like the tensor axes (voxel spacing is not
  taken into account: a "rotation" of an anisotropic volume is a rotation of its index grid).

Every random function takes a :class:`numpy.random.Generator` and is deterministic given its state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.interpolate import RBFInterpolator
from scipy.spatial.transform import Rotation

__all__ = [
    "affine_ddf",
    "as_shape",
    "gaussian_bumps_ddf",
    "grid_centre",
    "index_grid",
    "per_axis",
    "random_ddf",
    "random_rotation",
    "tps_ddf",
]


_TPS_CHUNK = 1 << 17


def as_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as a tuple of 2 or 3 positive ints (ValueError otherwise)."""
    out = tuple(int(s) for s in shape)
    if len(out) not in (2, 3) or any(s < 1 for s in out):
        raise ValueError(f"shape must have 2 or 3 positive sizes, got {shape!r}")
    return out


def grid_centre(shape: Sequence[int]) -> NDArray[np.float64]:
    """Centre of a voxel grid in index coordinates, ``(s - 1) / 2`` per axis."""
    return (np.asarray(as_shape(shape), dtype=np.float64) - 1.0) / 2.0


def index_grid(shape: tuple[int, ...]) -> NDArray[np.float64]:
    """Index coordinates, shape ``(d, *shape)``."""
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))


def per_axis(value: float | Sequence[float] | NDArray[Any], ndim: int, name: str) -> NDArray[Any]:
    """One finite value per axis: a scalar repeated, or ``ndim`` values (``name`` in errors)."""
    arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (ndim,)).copy()
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return arr


def random_rotation(
    ndim: int, rng: np.random.Generator, max_angle: float = math.pi / 4
) -> tuple[NDArray[np.float64], float, NDArray[np.float64] | None]:
    """Draw a random rotation with angle ``U(-max_angle, max_angle)``.

    In 3D the axis is uniformly distributed on the unit sphere (a normalised standard normal
    vector) and the matrix comes from :class:`scipy.spatial.transform.Rotation`; in 2D the
    rotation is in-plane and ``axis`` is ``None``.

    Args:
        ndim: 2 or 3.
        rng: random generator (the only source of randomness).
        max_angle: half-width of the uniform angle distribution, radians.

    Returns:
        ``(matrix, angle, axis)``: a ``(ndim, ndim)`` orthonormal matrix with determinant 1 acting
        on index coordinates, the angle in radians, and the unit axis (3D) or ``None`` (2D).
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if max_angle < 0:
        raise ValueError(f"max_angle must be >= 0, got {max_angle}")
    angle = float(rng.uniform(-max_angle, max_angle))
    if ndim == 2:
        c, s = math.cos(angle), math.sin(angle)
        return np.array([[c, -s], [s, c]], dtype=np.float64), angle, None
    axis = rng.standard_normal(3)
    while np.linalg.norm(axis) < 1e-12:  # practically never
        axis = rng.standard_normal(3)
    axis = axis / np.linalg.norm(axis)
    matrix = Rotation.from_rotvec(angle * axis).as_matrix()
    return matrix, angle, axis


def affine_ddf(
    shape: Sequence[int],
    matrix: ArrayLike,
    translation: ArrayLike | None = None,
    center: ArrayLike | None = None,
) -> NDArray[np.float32]:
    """DDF of the affine map ``x -> A (x - c) + c + t``.

    ``ddf(x) = A (x - c) + c + t - x``; so the warped image samples the moving image at the
    affinely transformed fixed-grid position.

    Args:
        shape: spatial shape ``S`` (2 or 3 sizes).
        matrix: ``(d, d)`` matrix ``A``.
        translation: ``(d,)`` translation ``t`` in voxels (default zero).
        center: ``(d,)`` centre ``c`` in index coordinates (default: grid centre ``(s-1)/2``).

    Returns:
        ``(d, *S)`` float32 DDF.
    """
    shp = as_shape(shape)
    d = len(shp)
    a = np.asarray(matrix, dtype=np.float64)
    if a.shape != (d, d):
        raise ValueError(f"matrix must have shape {(d, d)}, got {a.shape}")
    t = np.zeros(d) if translation is None else per_axis(translation, d, "translation")
    c = grid_centre(shp) if center is None else per_axis(center, d, "center")
    # Separable evaluation: A (x - c) is a sum over input axes of outer-broadcast 1D terms.
    m = a - np.eye(d)
    offset = t - m @ c
    out = np.empty((d, *shp), dtype=np.float32)
    coords = [np.arange(s, dtype=np.float64) for s in shp]
    for i in range(d):
        acc = np.full(shp, offset[i], dtype=np.float64)
        for j in range(d):
            if m[i, j] != 0.0:
                view = [1] * d
                view[j] = shp[j]
                acc = acc + m[i, j] * coords[j].reshape(view)
        out[i] = acc
    return out


def _check_points(
    points: ArrayLike, values: ArrayLike, d: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    p = np.asarray(points, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != d:
        raise ValueError(f"points must have shape (n, {d}), got {p.shape}")
    if v.shape != p.shape:
        raise ValueError(f"displacements/vectors must have shape {p.shape}, got {v.shape}")
    return p, v


def _tps_eval(
    points: NDArray[np.float64], displacements: NDArray[np.float64], coords: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Evaluate the exact TPS interpolant of ``displacements`` at ``coords`` ``(m, d)``."""
    d = points.shape[1]
    if len(points) < d + 1:
        raise ValueError(f"a {d}D thin-plate spline needs at least {d + 1} control points")
    interp = RBFInterpolator(
        points, displacements, kernel="thin_plate_spline", smoothing=0.0, degree=1
    )
    out = np.empty((len(coords), d), dtype=np.float64)
    for start in range(0, len(coords), _TPS_CHUNK):
        out[start : start + _TPS_CHUNK] = interp(coords[start : start + _TPS_CHUNK])
    return out


def tps_ddf(
    shape: Sequence[int], points: ArrayLike, displacements: ArrayLike
) -> NDArray[np.float32]:
    """Thin-plate-spline interpolation of displacement vectors given at control points.

    Uses :class:`scipy.interpolate.RBFInterpolator` with the ``thin_plate_spline`` kernel
    (``r^2 log r``), ``smoothing=0`` and the default linear polynomial, so the field passes
    exactly through the control displacements. The grid is evaluated in chunks.

    Args:
        shape: spatial shape ``S``.
        points: ``(n, d)`` control points in index coordinates (``n >= d + 1``, not all on one
            line/plane, distinct).
        displacements: ``(n, d)`` displacement vectors (voxels) at the control points.

    Returns:
        ``(d, *S)`` float32 DDF.
    """
    shp = as_shape(shape)
    d = len(shp)
    p, v = _check_points(points, displacements, d)
    coords = index_grid(shp).reshape(d, -1).T
    vals = _tps_eval(p, v, coords)
    return np.ascontiguousarray(vals.T.reshape(d, *shp), dtype=np.float32)


def _bump_profiles(
    shp: tuple[int, ...], centers: NDArray[np.float64], sigma: NDArray[np.float64]
) -> list[NDArray[np.float64]]:
    """Per axis, the 1D gaussian profiles ``(n, s_i)`` of every bump."""
    out = []
    for i, s in enumerate(shp):
        x = np.arange(s, dtype=np.float64)
        out.append(np.exp(-((x[None, :] - centers[:, i, None]) ** 2) / (2.0 * sigma[i] ** 2)))
    return out


def gaussian_bumps_ddf(
    shape: Sequence[int],
    centers: ArrayLike,
    vectors: ArrayLike,
    sigma: float | Sequence[float],
) -> NDArray[np.float32]:
    """Sum of gaussian displacement bumps.

    ``ddf(x) = sum_k v_k exp(-sum_i (x_i - c_ki)^2 / (2 sigma_i^2))``; the peak displacement of
    an isolated bump is ``v_k`` at its centre.

    Args:
        shape: spatial shape ``S``.
        centers: ``(n, d)`` bump centres in index coordinates.
        vectors: ``(n, d)`` displacement vectors (voxels) at the centres.
        sigma: gaussian width in voxels, one number or one per axis (must be > 0).

    Returns:
        ``(d, *S)`` float32 DDF.
    """
    shp = as_shape(shape)
    d = len(shp)
    c, v = _check_points(centers, vectors, d)
    sig = per_axis(sigma, d, "sigma")
    if np.any(sig <= 0):
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    profiles = _bump_profiles(shp, c, sig)
    out = np.zeros((d, *shp), dtype=np.float64)
    for k in range(len(c)):
        g = profiles[0][k]
        for i in range(1, d):
            g = np.multiply.outer(g, profiles[i][k])
        for i in range(d):
            if v[k, i] != 0.0:
                out[i] += v[k, i] * g
    return out.astype(np.float32)


def _ddf_scales(
    shp: tuple[int, ...],
    max_translation: float | Sequence[float] | None,
    tps_scale: float | Sequence[float] | None,
    bump_scale: float | Sequence[float] | None,
    bump_sigma: float | Sequence[float] | None,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Per-axis ranges of :func:`random_ddf`: the given values or its fractions of ``shp``."""
    d = len(shp)
    size = np.asarray(shp, dtype=np.float64)

    def _default(value: float | Sequence[float] | None, frac: float, name: str) -> NDArray[Any]:
        arr = frac * size if value is None else per_axis(value, d, name)
        if np.any(arr < 0):
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        return arr

    max_t = _default(max_translation, 0.1, "max_translation")
    tps_s = _default(tps_scale, 0.05, "tps_scale")
    bump_s = _default(bump_scale, 0.05, "bump_scale")
    sig = _default(bump_sigma, 0.1, "bump_sigma")
    if np.any(sig <= 0):
        raise ValueError(f"bump_sigma must be > 0, got {bump_sigma!r}")
    return max_t, tps_s, bump_s, sig


def _compose_field(
    shp: tuple[int, ...], params: dict[str, Any], tps_s: NDArray[Any], bump_s: NDArray[Any]
) -> NDArray[np.float32]:
    """The DDF of :func:`random_ddf` from its draws ``params``; no randomness here.

    ``ddf(x) = A (x + u_D(x) - c) + c + t - x`` with ``u_D = tps + bumps``; a term whose
    scale (``tps_s``, ``bump_s``) is zero on every axis, or has no points, is left out.
    """
    matrix, points = params["matrix"], params["points"]
    n_points = len(points)
    deform = np.zeros((len(shp), *shp), dtype=np.float64)
    if n_points > 0 and np.any(tps_s > 0):
        deform += tps_ddf(shp, points, params["tps_displacements"])
    if n_points > 0 and np.any(bump_s > 0):
        deform += gaussian_bumps_ddf(shp, points, params["bump_vectors"], params["bump_sigma"])
    # ddf(x) = (A - I)(x - c) + t + A u_D(x)
    ddf = affine_ddf(shp, matrix, params["translation"], params["center"]).astype(np.float64)
    ddf += np.tensordot(matrix, deform, axes=(1, 0))
    return ddf.astype(np.float32)


def random_ddf(
    shape: Sequence[int],
    rng: np.random.Generator,
    *,
    max_angle: float = math.pi / 4,
    max_translation: float | Sequence[float] | None = None,
    n_points: int = 20,
    tps_scale: float | Sequence[float] | None = None,
    bump_scale: float | Sequence[float] | None = None,
    bump_sigma: float | Sequence[float] | None = None,
) -> tuple[NDArray[np.float32], dict[str, Any]]:
    """Stage-1 synthetic DDF: rigid motion composed with a TPS + gaussian deformation.

    Draws (in this order, from ``rng``):

    1. a rotation (:func:`random_rotation`, angle ``U(-max_angle, max_angle)``, random axis in
       3D) about the grid centre ``c``, and a translation ``t_i ~ U(-T_i, T_i)``;
    2. ``n_points`` control points uniformly in the continuous domain ``[0, s_i - 1]``;
    3. TPS displacements at the points, each component ``U(-tps_scale_i, tps_scale_i)``;
    4. gaussian bump vectors at the same points, each component
       ``U(-bump_scale_i, bump_scale_i)``, width ``bump_sigma``.

    The local deformation ``u_D = tps + bumps`` and the rigid map ``R(y) = A (y - c) + c + t``
    are composed as ``x -> R(x + u_D(x))``, i.e. ``ddf(x) = A (x + u_D(x) - c) + c + t - x``
    (deform on the fixed grid, then move rigidly). The composition is exact (the rigid map is
    evaluated analytically, no resampling).

    Defaults (``s_i`` = size of axis ``i``; for 96x80x128 in brackets):

    * ``max_translation = 0.1 s_i`` (9.6, 8, 12.8 voxels);
    * ``tps_scale = 0.05 s_i`` (4.8, 4, 6.4 voxels) per component at the control points;
    * ``bump_scale = 0.05 s_i`` (4.8, 4, 6.4 voxels) per component at the bump centres;
    * ``bump_sigma = 0.1 s_i`` (9.6, 8, 12.8 voxels).

    Args:
        shape: spatial shape ``S`` (2 or 3 sizes).
        rng: random generator.
        max_angle: maximum absolute rotation angle, radians (supplement: pi/4).
        max_translation: maximum absolute translation per axis, voxels.
        n_points: number of control points / bump centres (supplement: 20); >= d + 1 when the
            TPS is active (``tps_scale`` not all zero).
        tps_scale: maximum absolute TPS displacement component at a control point, voxels.
        bump_scale: maximum absolute gaussian-bump displacement component, voxels.
        bump_sigma: gaussian bump width, voxels.

    Returns:
        ``(ddf, params)``: the ``(d, *S)`` float32 DDF and a dict with ``angle``, ``axis``
        (``None`` in 2D), ``matrix``, ``translation``, ``center``, ``points``,
        ``tps_displacements``, ``bump_vectors``, ``bump_sigma`` and ``composition``.
    """
    shp = as_shape(shape)
    d = len(shp)
    size = np.asarray(shp, dtype=np.float64)
    max_t, tps_s, bump_s, sig = _ddf_scales(shp, max_translation, tps_scale, bump_scale, bump_sigma)
    if n_points < 0:
        raise ValueError(f"n_points must be >= 0, got {n_points}")

    # every draw happens here, before any field is built, in the documented order
    matrix, angle, axis = random_rotation(d, rng, max_angle)
    translation = rng.uniform(-max_t, max_t)
    centre = grid_centre(shp)
    points = rng.uniform(0.0, size - 1.0, size=(n_points, d))
    tps_disp = rng.uniform(-tps_s, tps_s, size=(n_points, d))
    bump_vec = rng.uniform(-bump_s, bump_s, size=(n_points, d))

    params: dict[str, Any] = {
        "angle": angle,
        "axis": axis,
        "matrix": matrix,
        "translation": translation,
        "center": centre,
        "points": points,
        "tps_displacements": tps_disp,
        "bump_vectors": bump_vec,
        "bump_sigma": sig,
        "composition": "rigid(x + deform(x))",
    }
    return _compose_field(shp, params, tps_s, bump_s), params
