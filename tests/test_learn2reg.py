"""Learn2Reg submissions: ``ranreg register --pairs KEY --data DIR`` and the displacement
files (voxel units on the fixed grid), checked by the challenge's own arithmetic."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ranreg.cli import main
from ranreg.learn2reg import case_id, field_name
from ranreg.transform import Grid, Transform
from tests.helpers import write_nifti

SHAPE = (20, 16, 18)
SPACING = np.array([1.5, 2.0, 2.5])


def _affine(shift: int = 0) -> np.ndarray:
    """Axis 1 flipped; ``shift`` voxels along axis 0 moves the origin by as many voxels."""
    a = np.diag([*SPACING * [1, -1, 1], 1.0])
    a[:3, 3] = (-10.0 + SPACING[0] * shift, 20.0, 5.0)
    return a


def test_voxel_displacement_is_the_moving_voxel_minus_the_fixed_voxel() -> None:
    """Against the formula, voxel by voxel: a varying field, two different grids."""
    rng = np.random.default_rng(0)
    fixed = Grid(SHAPE, _affine())
    moving_affine = np.array(
        [[0.0, 2.0, 0.0, 3.0], [-1.0, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 1.0], [0, 0, 0, 1]]
    )
    moving = Grid((12, 22, 10), moving_affine)
    u = rng.normal(scale=4.0, size=(*SHAPE, 3)).astype(np.float32)
    disp = Transform(u, fixed, target=moving).voxel_displacement()
    x = np.stack(np.meshgrid(*map(np.arange, SHAPE), indexing="ij"), axis=-1).astype(float)
    p = x @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    q = p + u
    expected = (q - moving_affine[:3, 3]) @ np.linalg.inv(moving_affine[:3, :3]).T - x
    assert disp.shape == (*SHAPE, 3) and disp.dtype == np.float32
    np.testing.assert_allclose(disp, expected, atol=1e-4)
    with pytest.raises(Exception, match="moving grid is not known"):
        Transform(u, fixed).voxel_displacement()


def test_case_ids_and_file_names() -> None:
    assert case_id("imagesTr/AbdomenCTCT_0001_0000.nii.gz") == "0001"
    assert field_name("a/NLST_0101_0000.nii.gz", "a/NLST_0101_0001.nii.gz") == (
        "disp_0101_0101.nii.gz"
    )
    assert case_id("x/scan.nrrd") == "scan"


def _scan(shift: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured scan with three boxes, cut ``shift`` voxels along axis 0 into a larger
    one: with :func:`_affine` (``shift``) every cut sits at the same place in the world."""
    rng = np.random.default_rng(3)
    big = (SHAPE[0] + 6, *SHAPE[1:])
    image = 100.0 * ndimage.gaussian_filter(rng.normal(size=big), 1.5)
    label = np.zeros(big, np.uint8)
    label[6:13, 4:10, 5:12] = 1
    label[14:21, 8:14, 9:16] = 2
    image += 300.0 * (label > 0)
    cut = slice(shift, shift + SHAPE[0])
    return image[cut].astype(np.float32), label[cut]


def _task(root: Path, shifts: dict[str, int], pairs: list[tuple[str, str]]) -> Path:
    """A Learn2Reg folder (imagesTr, labelsTr, keypointsTr in voxels) whose JSON lists
    ``pairs`` (moving, fixed) under ``registration_val``."""
    keypoints = np.array([[8.0, 6.0, 7.0], [16.0, 10.0, 12.5], [11.0, 2.0, 15.0]])
    for folder in ("imagesTr", "labelsTr", "keypointsTr"):
        (root / folder).mkdir(parents=True)
    for name, shift in shifts.items():
        image, label = _scan(shift)
        write_nifti(root / "imagesTr" / f"{name}.nii.gz", image, _affine(shift))
        write_nifti(root / "labelsTr" / f"{name}.nii.gz", label, _affine(shift))
        np.savetxt(root / "keypointsTr" / f"{name}.csv", keypoints - [shift, 0, 0], delimiter=",")
    entries = [
        {"fixed": f"./imagesTr/{f}.nii.gz", "moving": f"./imagesTr/{m}.nii.gz"} for m, f in pairs
    ]
    (root / "Task_dataset.json").write_text(json.dumps({"registration_val": entries}))
    return root


