"""Outputs that ITK-based tools read correctly: ``ddf.nii.gz`` applied by SimpleITK and by
ANTsPy reproduces ranreg's own ``warped.nii.gz``, ``inverse_ddf.nii.gz`` undoes it in
SimpleITK as ranreg's inverse does, and ``affine.txt`` maps points as the RAS matrix in
``metrics.json`` does, on oblique, anisotropic grids with flipped axes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ranreg.infer import register_files
from tests.helpers import write_nifti

sitk = pytest.importorskip("SimpleITK")


def oblique(spacing, rotvec, origin, flip=(1.0, 1.0, 1.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix() @ np.diag(np.multiply(spacing, flip))
    a[:3, 3] = origin
    return a


class SmoothField(torch.nn.Module):
    """A 'network' with one weight that returns a smooth field of up to 2 voxels."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.config = {"name": "smooth", "ndim": 3, "window": None}

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        shape = fixed.shape[2:]
        g = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
        u = torch.stack(
            [2.0 * torch.sin(g[1] / 6.0), 1.5 * torch.cos(g[2] / 5.0), torch.sin(g[0] / 7.0)]
        )
        return self.w * u[None]


def body(shape, seed: int) -> np.ndarray:
    """A CT-like volume: smooth texture (HU) inside an ellipsoid, air outside."""
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    texture = 40.0 + 2000.0 * texture
    idx = np.indices(shape).astype(np.float64)
    r = sum(((i - (n - 1) / 2) / (0.42 * n)) ** 2 for i, n in zip(idx, shape, strict=True))
    return np.where(r < 1.0, texture, -1000.0).astype(np.float32)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("interop")
    a_f = oblique((2.0, 2.5, 3.0), (0.15, -0.1, 0.2), (80.0, 60.0, -40.0), flip=(-1, -1, 1))
    a_m = oblique((2.5, 2.0, 2.5), (-0.1, 0.2, 0.1), (75.0, 70.0, -45.0), flip=(-1, -1, 1))
    write_nifti(tmp / "fixed.nii.gz", body((40, 36, 30), 0), a_f)
    write_nifti(tmp / "moving.nii.gz", body((40, 44, 36), 1), a_m)
    out = tmp / "out"
    register_files(
        tmp / "fixed.nii.gz",
        tmp / "moving.nii.gz",
        out,
        SmoothField(),
        affine="rigid",
        fast=True,
        save_inverse=True,
    )
    return {"dir": tmp, "out": out}


def _ranreg_warped(result: dict) -> tuple[np.ndarray, np.ndarray]:
    warped = nib.load(result["out"] / "warped.nii.gz").get_fdata()
    fixed = nib.load(result["dir"] / "fixed.nii.gz").get_fdata()
    return warped, fixed > -500


def _agreement(theirs: np.ndarray, ours: np.ndarray, inside: np.ndarray) -> float:
    """Mean absolute difference inside the body, as a fraction of the intensity range."""
    core = ndimage.binary_erosion(inside, iterations=2)
    return float(np.abs(theirs - ours)[core].mean() / (ours.max() - ours.min()))


