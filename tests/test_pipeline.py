"""The registration pipeline (ranreg.pipeline): affine and network composed into one world
mapping, instance optimisation recovering a known field, self-registration staying still,
and the command line refusing bad pipeline settings before writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

import ranreg.pipeline as pipeline
from ranreg.affine import read_itk_affine
from ranreg.cli import main
from ranreg.data.io import Volume, load_nifti, spacing_from_affine
from ranreg.demo import demo_files
from ranreg.errors import RanregError
from ranreg.models import resolve_model
from ranreg.options import RegistrationOptions
from ranreg.pipeline import register_volumes
from ranreg.refine import RefineSettings, refine_pair
from ranreg.spatial import identity_grid
from tests.helpers import smooth_image


class ConstantShift(torch.nn.Module):
    """A 'network' with one weight that moves everything by ``shift`` network voxels."""

    def __init__(self, shift: tuple[float, float, float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.shift = shift
        self.config = {"name": "shift", "ndim": 3, "window": None}

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(1, 3, *fixed.shape[2:])
        for i, s in enumerate(self.shift):
            out[:, i] = s * self.w
        return out


def oblique_affine(spacing, rotvec, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix() @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def test_ddf_is_the_whole_mapping_affine_then_network(monkeypatch) -> None:
    """warped(x) = moving(A_m^-1 (p + u(p))) with u = T(p + L v) - p, checked against an
    independent resampling (scipy) on oblique anisotropic grids."""
    a_f = oblique_affine((2.0, 2.5, 3.0), (0.1, 0.2, -0.3), (-30.0, -20.0, -25.0))
    a_m = oblique_affine((2.5, 2.0, 2.0), (-0.2, 0.1, 0.15), (-35.0, -28.0, -20.0))
    fixed = Volume(smooth_image((24, 22, 18), 0), a_f, spacing_from_affine(a_f))
    moving = Volume(smooth_image((30, 28, 26), 1), a_m, spacing_from_affine(a_m))
    world = np.eye(4)
    world[:3, :3] = Rotation.from_rotvec([0.05, -0.08, 0.1]).as_matrix()
    world[:3, 3] = (3.0, -2.0, 4.0)
    monkeypatch.setattr(
        pipeline, "register_affine", lambda f, m, s, images=None, initial=None, **kw: world
    )
    shift = (0.7, -0.4, 0.5)  # fixed voxels (the network runs on the fixed grid)
    res = register_volumes(
        ConstantShift(shift), moving, fixed, options=RegistrationOptions(fast=True)
    )
    x = identity_grid(fixed.shape, dtype=torch.float64).numpy().reshape(3, -1)
    p = a_f[:3, :3] @ x + a_f[:3, 3:]
    q = world[:3, :3] @ (p + a_f[:3, :3] @ np.array(shift)[:, None]) + world[:3, 3:]
    u = (q - p).T.reshape(*fixed.shape, 3)
    np.testing.assert_allclose(res.ddf_mm, u, atol=1e-3)
    vox = np.linalg.inv(a_m)[:3, :3] @ q + np.linalg.inv(a_m)[:3, 3:]
    expected = ndimage.map_coordinates(moving.array, vox, order=1, mode="nearest")
    inside = ((vox > 0) & (vox < np.array(moving.shape)[:, None] - 1)).all(0)
    got = res.warped.reshape(-1)
    np.testing.assert_allclose(got[inside], expected[inside], atol=1e-4)
    # Jacobian of the whole map: det of the rotation (1) times det(I + dv/dx) (1)
    np.testing.assert_allclose(res.jacobian, 1.0, atol=1e-5)
    np.testing.assert_allclose(res.world_map, world)


class HalfwayByCentroid(torch.nn.Module):
    """A 'network' that moves by half the offset between the images' centres of mass: it
    commutes with flips, as a network trained on flipped pairs should."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.config = {"name": "halfway", "ndim": 3, "window": None, "spacing": (4.0,) * 3}

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        grid = identity_grid(fixed.shape[2:], dtype=torch.float32)

        def centre(image: torch.Tensor) -> torch.Tensor:
            weight = image[0, 0].float()
            return (grid * weight).flatten(1).sum(1) / weight.sum()

        offset = 0.5 * (centre(moving) - centre(fixed)) * self.w
        return offset.view(1, 3, 1, 1, 1).expand(1, 3, *fixed.shape[2:]).contiguous()


