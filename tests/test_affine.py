"""Affine pre-alignment (ranreg.affine): known rotations and shifts recovered in world space
on anisotropic, non-axis-aligned grids; the ITK transform file read back by ANTs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ranreg.affine import (
    AffineSettings,
    read_itk_affine,
    register_affine,
    rotation_matrix,
    write_itk_affine,
)
from ranreg.data.io import Volume, spacing_from_affine
from ranreg.errors import RanregError

#: blobs of a smooth, asymmetric "anatomy" defined in world space (mm): centre, sigma, height
_RNG = np.random.default_rng(7)
BLOBS = [
    (_RNG.uniform([-45, -35, -30], [45, 35, 30]), _RNG.uniform(6, 12), _RNG.uniform(0.3, 1.0))
    for _ in range(40)
]


def anatomy(points: np.ndarray) -> np.ndarray:
    """Intensity at world points (..., 3): a soft ellipsoidal body with blobs inside."""
    r = np.sqrt(((points / np.array([70.0, 55.0, 45.0])) ** 2).sum(-1))
    value = 0.4 / (1.0 + np.exp((r - 1.0) * 25.0))
    for centre, sigma, height in BLOBS:
        value = value + height * np.exp(-((points - centre) ** 2).sum(-1) / (2 * sigma**2))
    return value.astype(np.float32)


def grid_affine(
    spacing: tuple[float, float, float],
    rotvec: tuple[float, float, float],
    shape: tuple[int, int, int],
) -> np.ndarray:
    """A voxel-to-world affine with oblique axes, centred on the world origin."""
    a = np.eye(4)
    a[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix() @ np.diag(spacing)
    a[:3, 3] = -a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return a


def volume(affine: np.ndarray, shape: tuple[int, int, int], world_map: np.ndarray) -> Volume:
    """The anatomy seen through ``world_map`` (image(p) = anatomy(T p)), sampled exactly."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    p = idx @ affine[:3, :3].T + affine[:3, 3]
    q = p @ world_map[:3, :3].T + world_map[:3, 3]
    return Volume(anatomy(q), affine, spacing_from_affine(affine))


def rigid(axis: tuple[float, float, float], degrees: float, shift: tuple[float, ...]) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(
        np.asarray(axis) / np.linalg.norm(axis) * math.radians(degrees)
    ).as_matrix()
    m[:3, 3] = shift
    return m


FIXED_SHAPE = (44, 40, 26)
FIXED_AFFINE = grid_affine((3.5, 3.0, 4.5), (0.2, -0.3, 0.25), FIXED_SHAPE)
MOVING_SHAPE = (56, 40, 40)
MOVING_AFFINE = grid_affine((2.5, 3.5, 3.0), (-0.1, 0.15, 0.4), MOVING_SHAPE)


@pytest.mark.parametrize(
    ("axis", "degrees", "shift"),
    [
        ((1, 0, 0), 30.0, (12.0, -8.0, 20.0)),
        ((0.3, 1, 0.2), -25.0, (-40.0, 5.0, 3.0)),
        ((0.2, -0.4, 1), 30.0, (6.0, 30.0, -10.0)),
    ],
)
def test_rigid_recovery_within_one_degree_and_one_mm(axis, degrees, shift) -> None:
    truth = rigid(axis, degrees, shift)
    fixed = volume(FIXED_AFFINE, FIXED_SHAPE, truth)
    moving = volume(MOVING_AFFINE, MOVING_SHAPE, np.eye(4))
    est = register_affine(fixed, moving, AffineSettings(mode="rigid"))
    rot_err = Rotation.from_matrix(est[:3, :3] @ truth[:3, :3].T).magnitude()
    assert math.degrees(rot_err) < 1.0
    # displacement error at the points of the anatomy (inside the body)
    pts = np.array([c for c, _, _ in BLOBS])
    err = np.linalg.norm(pts @ (est - truth)[:3, :3].T + (est - truth)[:3, 3], axis=1)
    assert err.max() < 1.0, err.max()


def test_affine_mode_recovers_scaling_and_none_is_identity() -> None:
    truth = rigid((0, 0, 1), 10.0, (5.0, -5.0, 8.0))
    truth[:3, :3] = truth[:3, :3] @ np.diag([1.08, 0.95, 1.0])
    fixed = volume(FIXED_AFFINE, FIXED_SHAPE, truth)
    moving = volume(MOVING_AFFINE, MOVING_SHAPE, np.eye(4))
    est = register_affine(fixed, moving, AffineSettings(mode="affine"))
    pts = np.array([c for c, _, _ in BLOBS])
    err = np.linalg.norm(pts @ (est - truth)[:3, :3].T + (est - truth)[:3, 3], axis=1)
    assert err.mean() < 1.0, err.mean()
    assert np.array_equal(register_affine(fixed, moving, AffineSettings(mode="none")), np.eye(4))