def test_simpleitk_reads_the_field_as_ranreg_applies_it(result) -> None:
    fixed = sitk.ReadImage(str(result["dir"] / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(result["dir"] / "moving.nii.gz"))
    field = sitk.ReadImage(str(result["out"] / "ddf.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1000.0)
    theirs = sitk.GetArrayFromImage(warped).transpose(2, 1, 0)
    ours, inside = _ranreg_warped(result)
    assert _agreement(theirs, ours, inside) < 0.01


def test_ants_reads_the_field_as_ranreg_applies_it(result) -> None:
    pytest.importorskip("ants")
    from ranreg.peers import import_ants

    ants = import_ants()  # fixes ITK's thread count first, as the ants-syn peer expects
    fixed = ants.image_read(str(result["dir"] / "fixed.nii.gz"))
    moving = ants.image_read(str(result["dir"] / "moving.nii.gz"))
    warped = ants.apply_transforms(
        fixed, moving, transformlist=[str(result["out"] / "ddf.nii.gz")], defaultvalue=-1000.0
    )
    ours, inside = _ranreg_warped(result)
    assert _agreement(warped.numpy(), ours, inside) < 0.01


def test_simpleitk_reads_the_affine_file_as_the_metrics_matrix(result) -> None:
    transform = sitk.ReadTransform(str(result["out"] / "affine.txt"))
    matrix = np.asarray(
        json.loads((result["out"] / "metrics.json").read_text())["affine"]["world_matrix_ras"]
    )
    assert not np.allclose(matrix, np.eye(4))  # the rigid stage moved something
    p_ras = np.array([10.0, -20.0, 30.0])
    q_lps = np.asarray(transform.TransformPoint((-p_ras[0], -p_ras[1], p_ras[2])))
    q_ras = matrix[:3, :3] @ p_ras + matrix[:3, 3]
    np.testing.assert_allclose(q_lps, [-q_ras[0], -q_ras[1], q_ras[2]], atol=1e-6)


def test_the_field_file_says_what_it_is(result) -> None:
    header = nib.load(result["out"] / "ddf.nii.gz").header
    assert header.get_intent()[0] == "displacement vector"
    assert header.get_data_shape()[3:] == (1, 3)
    # world map of the field = the fixed image's, so tools place it on the fixed grid
    np.testing.assert_allclose(
        header.get_best_affine(), nib.load(result["dir"] / "fixed.nii.gz").affine, atol=1e-5
    )


def test_simpleitk_reads_the_inverse_field_as_ranreg_applies_it(result) -> None:
    """``inverse_ddf.nii.gz`` brings a fixed-space image onto the moving grid in SimpleITK
    as ``ranreg apply --inverse`` does, and maps the fixed-to-moving image of fixed points
    back to them."""
    from ranreg.transform import Transform

    out, folder = result["out"], result["dir"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inverse"]["file"] == "inverse_ddf.nii.gz"
    assert metrics["inverse"]["round_trip_mm"]["p95"] < 0.1
    field = sitk.ReadImage(str(out / "inverse_ddf.nii.gz"), sitk.sitkVectorFloat64)
    moving = sitk.ReadImage(str(folder / "moving.nii.gz"))
    np.testing.assert_allclose(field.GetOrigin(), moving.GetOrigin(), atol=1e-4)  # moving grid
    fixed = sitk.ReadImage(str(folder / "fixed.nii.gz"))
    inverse = sitk.DisplacementFieldTransform(field)
    theirs = sitk.GetArrayFromImage(sitk.Resample(fixed, moving, inverse, sitk.sitkLinear, -1000.0))
    ours = Transform.load(out).inverse().apply(str(folder / "fixed.nii.gz")).array
    on_moving = nib.load(folder / "moving.nii.gz").get_fdata() > -500
    reached = ours > -999  # moving voxels whose preimage is inside the fixed image
    assert _agreement(theirs.transpose(2, 1, 0), ours, on_moving & reached) < 0.01
    # fixed points p -> p + u(p) (ranreg) -> back through the inverse field (SimpleITK)
    forward = Transform.load(out)
    p = forward.grid.affine[:3, :3] @ np.array([[20.0, 18.0, 15.0], [14.0, 20.0, 12.0]]).T
    p = (p + forward.grid.affine[:3, 3:]).T
    q = forward.map_points(p)
    back = [inverse.TransformPoint((-x, -y, z)) for x, y, z in q]
    np.testing.assert_allclose(np.asarray(back) * [-1, -1, 1], p, atol=0.05)


def test_apply_inverse_uses_the_saved_inverse(result, tmp_path, capsys) -> None:
    from ranreg.cli import main
    from ranreg.transform import Transform

    out, fixed = result["out"], result["dir"] / "fixed.nii.gz"
    argv = ["apply", "--transform", str(out), "--image", str(fixed), "--inverse"]
    assert main([*argv, "--out", str(tmp_path / "saved.nii.gz")]) == 0
    assert "(saved " in capsys.readouterr().out
    recomputed = Transform.load(out).inverse().apply(str(fixed)).array
    saved = nib.load(tmp_path / "saved.nii.gz").get_fdata()
    np.testing.assert_allclose(saved, recomputed, atol=1e-2)  # the same field, stored float32