def _blob_pair(d_mm: np.ndarray) -> tuple[Volume, Volume]:
    """A gaussian blob (2 mm voxels) and a copy moved by ``d_mm``."""
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    grid = identity_grid((40, 40, 40), dtype=torch.float64).numpy()

    def blob(centre_vox: np.ndarray) -> np.ndarray:
        r2 = ((grid - centre_vox[:, None, None, None]) ** 2).sum(0)
        return np.exp(-r2 / (2 * 4.0**2)).astype(np.float32)

    centre = np.array([19.5, 19.5, 19.5])
    fixed = Volume(blob(centre), a, (2.0,) * 3)
    return fixed, Volume(blob(centre + d_mm / 2.0), a, (2.0,) * 3)


def test_flip_averaging_keeps_an_equivariant_field_and_cancels_a_fixed_bias() -> None:
    """``tta``: a flip-equivariant network gives the same field (half of a known shift);
    a constant output, which turns with no flip, averages to zero."""
    d_mm = np.array([6.0, -4.0, 5.0])
    fixed, moving = _blob_pair(d_mm)
    for tta in (False, True):
        opts = RegistrationOptions(fast=True, affine="none", tta=tta)
        res = register_volumes(HalfwayByCentroid(), moving, fixed, options=opts)
        core = res.ddf_mm[10:-10, 10:-10, 10:-10].reshape(-1, 3)
        np.testing.assert_allclose(core.mean(0), 0.5 * d_mm, atol=0.15)
    opts = RegistrationOptions(fast=True, affine="none", tta=True)
    res = register_volumes(ConstantShift((0.7, -0.4, 0.5)), moving, fixed, options=opts)
    np.testing.assert_allclose(res.ddf_mm, 0.0, atol=1e-6)
    assert "flips averaged" in opts.describe(neural=True)
    assert "flips" not in RegistrationOptions(fast=True).describe(neural=True)


def test_the_network_grid_is_the_models_or_finer_with_fast_or_as_asked() -> None:
    """``--fast`` runs a network at half its trained spacing, ``network_spacing`` anywhere;
    the field stays in mm (the centroid network gives half the shift at every spacing)."""
    assert RegistrationOptions().grid_spacing((8.0, 8.0, 8.0), True) == (8.0, 8.0, 8.0)
    assert RegistrationOptions(fast=True).grid_spacing((8.0, 8.0, 8.0), True) == (4.0, 4.0, 4.0)
    assert RegistrationOptions(fast=True).grid_spacing(None, True) is None
    asked = RegistrationOptions(network_spacing=6.0)
    assert asked.grid_spacing((8.0, 8.0, 8.0), True) == asked.grid_spacing(None, True) == (6.0,) * 3
    # identity, ants-syn and the like keep their own grid whatever is asked of a network
    assert asked.grid_spacing((8.0, 8.0, 8.0), False) == (8.0, 8.0, 8.0)
    d_mm = np.array([6.0, -4.0, 5.0])
    fixed, moving = _blob_pair(d_mm)  # 2 mm voxels; the centroid network is at 4 mm
    for opts, grid_mm in (
        (RegistrationOptions(affine="none", refine=0), 4.0),
        (RegistrationOptions(affine="none", fast=True), 2.0),
        (RegistrationOptions(affine="none", fast=True, network_spacing=5.0), 5.0),
    ):
        res = register_volumes(HalfwayByCentroid(), moving, fixed, options=opts)
        assert res.network_spacing == pytest.approx((grid_mm,) * 3)
        core = res.ddf_mm[10:-10, 10:-10, 10:-10].reshape(-1, 3)
        np.testing.assert_allclose(core.mean(0), 0.5 * d_mm, atol=0.15)


def known_field_case(shape=(32, 30, 28), scale: float = 1.0) -> tuple[Volume, Volume, np.ndarray]:
    """A smooth image and a copy deformed by a known smooth field ``u`` (voxels, up to 1.5 x
    ``scale``): ``fixed(x) = moving(x + u(x))``; 3 mm voxels."""
    a = np.diag([3.0, 3.0, 3.0, 1.0])
    moving = smooth_image(shape, 2) * 3 + 0.5
    grid = identity_grid(shape, dtype=torch.float64).numpy()
    u = scale * np.stack(
        [
            1.5 * np.sin(grid[1] / 7.0) * np.cos(grid[2] / 9.0),
            1.2 * np.cos(grid[0] / 8.0),
            1.0 * np.sin((grid[0] + grid[1]) / 10.0),
        ]
    )
    fixed = ndimage.map_coordinates(moving, grid + u, order=3, mode="nearest").astype(np.float32)
    return Volume(fixed, a, (3.0,) * 3), Volume(moving.astype(np.float32), a, (3.0,) * 3), u