def test_self_registration_stays_at_identity() -> None:
    fixed = volume(FIXED_AFFINE, FIXED_SHAPE, np.eye(4))
    est = register_affine(fixed, fixed, AffineSettings(mode="affine"))
    pts = np.array([c for c, _, _ in BLOBS])
    err = np.linalg.norm(pts @ (est - np.eye(4))[:3, :3].T + est[:3, 3], axis=1)
    assert err.max() < 0.3, err.max()


def test_rotation_matrix_is_a_rotation() -> None:
    import torch

    r = rotation_matrix(torch.tensor([0.3, -0.2, 0.5]))
    np.testing.assert_allclose(
        r.numpy(), Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix(), atol=1e-6
    )


def test_itk_transform_file_round_trip_and_ants_reads_it(tmp_path: Path) -> None:
    m = rigid((0.2, 0.5, 1.0), 17.0, (3.0, -7.0, 11.0))
    m[:3, :3] = m[:3, :3] @ np.diag([1.1, 0.9, 1.05])
    path = write_itk_affine(tmp_path / "affine.txt", m)
    np.testing.assert_allclose(read_itk_affine(path), m, atol=1e-12)
    pytest.importorskip("ants")
    from ranreg.peers import import_ants

    ants = import_ants()  # fixes ITK's thread count first, as the ants-syn peer expects
    tx = ants.read_transform(str(path))
    p_ras = np.array([12.0, -30.0, 45.0])
    q_lps = np.asarray(tx.apply_to_point((-p_ras[0], -p_ras[1], p_ras[2])))
    q_ras = (m @ np.append(p_ras, 1.0))[:3]
    np.testing.assert_allclose(q_lps, [-q_ras[0], -q_ras[1], q_ras[2]], atol=1e-6)


def test_bad_settings_raise_one_line() -> None:
    with pytest.raises(RanregError, match="affine must be one of"):
        AffineSettings(mode="similarity").check()
    with pytest.raises(RanregError, match="similarity must be one of"):
        AffineSettings(similarity="ssd").check()
    with pytest.raises(RanregError, match="levels"):
        AffineSettings(levels=(8.0, -1.0), iterations=(10, 10)).check()


def test_mutual_information_aligns_images_of_different_contrast() -> None:
    """A moving image with inverted, non-linearly mapped intensities (another 'modality')."""
    truth = rigid((0.2, 0.3, 1.0), 15.0, (8.0, -6.0, 10.0))
    fixed = volume(FIXED_AFFINE, FIXED_SHAPE, truth)
    moving = volume(MOVING_AFFINE, MOVING_SHAPE, np.eye(4))
    moving.array = (1.5 - moving.array) ** 2
    est = register_affine(fixed, moving, AffineSettings(mode="rigid", similarity="mi"))
    pts = np.array([c for c, _, _ in BLOBS])
    err = np.linalg.norm(pts @ (est - truth)[:3, :3].T + (est - truth)[:3, 3], axis=1)
    assert err.mean() < 1.5, err.mean()


def _ras_points_through(tx, points_ras: np.ndarray) -> np.ndarray:
    """Where a SimpleITK transform (LPS) sends RAS points."""
    flip = np.array([-1.0, -1.0, 1.0])
    return np.array([tx.TransformPoint(tuple(p * flip)) for p in points_ras]) * flip


def test_linear_itk_files_are_read_as_simpleitk_applies_them(tmp_path: Path) -> None:
    """ANTs' binary .mat, text .tfm and a composite (rigid then affine), each against
    SimpleITK moving the same points; a deformable, a 2D and a broken file are refused."""
    import SimpleITK as sitk

    euler = sitk.Euler3DTransform((10.0, -5.0, 20.0), 0.2, -0.1, 0.3, (4.0, -6.0, 9.0))
    affine = sitk.AffineTransform((1.1, 0.0, 0.02, 0.0, 0.9, 0.05, 0.01, 0.0, 1.0), (1, 2, 3))
    affine.SetCenter((3.0, 2.0, 1.0))
    composite = sitk.CompositeTransform([euler, affine])
    points = np.random.default_rng(0).uniform(-80, 80, size=(20, 3))
    for name, tx in (("0GenericAffine.mat", euler), ("a.tfm", affine), ("c.txt", composite)):
        sitk.WriteTransform(tx, str(tmp_path / name))
        m = read_itk_affine(tmp_path / name)
        np.testing.assert_allclose(
            points @ m[:3, :3].T + m[:3, 3], _ras_points_through(tx, points), atol=1e-9
        )
    field = sitk.Image([4, 4, 4], sitk.sitkVectorFloat64, 3)
    sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(tmp_path / "field.h5"))
    sitk.WriteTransform(sitk.Euler2DTransform(), str(tmp_path / "plane.txt"))
    (tmp_path / "broken.txt").write_text("#Insight Transform File V1.0\nTransform: nonsense\n")
    for name, message in [
        ("field.h5", "not a 3D linear transform"),
        ("plane.txt", "not a 3D linear transform"),
        ("broken.txt", "not an ITK transform file"),
        ("missing.mat", "transform file not found"),
    ]:
        with pytest.raises(RanregError, match=message):
            read_itk_affine(tmp_path / name)


