"""``ranreg apply`` and :class:`ranreg.transform.Transform`: resampling other images through
a registration result on other grids, label safety, the inverse against an analytic one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ranreg.cli import main
from ranreg.data.io import load_label_volume, load_nifti
from ranreg.errors import RanregError
from ranreg.infer import register_files
from ranreg.outputs import save_ddf
from ranreg.transform import Grid, Transform
from tests.helpers import write_nifti

FIXED_SHAPE = (24, 20, 28)
BLOBS = (  # centre (world mm), amplitude, sigma (mm)
    ((-40.0, -5.0, 20.0), 60.0, 10.0),
    ((-15.0, 3.0, 30.0), 45.0, 8.0),
    ((-55.0, 5.0, 15.0), 30.0, 12.0),
)


def fixed_affine() -> np.ndarray:
    """Anisotropic (1.5, 2, 3) mm, axes permuted and flipped, with an origin offset."""
    a = np.zeros((4, 4))
    a[1, 0], a[2, 1], a[0, 2] = 1.5, 2.0, -3.0
    a[:3, 3] = (10.0, -20.0, 5.0)
    a[3, 3] = 1.0
    return a


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = math.radians(degrees)
    return np.eye(3) + math.sin(t) * cross + (1 - math.cos(t)) * cross @ cross


def centred_affine(rot: np.ndarray, spacing, shape, centre) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return a


def world(shape, affine) -> np.ndarray:
    vox = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    return vox @ affine[:3, :3].T + affine[:3, 3]


def image_at(points: np.ndarray) -> np.ndarray:
    """A smooth image defined in world space (so that any grid can sample it exactly)."""
    out = np.full(points.shape[:-1], 10.0)
    for centre, amp, sigma in BLOBS:
        out += amp * np.exp(-((points - centre) ** 2).sum(-1) / (2 * sigma**2))
    return out.astype(np.float32)


def labels_at(points: np.ndarray) -> np.ndarray:
    out = np.zeros(points.shape[:-1], np.uint8)
    for value, (centre, _, sigma) in zip((3, 7), BLOBS, strict=False):
        out[((points - centre) ** 2).sum(-1) < (1.2 * sigma) ** 2] = value
    return out


class Wavy(torch.nn.Module):
    """Oracle 'network': a fixed smooth DDF (fixed voxels) whatever the images."""

    config = {"name": "wavy", "ndim": 3}

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        i, j, k = torch.meshgrid(
            *(torch.arange(n, dtype=torch.float32) for n in fixed.shape[2:]), indexing="ij"
        )
        two_pi = 2 * math.pi
        ddf = torch.stack(
            [
                1.5 * torch.sin(two_pi * j / 20),
                1.0 * torch.cos(two_pi * k / 28),
                0.8 * torch.sin(two_pi * i / 24),
            ]
        )
        return ddf[None]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A registration result (oracle field, moving and fixed on different oblique grids)
    and the moving image resampled exactly on a third, oblique and anisotropic grid."""
    d = tmp_path_factory.mktemp("apply")
    a_f = fixed_affine()
    a_m = centred_affine(rotation((0, 0, 1), 10), (2.5, 2.5, 3.0), (46, 28, 26), (-30, -2, 24.37))
    a_o = centred_affine(rotation((1, 2, 3), 25), (1.7, 2.2, 1.9), (83, 65, 75), (-30, -2, 24.37))
    p_f, p_m, p_o = world(FIXED_SHAPE, a_f), world((46, 28, 26), a_m), world((83, 65, 75), a_o)
    files = {
        "fixed": write_nifti(d / "fixed.nii.gz", image_at(p_f), a_f),
        "moving": write_nifti(d / "moving.nii.gz", image_at(p_m), a_m),
        "labels": write_nifti(d / "moving_labels.nii.gz", labels_at(p_m), a_m),
        "oblique": write_nifti(d / "moving_oblique.nii.gz", image_at(p_o), a_o),
        "oblique_labels": write_nifti(d / "labels_oblique.nii.gz", labels_at(p_o), a_o),
        "dose": write_nifti(d / "dose.nii.gz", (image_at(p_m) - 10.0) / 90.0, a_m),
    }
    files["result"] = d / "result"
    register_files(
        files["fixed"], files["moving"], files["result"], Wavy(), moving_labels=files["labels"]
    )
    return files