@pytest.mark.parametrize("diffeomorphic", [False, True])
def test_instance_optimisation_recovers_a_known_smooth_field(diffeomorphic: bool) -> None:
    fixed, moving, u = known_field_case(scale=1.0 if not diffeomorphic else 2.0)
    settings = RefineSettings(steps=60, levels=(6.0, 3.0), weight=0.5, diffeomorphic=diffeomorphic)
    v, report = refine_pair(fixed, moving, np.eye(4), None, settings)
    core = (slice(4, -4),) * 3
    err = np.linalg.norm(v[0].numpy() - u, axis=0)[core]
    before = np.linalg.norm(u, axis=0)[core]
    assert err.mean() < 0.3 * before.mean(), (err.mean(), before.mean())
    assert report.ncc_final > report.ncc_zero
    if diffeomorphic:
        from ranreg.spatial import jacobian_determinant

        assert float(jacobian_determinant(v).min()) > 0


def test_self_registration_of_a_real_anatomy_stays_still() -> None:
    """The default pipeline (affine + packaged network + optimisation) on the demo image
    registered to itself: mean |u| < 0.5 mm, no folding."""
    image = load_nifti(demo_files()["fixed_image"])
    res = register_volumes(resolve_model(None), image, image)
    magnitude = np.linalg.norm(res.ddf_mm, axis=-1)
    body = image.array > -500
    assert magnitude[body].mean() < 0.5, magnitude[body].mean()
    assert res.jacobian_stats()["folding_percent"] == 0.0


