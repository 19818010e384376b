"""Tests of ranreg.synth: synthetic rigid/TPS/gaussian and sliding-motion DDFs."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import ndimage
from scipy.interpolate import RBFInterpolator

from ranreg import sliding, synth


def _grid(shape: tuple[int, ...]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))


# ----------------------------------------------------------------------------- rotations


@pytest.mark.parametrize("ndim", [2, 3])
def test_random_rotation_range_and_orthonormal(ndim: int) -> None:
    rng = np.random.default_rng(0)
    max_angle = math.pi / 4
    angles = []
    for _ in range(300):
        matrix, angle, axis = synth.random_rotation(ndim, rng, max_angle)
        angles.append(angle)
        assert matrix.shape == (ndim, ndim)
        assert -max_angle <= angle <= max_angle
        np.testing.assert_allclose(matrix @ matrix.T, np.eye(ndim), atol=1e-12)
        assert np.linalg.det(matrix) == pytest.approx(1.0, abs=1e-12)
        # rotation angle from the trace: tr = (ndim - 2) + 2 cos(angle)
        cos = (np.trace(matrix) - (ndim - 2)) / 2
        assert math.acos(np.clip(cos, -1, 1)) == pytest.approx(abs(angle), abs=1e-6)
        if ndim == 3:
            assert axis is not None
            assert np.linalg.norm(axis) == pytest.approx(1.0)
            np.testing.assert_allclose(matrix @ axis, axis, atol=1e-12)  # axis is fixed
        else:
            assert axis is None
            np.testing.assert_allclose(
                matrix, [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
            )
    angles_arr = np.asarray(angles)
    # roughly uniform over the whole range
    assert angles_arr.min() < -0.8 * max_angle and angles_arr.max() > 0.8 * max_angle
    assert abs(angles_arr.mean()) < 0.15


def test_random_rotation_axis_covers_sphere_and_is_deterministic() -> None:
    axes = np.array([synth.random_rotation(3, np.random.default_rng(i))[2] for i in range(200)])
    assert np.all(np.abs(axes.mean(axis=0)) < 0.2)
    a = synth.random_rotation(3, np.random.default_rng(7), 0.3)
    b = synth.random_rotation(3, np.random.default_rng(7), 0.3)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    with pytest.raises(ValueError):
        synth.random_rotation(4, np.random.default_rng(0))


# ----------------------------------------------------------------------------- affine


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 7)])
def test_affine_ddf_identity_translation_and_formula(shape: tuple[int, ...]) -> None:
    d = len(shape)
    assert synth.affine_ddf(shape, np.eye(d)).shape == (d, *shape)
    np.testing.assert_array_equal(synth.affine_ddf(shape, np.eye(d)), 0.0)
    t = np.arange(1, d + 1) * 0.5
    ddf = synth.affine_ddf(shape, np.eye(d), t)
    assert ddf.dtype == np.float32
    for i in range(d):
        np.testing.assert_allclose(ddf[i], t[i])
    rng = np.random.default_rng(1)
    a = rng.normal(size=(d, d))
    c = rng.normal(size=d) + 2
    ddf = synth.affine_ddf(shape, a, t, center=c)
    x = _grid(shape)
    expected = (
        np.einsum("ij,j...->i...", a, x - c.reshape(-1, *[1] * d))
        + (c + t).reshape(-1, *[1] * d)
        - x
    )
    np.testing.assert_allclose(ddf, expected, atol=1e-5)
    # default centre = grid centre: a pure rotation leaves the centre voxel still (odd sizes)
    rot = synth.random_rotation(d, rng)[0]
    odd = tuple(s | 1 for s in shape)
    mid = tuple(s // 2 for s in odd)
    np.testing.assert_allclose(synth.affine_ddf(odd, rot)[(slice(None), *mid)], 0.0, atol=1e-6)


def test_affine_ddf_matches_scipy_affine_transform_through_warp() -> None:
    """Convention check with ranreg.spatial.warp against scipy.ndimage.affine_transform."""
    spatial = pytest.importorskip("ranreg.spatial")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    shape = (12, 10, 14)
    image = ndimage.gaussian_filter(rng.random(shape), 1.5)
    a = synth.random_rotation(3, rng, 0.3)[0]
    t = np.array([0.7, -1.2, 0.4])
    c = synth.grid_centre(shape)
    ddf = synth.affine_ddf(shape, a, t)
    ref = ndimage.affine_transform(image, a, offset=c + t - a @ c, order=1, mode="nearest")
    warped = spatial.warp(
        torch.from_numpy(image)[None, None], torch.from_numpy(ddf.astype(np.float64))[None]
    )[0, 0].numpy()
    np.testing.assert_allclose(warped, ref, atol=1e-6)


# ----------------------------------------------------------------------------- TPS / bumps


@pytest.mark.parametrize("shape", [(20, 24), (12, 10, 14)])
def test_tps_passes_through_control_points(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(2)
    d = len(shape)
    n = 12
    flat = rng.choice(int(np.prod(shape)), size=n, replace=False)
    points = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.float64)
    disp = rng.uniform(-3, 3, size=(n, d))
    ddf = synth.tps_ddf(shape, points, disp)
    assert ddf.shape == (d, *shape) and ddf.dtype == np.float32
    at_points = ddf[(slice(None), *points.astype(int).T)].T
    np.testing.assert_allclose(at_points, disp, atol=1e-4)
    # same interpolant as scipy's RBFInterpolator at a few arbitrary voxels
    ref = RBFInterpolator(points, disp, kernel="thin_plate_spline", smoothing=0.0)
    probe = np.stack([rng.integers(0, s, 5) for s in shape], axis=1)
    np.testing.assert_allclose(
        ddf[(slice(None), *probe.T)].T, ref(probe.astype(np.float64)), atol=1e-4
    )


def test_tps_reproduces_affine_displacements() -> None:
    """A TPS with a linear polynomial part reproduces an affine field exactly."""
    rng = np.random.default_rng(4)
    shape = (9, 11, 8)
    m = rng.normal(scale=0.1, size=(3, 3))
    b = rng.normal(size=3)
    points = rng.uniform(0, np.array(shape) - 1, size=(10, 3))
    ddf = synth.tps_ddf(shape, points, points @ m.T + b)
    expected = np.einsum("ij,j...->i...", m, _grid(shape)) + b.reshape(3, 1, 1, 1)
    np.testing.assert_allclose(ddf, expected, atol=1e-4)
    with pytest.raises(ValueError):
        synth.tps_ddf(shape, points[:3], points[:3])  # too few points for a 3D TPS


@pytest.mark.parametrize("shape", [(21, 17), (11, 13, 9)])
def test_gaussian_bumps(shape: tuple[int, ...]) -> None:
    d = len(shape)
    centre = np.array([[s // 2 for s in shape]], dtype=np.float64)
    vec = np.arange(1, d + 1, dtype=np.float64)[None] * 2.0
    sigma = 3.0
    ddf = synth.gaussian_bumps_ddf(shape, centre, vec, sigma)
    c_idx = tuple(int(v) for v in centre[0])
    np.testing.assert_allclose(ddf[(slice(None), *c_idx)], vec[0], rtol=1e-6)
    one_sigma = list(c_idx)
    one_sigma[0] += 3
    np.testing.assert_allclose(ddf[(slice(None), *one_sigma)], vec[0] * math.exp(-0.5), rtol=1e-5)
    # hand formula for two bumps with per-axis sigma
    rng = np.random.default_rng(5)
    centers = rng.uniform(0, np.array(shape) - 1, size=(2, d))
    vectors = rng.normal(size=(2, d))
    sig = np.linspace(2.0, 4.0, d)
    x = _grid(shape)
    expected = np.zeros((d, *shape))
    for k in range(2):
        g = np.exp(
            -np.sum(
                (x - centers[k].reshape(-1, *[1] * d)) ** 2 / (2 * sig.reshape(-1, *[1] * d) ** 2),
                axis=0,
            )
        )
        expected += vectors[k].reshape(-1, *[1] * d) * g
    got = synth.gaussian_bumps_ddf(shape, centers, vectors, sig)
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ----------------------------------------------------------------------------- random_ddf


@pytest.mark.parametrize("shape", [(24, 20), (16, 14, 18)])
def test_random_ddf_deterministic_and_reconstructible(shape: tuple[int, ...]) -> None:
    d = len(shape)
    ddf1, p1 = synth.random_ddf(shape, np.random.default_rng(42))
    ddf2, p2 = synth.random_ddf(shape, np.random.default_rng(42))
    ddf3, _ = synth.random_ddf(shape, np.random.default_rng(43))
    assert ddf1.shape == (d, *shape) and ddf1.dtype == np.float32
    np.testing.assert_array_equal(ddf1, ddf2)
    assert not np.allclose(ddf1, ddf3)
    for key in ("angle", "translation", "points"):
        np.testing.assert_array_equal(p1[key], p2[key])
    assert abs(p1["angle"]) <= math.pi / 4
    assert p1["points"].shape == (20, d)
    assert np.all(p1["points"] >= 0) and np.all(p1["points"] <= np.array(shape) - 1)
    assert np.all(np.abs(p1["translation"]) <= 0.1 * np.array(shape))
    assert (p1["axis"] is None) == (d == 2)
    # rebuild from the recorded parameters: x -> R(x + u_D(x))
    deform = synth.tps_ddf(shape, p1["points"], p1["tps_displacements"]).astype(np.float64)
    deform += synth.gaussian_bumps_ddf(shape, p1["points"], p1["bump_vectors"], p1["bump_sigma"])
    rigid = synth.affine_ddf(shape, p1["matrix"], p1["translation"])
    expected = rigid + np.einsum("ij,j...->i...", p1["matrix"], deform)
    np.testing.assert_allclose(ddf1, expected, atol=1e-4)


def test_random_ddf_rigid_only_and_options() -> None:
    shape = (10, 12, 8)
    ddf, p = synth.random_ddf(shape, np.random.default_rng(0), tps_scale=0.0, bump_scale=0.0)
    np.testing.assert_allclose(
        ddf, synth.affine_ddf(shape, p["matrix"], p["translation"]), atol=1e-5
    )
    ddf, p = synth.random_ddf(
        shape, np.random.default_rng(0), max_angle=0.0, max_translation=0.0, bump_scale=0.0
    )
    assert p["angle"] == 0.0
    np.testing.assert_allclose(
        ddf, synth.tps_ddf(shape, p["points"], p["tps_displacements"]), atol=1e-5
    )
    with pytest.raises(ValueError):
        synth.random_ddf((4, 4, 4, 4), np.random.default_rng(0))


def test_random_ddf_full_size_timing() -> None:
    shape = (96, 80, 128)
    start = time.perf_counter()
    ddf, _ = synth.random_ddf(shape, np.random.default_rng(0))
    elapsed = time.perf_counter() - start
    assert ddf.shape == (3, *shape) and np.all(np.isfinite(ddf))
    assert elapsed < 15.0, f"random_ddf at {shape} took {elapsed:.1f} s"


# ----------------------------------------------------------------------------- sliding


def test_shapes_regions() -> None:
    halves = sliding.shapes_regions((8, 6, 5))
    assert halves.dtype == np.int64
    assert np.all(halves[:4] == 0) and np.all(halves[4:] == 1)
    halves1 = sliding.shapes_regions((6, 9), axis=1)
    assert np.all(halves1[:, :4] == 0) and np.all(halves1[:, 4:] == 1)
    ball = sliding.shapes_regions((21, 21, 21), kind="sphere", radius=5)
    assert ball[10, 10, 10] == 1 and ball[10, 10, 15] == 1 and ball[10, 10, 16] == 0
    assert ball[0, 0, 0] == 0
    assert set(np.unique(sliding.shapes_regions((20, 20), "sphere"))) == {0, 1}
    with pytest.raises(ValueError):
        sliding.shapes_regions((4, 4), kind="cube")


def test_sliding_translation_jump_is_exact() -> None:
    shape = (12, 10, 8)
    regions = sliding.shapes_regions(shape, "halves", axis=0)
    t0, t1 = np.array([0.0, 2.0, -1.0]), np.array([0.5, -3.0, 1.0])
    ddf = sliding.sliding_ddf(regions, {0: (np.eye(3), t0), 1: (np.eye(3), t1)})
    assert ddf.shape == (3, *shape) and ddf.dtype == np.float32
    np.testing.assert_allclose(ddf[:, :6], np.broadcast_to(t0.reshape(3, 1, 1, 1), (3, 6, 10, 8)))
    np.testing.assert_allclose(ddf[:, 6:], np.broadcast_to(t1.reshape(3, 1, 1, 1), (3, 6, 10, 8)))
    jump = np.linalg.norm(ddf[:, 6] - ddf[:, 5], axis=0)
    np.testing.assert_allclose(jump, np.linalg.norm(t1 - t0), rtol=1e-6)
    # regions absent from ``motions`` stay still
    still = sliding.sliding_ddf(regions, {1: (np.eye(3), t1)})
    np.testing.assert_array_equal(still[:, :6], 0.0)


@pytest.mark.parametrize("kind", ["halves", "sphere"])
def test_sliding_rigid_inside_and_discontinuous_across(kind: str) -> None:
    shape = (16, 14, 12)
    rng = np.random.default_rng(9)
    regions = sliding.shapes_regions(shape, kind)
    motions = {}
    for r in (0, 1):
        a = synth.random_rotation(3, rng, math.pi / 12)[0]
        motions[r] = (a, rng.uniform(-3, 3, size=3))
    motions[1] = (motions[1][0], motions[0][1] + np.array([4.0, -4.0, 3.0]))
    ddf = sliding.sliding_ddf(regions, motions).astype(np.float64)
    for r, (a, t) in motions.items():
        field = synth.affine_ddf(shape, a, t)
        inside = regions == r
        np.testing.assert_allclose(ddf[:, inside], field[:, inside], atol=1e-5)  # exactly rigid
    # a rigid field changes by at most ||A - I||_2 per voxel step
    max_inside = max(np.linalg.norm(a - np.eye(3), 2) for a, _ in motions.values())
    u = {r: synth.affine_ddf(shape, a, t) for r, (a, t) in motions.items()}
    gap = np.linalg.norm(u[1] - u[0], axis=0)  # motion difference at each voxel
    n_cross = 0
    for axis in range(3):
        step = np.linalg.norm(np.diff(ddf, axis=1 + axis), axis=0)
        cross = np.diff(regions, axis=axis) != 0
        assert step[~cross].max() <= max_inside + 1e-5  # smooth inside the regions
        if not cross.any():  # "halves" is split along axis 0 only
            continue
        n_cross += int(cross.sum())
        # across the boundary: at least the motion difference minus one rigid step
        gap_left = np.take(gap, range(shape[axis] - 1), axis=axis)
        assert np.all(step[cross] >= gap_left[cross] - max_inside - 1e-5)
        assert step[cross].min() > 3 * max_inside
    assert n_cross > 0


def test_sliding_jacobian_is_one_away_from_boundary() -> None:
    spatial = pytest.importorskip("ranreg.spatial")
    torch = pytest.importorskip("torch")
    shape = (14, 12, 10)
    rng = np.random.default_rng(11)
    regions = sliding.shapes_regions(shape, "sphere")
    motions = {r: (synth.random_rotation(3, rng, 0.3)[0], rng.uniform(-2, 2, 3)) for r in (0, 1)}
    ddf = sliding.sliding_ddf(regions, motions)
    jac = spatial.jacobian_determinant(torch.from_numpy(ddf.astype(np.float64))[None])[0].numpy()
    away = ~sliding.sliding_boundary_mask(regions, 1)
    np.testing.assert_allclose(jac[away], 1.0, atol=1e-5)
    assert np.abs(jac[~away] - 1.0).max() > 1e-2


def _toy_abdomen(shape: tuple[int, ...]) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int64)
    x = _grid(shape)
    blobs = {6: (0.35, 0.3, 0.25), 2: (0.6, 0.25, 0.2), 1: (0.4, 0.7, 0.18), 7: (0.65, 0.65, 0.15)}
    for value, (u, v, r) in blobs.items():
        c = np.array([u, v, 0.5][: len(shape)]) * (np.array(shape) - 1)
        dist = np.sqrt(np.sum((x - c.reshape(-1, *[1] * len(shape))) ** 2, axis=0))
        labels[dist <= r * min(shape)] = value
    return labels


@pytest.mark.parametrize("shape", [(32, 28), (24, 22, 20)])
def test_random_sliding_ddf(shape: tuple[int, ...]) -> None:
    d = len(shape)
    labels = _toy_abdomen(shape)
    ddf, regions = sliding.random_sliding_ddf(labels, np.random.default_rng(5))
    ddf2, regions2 = sliding.random_sliding_ddf(labels, np.random.default_rng(5))
    np.testing.assert_array_equal(ddf, ddf2)
    np.testing.assert_array_equal(regions, regions2)
    assert ddf.shape == (d, *shape) and ddf.dtype == np.float32
    assert set(np.unique(regions)) == {0, 1, 2}
    group_of = {6: 1, 2: 1, 1: 2, 7: 2}
    moving_group = np.vectorize(lambda v: group_of.get(int(v), 0))(labels)
    x = _grid(shape)
    fits = []
    for r in (0, 1, 2):
        inside = regions == r
        # exactly affine inside each region, with a rotation matrix
        design = np.concatenate([x[:, inside].T, np.ones((inside.sum(), 1))], axis=1)
        target = (x + ddf)[:, inside].T
        coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        np.testing.assert_allclose(design @ coef, target, atol=1e-3)
        a = coef[:d].T
        np.testing.assert_allclose(a @ a.T, np.eye(d), atol=1e-4)
        assert np.linalg.norm(a - np.eye(d), 2) <= 2 * math.sin(math.pi / 36) + 1e-4  # <= 10 deg
        fits.append(coef)
        if r > 0:
            # each fixed voxel of group r samples the moving image inside group r
            pos = np.rint((x + ddf)[:, inside]).astype(int)
            valid = np.all((pos >= 0) & (pos < np.array(shape)[:, None]), axis=0)
            assert np.all(moving_group[tuple(pos[:, valid])] == r)
    assert not np.allclose(fits[0], fits[1]) and not np.allclose(fits[1], fits[2])
    # every organ voxel of the moving image is reached from its own group's region
    assert np.sum(regions == 1) == pytest.approx(np.sum(moving_group == 1), rel=0.15)


def test_random_sliding_ddf_static_background_and_groups() -> None:
    shape = (20, 18, 16)
    labels = _toy_abdomen(shape)
    ddf, regions = sliding.random_sliding_ddf(
        labels, np.random.default_rng(1), groups=[(6,), (2, 1, 7)], static_background=True
    )
    np.testing.assert_array_equal(ddf[:, regions == 0], 0.0)
    assert set(np.unique(regions)) == {0, 1, 2}
    with pytest.raises(ValueError):
        sliding.random_sliding_ddf(labels.astype(float), np.random.default_rng(0))


def test_sliding_boundary_mask_width() -> None:
    regions = sliding.shapes_regions((20, 6, 5), "halves")
    for width in (1, 2, 3):
        mask = sliding.sliding_boundary_mask(regions, width)
        rows = np.flatnonzero(mask.any(axis=(1, 2)))
        np.testing.assert_array_equal(rows, np.arange(10 - width, 10 + width))
        assert np.all(mask[rows])
    assert not sliding.sliding_boundary_mask(regions, 0).any()
    assert not sliding.sliding_boundary_mask(np.ones((5, 5), dtype=int), 3).any()
    # sphere: marked voxels lie within width (+ voxel discretisation) of the surface
    shape = (25, 25, 25)
    ball = sliding.shapes_regions(shape, "sphere", radius=7)
    mask = sliding.sliding_boundary_mask(ball, 2)
    dist = np.sqrt(np.sum((_grid(shape) - 12.0) ** 2, axis=0))
    assert np.all(np.abs(dist[mask] - 7) <= 2 + 1.0)
    assert np.all(mask[np.abs(dist - 7.25) <= 0.5])
    assert not mask[12, 12, 12] and not mask[0, 0, 0]