def test_an_affine_written_by_ants_is_read_as_ants_applies_it(tmp_path: Path) -> None:
    pytest.importorskip("ants")
    from ranreg.peers import import_ants

    ants = import_ants()
    tx = ants.create_ants_transform(
        transform_type="AffineTransform",
        matrix=np.array([[0.98, -0.17, 0.05], [0.18, 0.97, -0.02], [-0.04, 0.03, 1.06]]),
        translation=(5.0, -12.0, 7.5),
        center=(20.0, 10.0, -15.0),
    )
    ants.write_transform(tx, str(tmp_path / "0GenericAffine.mat"))
    m = read_itk_affine(tmp_path / "0GenericAffine.mat")
    flip = np.array([-1.0, -1.0, 1.0])
    for p in np.random.default_rng(1).uniform(-80, 80, size=(10, 3)):
        q = np.asarray(tx.apply_to_point(tuple(p * flip))) * flip
        np.testing.assert_allclose(m[:3, :3] @ p + m[:3, 3], q, atol=1e-4)  # float32 in ANTs


def test_the_affine_stage_starts_from_an_initial_affine() -> None:
    """With no optimisation steps the stage returns its start exactly: the initial affine
    (not the centres of mass); ``none`` returns it as it is; optimised from it, the stage
    recovers a 40-degree rotation."""
    truth = rigid((0.3, 1, 0.2), 40.0, (-30.0, 25.0, 10.0))
    fixed = volume(FIXED_AFFINE, FIXED_SHAPE, truth)
    moving = volume(MOVING_AFFINE, MOVING_SHAPE, np.eye(4))
    start = rigid((0.3, 1, 0.2), 35.0, (-26.0, 22.0, 13.0))
    frozen = AffineSettings(mode="rigid", iterations=(0, 0, 0))
    assert np.array_equal(register_affine(fixed, moving, frozen, initial=start), start)
    assert not np.allclose(register_affine(fixed, moving, frozen), start)
    none = AffineSettings(mode="none")
    assert np.array_equal(register_affine(fixed, moving, none, initial=start), start)
    est = register_affine(fixed, moving, AffineSettings(mode="rigid"), initial=start)
    pts = np.array([c for c, _, _ in BLOBS])
    err = np.linalg.norm(pts @ (est - truth)[:3, :3].T + (est - truth)[:3, 3], axis=1)
    assert err.max() < 1.0, err.max()
    with pytest.raises(RanregError, match="singular"):
        register_affine(fixed, moving, none, initial=np.diag([1.0, 0.0, 1.0, 1.0]))


#: oblique thin slabs through the anatomy: 2 or 3 cells across at every level, so the
#: similarity cannot show a shift across the slab or a tilt out of it
SLAB_AFFINES = {n: grid_affine((2.5, 3.0, 2.0), (0.1, -0.15, 0.3), (48, 40, n)) for n in (3, 6)}


def _slab_error(est: np.ndarray, truth: np.ndarray, n: int) -> np.ndarray:
    """|est(p) - truth(p)| (mm) at the slab's voxel centres."""
    shape = (48, 40, n)
    idx = np.stack(np.meshgrid(*[np.arange(k) for k in shape], indexing="ij"), -1).reshape(-1, 3)
    p = idx @ SLAB_AFFINES[n][:3, :3].T + SLAB_AFFINES[n][:3, 3]
    return np.linalg.norm(p @ (est - truth)[:3, :3].T + (est - truth)[:3, 3], axis=1)


@pytest.mark.parametrize("slices", [3, 6])
def test_a_thin_slab_registered_to_itself_stays_put(slices: int) -> None:
    # before, Adam drifted along the directions a slab one or two cells thick cannot show
    # (and the moving slab was read as endlessly thick): 7-18 mm off
    slab = volume(SLAB_AFFINES[slices], (48, 40, slices), np.eye(4))
    est = register_affine(slab, slab, AffineSettings(mode="affine"))
    assert _slab_error(est, np.eye(4), slices).max() < 0.3


@pytest.mark.parametrize("slices", [3, 6])
def test_in_plane_motion_of_a_thin_slab_is_recovered(slices: int) -> None:
    normal = SLAB_AFFINES[slices][:3, 2] / np.linalg.norm(SLAB_AFFINES[slices][:3, 2])
    in_plane = np.cross(normal, [0.0, 0.0, 1.0])
    truth = rigid(tuple(normal), 8.0, tuple(6.0 * in_plane / np.linalg.norm(in_plane)))
    fixed = volume(SLAB_AFFINES[slices], (48, 40, slices), truth)
    moving = volume(SLAB_AFFINES[slices], (48, 40, slices), np.eye(4))
    est = register_affine(fixed, moving, AffineSettings(mode="affine"))
    err = _slab_error(est, truth, slices)
    assert err.mean() < 0.5, err.mean()