def _pair(tmp_path: Path) -> list[str]:
    a = np.diag([3.0, 3.0, 3.0, 1.0])
    for name, seed in (("f", 5), ("m", 6)):
        nib.save(
            nib.Nifti1Image(smooth_image((20, 18, 16), seed) * 500, a), tmp_path / f"{name}.nii.gz"
        )
    return [
        "register",
        "--fixed",
        str(tmp_path / "f.nii.gz"),
        "--moving",
        str(tmp_path / "m.nii.gz"),
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--affine", "similarity"], "invalid choice"),
        (["--refine", "-1"], "refine steps"),
        (["--refine-levels", "8", "0"], "refine levels"),
        (["--fast", "--refine", "5"], "fast"),
        (["--refine-weight", "nan"], "refine weight"),
        (["--network-spacing", "0"], "network spacing"),
    ],
)
def test_bad_pipeline_settings_exit_2_and_write_nothing(tmp_path: Path, capsys, extra, message):
    out = tmp_path / "out"
    assert main([*_pair(tmp_path), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()


def test_images_that_do_not_overlap_are_refused_without_the_affine_stage(
    tmp_path: Path, capsys
) -> None:
    """A moving image a metre away: with ``--affine none`` every output would be empty, so
    it is one error line; the affine stage (from the centres of mass) brings it over."""
    argv = _pair(tmp_path)
    moved = nib.load(tmp_path / "m.nii.gz")
    far = moved.affine.copy()
    far[:3, 3] += 1000.0
    nib.save(nib.Nifti1Image(np.asarray(moved.dataobj), far), tmp_path / "far.nii.gz")
    argv[argv.index("--moving") + 1] = str(tmp_path / "far.nii.gz")
    base = [*argv, "--model", "identity", "--refine", "0"]
    assert main([*base, "--out", str(tmp_path / "o"), "--affine", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no part of it lies over the fixed image" in err[0], err
    assert not (tmp_path / "o").exists()
    assert main([*base, "--out", str(tmp_path / "o2"), "--affine", "rigid"]) == 0
    shift = json.loads((tmp_path / "o2" / "metrics.json").read_text())["affine"]
    assert np.linalg.norm(np.asarray(shift["world_matrix_ras"])[:3, 3]) > 900.0


def test_a_thin_slab_between_the_check_points_of_the_fixed_grid_still_overlaps() -> None:
    """The overlap check samples each image on 8 mm cells: a 4 mm slab lying between two
    cell centres of a large fixed scan is found from the slab's own cells."""
    fixed = Volume(smooth_image((40, 40, 40), 0), np.diag([4.0, 4.0, 4.0, 1.0]), (4.0,) * 3)
    slab_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    slab_affine[:3, 3] = (20.0, 20.0, 4.5)  # z from 3.5 to 7.5 mm; fixed cells at 2 and 10
    slab = Volume(smooth_image((30, 30, 2), 1), slab_affine, (2.0,) * 3)
    net = resolve_model("identity")
    result = register_volumes(net, slab, fixed, affine="none", refine=0)
    assert np.isfinite(result.warped).all()
    far = slab_affine.copy()
    far[2, 3] = 400.0
    with pytest.raises(RanregError, match="no part of it lies over the fixed image"):
        register_volumes(net, Volume(slab.array, far, (2.0,) * 3), fixed, affine="none", refine=0)


def test_register_writes_affine_txt_consistent_with_metrics(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = [*_pair(tmp_path), "--out", str(out), "--model", "identity", "--affine", "rigid"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["affine"]["mode"] == "rigid"
    np.testing.assert_allclose(
        read_itk_affine(out / "affine.txt"), metrics["affine"]["world_matrix_ras"], atol=1e-9
    )
    assert "rigid" in capsys.readouterr().out


def test_register_starts_from_an_initial_affine_file(tmp_path: Path, capsys) -> None:
    """``--initial-affine`` with ``--affine none``: the whole mapping is that affine
    (u(p) = T p - p at every voxel), written back as affine.txt and named in the metrics;
    through the Python API the same as a matrix; refused for --pairs and a missing file."""
    from ranreg.affine import write_itk_affine
    from ranreg.api import register
    from ranreg.errors import RanregError

    truth = np.eye(4)
    truth[:3, :3] = Rotation.from_rotvec([0.05, -0.1, 0.2]).as_matrix()
    truth[:3, 3] = [4.0, -3.0, 6.0]
    path = write_itk_affine(tmp_path / "start.txt", truth)
    out = tmp_path / "out"
    argv = [*_pair(tmp_path), "--out", str(out), "--model", "identity"]
    assert main([*argv, "--affine", "none", "--initial-affine", str(path)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["affine"]["initial"]["source"] == str(path)
    assert f"(from {path}, network" in capsys.readouterr().out
    np.testing.assert_allclose(metrics["affine"]["world_matrix_ras"], truth, atol=1e-9)
    np.testing.assert_allclose(read_itk_affine(out / "affine.txt"), truth, atol=1e-9)
    ddf = nib.load(out / "ddf.nii.gz")
    a = ddf.affine
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in ddf.shape[:3]], indexing="ij"), -1)
    p = idx @ a[:3, :3].T + a[:3, 3]
    expected = p @ truth[:3, :3].T + truth[:3, 3] - p
    np.testing.assert_allclose(np.asarray(ddf.dataobj)[..., 0, :], expected, atol=1e-3)
    api = register(
        tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", model="identity", initial_affine=truth
    )
    np.testing.assert_allclose(api.result.ddf_mm, expected, atol=1e-3)
    assert api.metrics["affine"]["initial"]["source"] == "matrix"
    opts = RegistrationOptions(initial_affine=truth)
    assert opts.describe(neural=True).startswith("initial affine + affine + network")
    assert opts == opts.with_(initial_affine=truth.tolist())  # a matrix kept by value
    with pytest.raises(RanregError, match="4x4"):
        RegistrationOptions(initial_affine=[[1.0, 0.0], [0.0, 1.0]])
    capsys.readouterr()
    pairs = tmp_path / "pairs.csv"  # a cohort: each pair's own affine in a column
    pairs.write_text(f"fixed,moving,initial_affine,name\nf.nii.gz,m.nii.gz,{path.name},p1\n")
    cohort = ["register", "--pairs", str(pairs), "--out", str(tmp_path / "cohort")]
    assert main([*cohort, "--model", "identity"]) == 0
    metrics = json.loads((tmp_path / "cohort" / "p1" / "metrics.json").read_text())
    assert metrics["affine"]["initial"]["source"] == str(path)
    bad_out = ["--out", str(tmp_path / "bad"), "--model", "identity"]
    for bad in (
        [*_pair(tmp_path), *bad_out, "--initial-affine", str(tmp_path / "missing.mat")],
        ["register", "--pairs", str(pairs), *bad_out, "--initial-affine", str(path)],
    ):
        assert main(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
        assert not (tmp_path / "bad").exists()


def test_a_model_that_returns_nan_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from ranreg.errors import RanregError
    from ranreg.infer import register_files

    argv = _pair(tmp_path)
    fixed, moving = argv[2], argv[4]
    with pytest.raises(RanregError, match="non-finite"):
        register_files(fixed, moving, tmp_path / "out", ConstantShift((float("nan"), 0.0, 0.0)))
    assert not (tmp_path / "out").exists()


def test_label_map_on_another_grid_is_placed_by_its_own_affine(tmp_path: Path) -> None:
    """The same labels stored flipped (array and affine), so that they sit in the same
    world place: resampled with a warning, the result equals the aligned case."""
    from ranreg.cli import main

    argv = _pair(tmp_path)
    a = np.diag([3.0, 3.0, 3.0, 1.0])
    lab = np.zeros((20, 18, 16), np.uint8)
    lab[3:9, 4:12, 5:10] = 2
    lab[11:17, 2:8, 3:13] = 7
    nib.save(nib.Nifti1Image(lab, a), tmp_path / "lab.nii.gz")
    flip = a.copy()
    flip[0, 0], flip[0, 3] = -3.0, 3.0 * 19  # index i -> world 57 - 3 i: same places
    nib.save(nib.Nifti1Image(lab[::-1].copy(), flip), tmp_path / "lab_flipped.nii.gz")
    runs = {}
    for name in ("lab", "lab_flipped"):
        out = tmp_path / f"out_{name}"
        extra = ["--moving-labels", str(tmp_path / f"{name}.nii.gz"), "--model", "identity"]
        if name == "lab":
            assert main([*argv, "--out", str(out), *extra]) == 0
        else:
            with pytest.warns(UserWarning, match="another grid than its image"):
                assert main([*argv, "--out", str(out), *extra]) == 0
        runs[name] = nib.load(out / "warped_labels.nii.gz").get_fdata()
    np.testing.assert_array_equal(runs["lab"], runs["lab_flipped"])


def test_unreadable_voxel_types_sizes_and_output_paths_are_one_error_line(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    from ranreg.cli import main

    argv = _pair(tmp_path)
    cplx = np.zeros((20, 18, 16), np.complex64)
    nib.save(nib.Nifti1Image(cplx, np.eye(4)), tmp_path / "complex.nii.gz")
    zero = nib.Nifti1Image(np.zeros((20, 18, 16), np.float32), None)
    zero.header.set_zooms((0.0, 0.0, 0.0))
    zero.header["sform_code"] = zero.header["qform_code"] = 0
    nib.save(zero, tmp_path / "zero.nii")
    # air only (a failed DICOM conversion): any field fits it, so there is nothing to return
    blank = np.full((20, 18, 16), -1024.0, np.float32)
    nib.save(nib.Nifti1Image(blank, np.eye(4)), tmp_path / "blank.nii.gz")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    cases = [
        (["--moving", str(tmp_path / "complex.nii.gz")], "unsupported voxel type"),
        (["--fixed", str(tmp_path / "blank.nii.gz")], "every voxel is -1024; an image without"),
        (["--moving", str(tmp_path / "zero.nii")], "voxel size is unknown"),
        ([], "symbolic link"),
    ]
    for extra, message in cases:
        out = tmp_path / "link" if message == "symbolic link" else tmp_path / "out"
        assert main([*argv, "--out", str(out), "--model", "identity", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    monkeypatch.setenv("RANREG_MAX_VOXELS", "1000")
    assert main([*argv, "--out", str(tmp_path / "out"), "--model", "identity"]) == 2
    assert "RANREG_MAX_VOXELS" in capsys.readouterr().err
    monkeypatch.delenv("RANREG_MAX_VOXELS")
    # a full disk while the outputs are written: one line, nothing left behind
    import errno

    import ranreg.data.io as io

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "replace", full)
    assert main([*argv, "--out", str(tmp_path / "out"), "--model", "identity"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: No space left on device"], err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from ranreg.cli import main

    argv = _pair(tmp_path)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f".out.{gone.stdout.strip()}.abc123.tmp"  # a killed run's, pid gone
    live = tmp_path / f".out.{os.getpid()}.def456.tmp"  # a running process's: kept
    for folder in (stale, live):
        folder.mkdir()
        (folder / "warped.nii.gz").write_bytes(b"partial")
    assert main([*argv, "--out", str(tmp_path / "out"), "--model", "identity"]) == 0
    assert not stale.exists() and live.exists() and (tmp_path / "out" / "metrics.json").is_file()