def test_apply_on_another_grid_reproduces_the_warped_image(case: dict[str, Path]) -> None:
    t = Transform.load(case["result"])
    warped = load_nifti(case["result"] / "warped.nii.gz").array
    assert np.abs(t.ddf_mm).max() > 2.0  # a real deformation
    span = float(warped.max() - warped.min())
    same = t.apply(load_nifti(case["moving"]))  # the moving file itself: the same sampling
    assert np.abs(same.array - warped).max() < 1e-3 * span
    assert np.allclose(same.affine, fixed_affine())
    oblique = t.apply(load_nifti(case["oblique"]))  # rotated, anisotropic, other FOV
    assert oblique.shape == FIXED_SHAPE and oblique.array.dtype == np.float32
    assert np.abs(oblique.array - warped).mean() < 0.01 * span
    smooth = t.apply(case["oblique"], interp="bspline")
    assert np.abs(smooth.array - warped).mean() < 0.01 * span
    # against the image itself at p + u(p): cubic B-splines are far closer than linear
    p = world(FIXED_SHAPE, fixed_affine())
    truth = image_at(p + t.ddf_mm)
    assert np.abs(oblique.array - truth).mean() < 0.003 * span
    assert np.abs(smooth.array - truth).mean() < 1e-4 * span


def test_labels_stay_integer_and_only_their_values(case: dict[str, Path]) -> None:
    t = Transform.load(case["result"])
    ranreg_labels = load_label_volume(case["result"] / "warped_labels.nii.gz").array
    out = t.apply(case["labels"], labels=True).array
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 3, 7}
    assert np.array_equal(out, ranreg_labels)  # no half-voxel ties in this geometry
    other = t.apply(case["oblique_labels"], labels=True, reference=case["oblique"]).array
    assert other.shape == (83, 65, 75) and other.dtype == np.uint8
    assert set(np.unique(other)) <= {0, 3, 7}
    with pytest.raises(RanregError, match="nearest"):
        t.apply(case["labels"], labels=True, interp="linear")


def test_float_map_stays_float(case: dict[str, Path]) -> None:
    t = Transform.load(case["result"])
    dose = t.apply(case["dose"]).array
    warped = load_nifti(case["result"] / "warped.nii.gz").array
    assert dose.dtype == np.float32
    assert np.any(np.abs(dose - np.round(dose)) > 0.01)  # not rounded
    assert np.allclose(dose, (warped - 10.0) / 90.0, atol=1e-4)


# ------------------------------------------------------------------------------ inverse
A, K, B, L = 3.0, 2 * math.pi / 50, 2.5, 2 * math.pi / 60
M = rotation((0, 0, 1), 20) @ np.diag([1.1, 0.95, 1.0])
T = np.array([5.0, -3.0, 2.0])


def forward_map(p: np.ndarray) -> np.ndarray:
    """phi = M S2 S1 + T, S1: x += A sin(K y), S2: z += B sin(L x): analytic inverse."""
    p = p.copy()
    p[..., 0] += A * np.sin(K * p[..., 1])
    p[..., 2] += B * np.sin(L * p[..., 0])
    return p @ M.T + T


def inverse_map(q: np.ndarray) -> np.ndarray:
    r = (q - T) @ np.linalg.inv(M).T
    r[..., 2] -= B * np.sin(L * r[..., 0])
    r[..., 0] -= A * np.sin(K * r[..., 1])
    return r