def _challenge_scores(root: Path, disp: np.ndarray, moving: str, fixed: str) -> tuple[float, float]:
    """What the challenge's evaluation computes: the keypoint error (fixed keypoints moved
    by the field sampled there, against the moving ones, in moving mm) and the Dice of the
    moving labels warped by ``x -> x + disp(x)`` (nearest), for label 1."""
    kf = np.loadtxt(root / "keypointsTr" / f"{fixed}.csv", delimiter=",")
    km = np.loadtxt(root / "keypointsTr" / f"{moving}.csv", delimiter=",")
    at = np.stack([ndimage.map_coordinates(disp[..., c], kf.T, order=1) for c in range(3)], 1)
    tre = np.linalg.norm((kf + at - km) * SPACING, axis=1).mean()
    seg_f = np.asarray(nib.load(root / "labelsTr" / f"{fixed}.nii.gz").dataobj)
    seg_m = np.asarray(nib.load(root / "labelsTr" / f"{moving}.nii.gz").dataobj)
    x = np.stack(np.meshgrid(*map(np.arange, SHAPE), indexing="ij"), axis=0).astype(float)
    warped = ndimage.map_coordinates(seg_m, x + np.moveaxis(disp, -1, 0), order=0)
    a, b = seg_f == 1, warped == 1
    return float(tre), float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_register_a_learn2reg_list_writes_the_challenge_files(tmp_path: Path) -> None:
    """The scans lie at the same place in the world but are cut at different voxels, so
    without any motion (``identity``, no affine stage) the files must say where each fixed
    voxel is in the moving array: the challenge then finds keypoint error 0 and Dice 1,
    where a zero field (what a submission in world coordinates would amount to) is off by
    the cut."""
    shifts = {"T_0001_0000": 0, "T_0002_0000": 2, "T_0003_0000": 5}
    pairs = [("T_0002_0000", "T_0001_0000"), ("T_0001_0000", "T_0003_0000")]
    root = _task(tmp_path / "task", shifts, pairs)
    out = tmp_path / "out"
    argv = ["register", "--pairs", "registration_val", "--data", str(root), "--out", str(out)]
    assert main([*argv, "--model", "identity", "--affine", "none", "--fast"]) == 0
    files = sorted(p.name for p in (out / "learn2reg").iterdir())
    assert files == ["disp_0001_0002.nii.gz", "disp_0003_0001.nii.gz"]
    for moving, fixed in pairs:
        img = nib.load(out / "learn2reg" / field_name(f"{fixed}.nii", f"{moving}.nii"))
        disp = np.asarray(img.dataobj)
        assert disp.shape == (*SHAPE, 3) and np.allclose(img.affine, _affine(shifts[fixed]))
        cut = shifts[fixed] - shifts[moving]
        np.testing.assert_allclose(disp[..., 0], cut, atol=1e-4)
        tre, dice = _challenge_scores(root, disp, moving, fixed)
        assert tre == pytest.approx(0.0, abs=1e-3) and dice == pytest.approx(1.0)
        tre0, dice0 = _challenge_scores(root, np.zeros_like(disp), moving, fixed)
        assert tre0 == pytest.approx(1.5 * abs(cut)) and dice0 < 0.8
    with (out / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    # the keypoints were read as voxels: ranreg's own landmark error agrees, in world mm
    assert [r["name"] for r in rows] == ["0001_0002", "0003_0001"]
    assert all(float(r["landmark_error_after_mm"]) == pytest.approx(0, abs=1e-3) for r in rows)
    assert float(rows[0]["mean_dice_after"]) == pytest.approx(1.0)

    # killed between a pair's folder and its file: the run again writes only the file
    (out / "learn2reg" / "disp_0001_0002.nii.gz").unlink()
    stamp = (out / "0001_0002" / "metrics.json").stat().st_mtime_ns
    assert main([*argv, "--model", "identity", "--affine", "none", "--fast"]) == 0
    assert (out / "learn2reg" / "disp_0001_0002.nii.gz").is_file()
    assert (out / "0001_0002" / "metrics.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "a Learn2Reg key needs --data"),
        (["--data", "{root}", "--pairs", "{csv}"], "--data goes with a Learn2Reg key"),
        (["--data", "{root}", "--pairs", "registration_test"], "no pairs under"),
        (["--data", "{dupes}"], "pair names must be unique"),
        (["--data", "{root}/missing"], "Learn2Reg folder not found"),
    ],
)
def test_bad_learn2reg_lists(extra: list[str], message: str, tmp_path: Path, capsys) -> None:
    shifts = {"T_0001_0000": 0, "T_0001_0001": 1, "T_0002_0000": 2}
    root = _task(tmp_path / "task", shifts, [("T_0002_0000", "T_0001_0000")])
    # two time points of one patient against another: both named 0001_0002
    twice = [("T_0002_0000", "T_0001_0000"), ("T_0002_0000", "T_0001_0001")]
    dupes = _task(tmp_path / "dupes", shifts, twice)
    pairs_csv = tmp_path / "pairs.csv"
    pairs_csv.write_text("fixed,moving\nx.nii.gz,y.nii.gz\n")
    fill = {"root": str(root), "csv": str(pairs_csv), "dupes": str(dupes)}
    out = tmp_path / "out"
    argv = ["register", "--pairs", "registration_val", *(a.format(**fill) for a in extra)]
    assert main([*argv, "--model", "identity", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not out.exists()