@pytest.fixture(scope="module")
def analytic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Result folders built by hand around phi: one with moving_grid in metrics.json, one
    naming the moving file only."""
    d = tmp_path_factory.mktemp("inverse")
    fixed = Grid(
        (32, 26, 34),
        centred_affine(rotation((0.2, 1, 0.3), 15), (2, 2.5, 1.8), (32, 26, 34), (0, 0, 0)),
    )
    moving = Grid((51, 51, 51), centred_affine(np.eye(3), (2, 2, 2), (51, 51, 51), T))
    p = world(fixed.shape, fixed.affine)
    folders = {}
    for name, info in (
        ("grid", {"moving_grid": moving.to_json()}),
        ("file", {"moving": str(d / "moving.nii.gz")}),
    ):
        folder = d / name
        folder.mkdir()
        save_ddf(folder / "ddf.nii.gz", forward_map(p) - p, fixed.affine)
        (folder / "metrics.json").write_text(json.dumps({"fixed": "f.nii.gz", **info}))
        folders[name] = folder
    write_nifti(d / "moving.nii.gz", np.zeros(moving.shape, np.float32), moving.affine)
    fixed_labels = (np.linalg.norm(p, axis=-1) < 20).astype(np.uint8) * 5
    write_nifti(d / "fixed_labels.nii.gz", fixed_labels, fixed.affine)
    return {"dir": d, "fixed": fixed, "moving": moving, **folders}


def test_inverse_matches_the_analytic_inverse(analytic: dict) -> None:
    t = Transform.load(analytic["grid"])
    assert t.target is not None and t.target.same_as(analytic["moving"])
    assert Transform.load(analytic["file"]).target.same_as(analytic["moving"])
    inv = t.inverse()
    assert inv.grid.same_as(analytic["moving"]) and inv.target.same_as(analytic["fixed"])
    rt = inv.round_trip_mm
    assert rt["mean"] < 0.1 and rt["p95"] < 0.1 and rt["fraction"] > 0.9
    q = world(inv.grid.shape, inv.grid.affine)
    p_true = inverse_map(q)
    vox = (p_true - analytic["fixed"].affine[:3, 3]) @ np.linalg.inv(
        analytic["fixed"].affine[:3, :3]
    ).T
    inside = np.all((vox > 1) & (vox < np.array(analytic["fixed"].shape) - 2), axis=-1)
    assert inside.mean() > 0.1
    error = np.linalg.norm(inv.ddf_mm - (p_true - q), axis=-1)[inside]
    assert error.max() < 0.1 and error.mean() < 0.03
    assert inv.inversion["residual_mm"]["mean"] < 0.01


def test_inverse_save_load_round_trip(analytic: dict, tmp_path: Path) -> None:
    t = Transform.load(analytic["grid"])
    inv = t.inverse()
    inv.save(tmp_path / "inv")
    back = Transform.load(tmp_path / "inv")
    assert np.array_equal(back.ddf_mm, inv.ddf_mm) and back.grid.same_as(inv.grid)
    assert back.target.same_as(analytic["fixed"]) and back.round_trip_mm == inv.round_trip_mm
    twice = back.inverse()  # back on the fixed grid: close to the original field
    assert twice.grid.same_as(analytic["fixed"])
    p = world(t.grid.shape, t.grid.affine)
    moving = analytic["moving"]
    vox = (p + t.ddf_mm - moving.affine[:3, 3]) @ np.linalg.inv(moving.affine[:3, :3]).T
    mapped_inside = np.all((vox > 1) & (vox < np.array(moving.shape) - 2), axis=-1)
    assert np.linalg.norm(twice.ddf_mm - t.ddf_mm, axis=-1)[mapped_inside].max() < 0.1
    with pytest.raises(RanregError, match="not empty"):
        inv.save(tmp_path / "inv")


# ------------------------------------------------------------------------------ CLI
def _one_error_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err


def test_cli_apply_writes_and_never_overwrites(
    case: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sub" / "labels_on_fixed.nii.gz"
    args = ["apply", "--transform", str(case["result"]), "--image", str(case["labels"])]
    assert main([*args, "--labels", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and str(out) in printed[0]
    written = load_label_volume(out)
    expected = Transform.load(case["result"]).apply(case["labels"], labels=True)
    assert np.array_equal(written.array, expected.array) and written.array.dtype == np.uint8
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left
    mha = tmp_path / "labels_on_fixed.mha"  # the name chooses the format
    assert main([*args, "--labels", "--out", str(mha)]) == 0
    back = load_label_volume(mha)
    assert np.array_equal(back.array, expected.array) and back.array.dtype == np.uint8
    assert np.allclose(back.affine, written.affine, atol=1e-4)
    capsys.readouterr()
    assert main([*args, "--labels", "--out", str(tmp_path / "labels.txt")]) == 2
    _one_error_line(capsys.readouterr().err)

    before = out.read_bytes()
    assert main([*args, "--labels", "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err)
    assert out.read_bytes() == before

    missing = ["apply", "--transform", str(tmp_path / "nope"), "--image", str(case["labels"])]
    assert main([*missing, "--out", str(tmp_path / "x.nii.gz")]) == 2
    _one_error_line(capsys.readouterr().err)
    assert main([*args, "--labels", "--interp", "linear", "--out", str(tmp_path / "y.nii")]) == 2
    _one_error_line(capsys.readouterr().err)
    dose = ["apply", "--transform", str(case["result"]), "--image", str(case["dose"])]
    assert main([*dose, "--labels", "--out", str(tmp_path / "z.nii.gz")]) == 2  # not labels
    _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.nii.gz").exists() and not (tmp_path / "z.nii.gz").exists()


def test_cli_apply_inverse_reports_round_trip(
    analytic: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "labels_on_moving.nii.gz"
    image = str(analytic["dir"] / "fixed_labels.nii.gz")
    argv = ["apply", "--transform", str(analytic["file"]), "--image", image, "--labels"]
    assert main([*argv, "--inverse", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "round-trip error" in line and str(out) in line
    written = load_label_volume(out)
    assert written.shape == analytic["moving"].shape
    assert np.allclose(written.affine, analytic["moving"].affine)
    assert set(np.unique(written.array)) == {0, 5}
