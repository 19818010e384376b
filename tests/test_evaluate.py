"""``ranreg evaluate``: every ordered pair or listed pairs (CSV, Learn2Reg JSON), results.csv,
summary.md, box plots, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from ranreg import build_model
from ranreg.checkpoint import save_model
from ranreg.cli import main
from ranreg.evaluate import FIELDS
from ranreg.evaluate_report import wilcoxon_table
from tests.helpers import write_nifti

SHAPE = (24, 20, 28)


def _affine() -> np.ndarray:
    a = np.diag([1.5, -2.0, 3.0, 1.0])
    a[:3, 3] = (-12.0, 30.0, 4.0)
    return a


def _subject(shift: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    big = (SHAPE[0] + 6, *SHAPE[1:])
    image = -700.0 + 1500.0 * ndimage.gaussian_filter(rng.normal(size=big), 2.0)
    label = np.zeros(big, np.uint8)
    label[8:15, 5:11, 6:14] = 1
    label[16:23, 10:16, 12:22] = 2
    label[10:20, 3:6, 18:25] = 3
    image += 400.0 * (label > 0)
    sl = slice(shift, shift + SHAPE[0])
    return image[sl].astype(np.float32), label[sl]


def _dataset(root: Path, shifts: tuple[int, ...] = (0, 1, 3)) -> Path:
    for folder in ("images", "labels"):
        (root / folder).mkdir(parents=True)
    for i, shift in enumerate(shifts):
        image, label = _subject(shift)
        write_nifti(root / "images" / f"s{i}.nii.gz", image, _affine())
        write_nifti(root / "labels" / f"s{i}.nii.gz", label, _affine())
    return root


def test_evaluate_identity_and_ran0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dataset(tmp_path / "data")
    torch.manual_seed(0)
    save_model(build_model("RAN0", ndim=3), tmp_path / "ran0", extra={"spacing": [3.0, 4.0, 6.0]})
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(data), "--model", "identity", str(tmp_path / "ran0")]
    assert main([*argv, "--out", str(out), "--labels", "1", "2", "3"]) == 0
    captured = capsys.readouterr()
    assert "evaluate" in captured.err  # the tqdm bar
    assert "identity" in captured.out

    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 6 * 3  # models x ordered pairs x organs
    assert tuple(rows[0]) == FIELDS
    assert {r["model"] for r in rows} == {"identity", "RAN0 (ran0)"}
    assert {(r["moving"], r["fixed"]) for r in rows} == {
        (a, b) for a in ("s0", "s1", "s2") for b in ("s0", "s1", "s2") if a != b
    }
    assert {r["organ"] for r in rows} == {"spleen", "right kidney", "left kidney"}
    ident = [r for r in rows if r["model"] == "identity"]
    assert all(float(r["folding_percent"]) == 0.0 for r in ident)
    # s0 -> s1 differ by one voxel of 1.5 mm along axis 0 (identity = no registration)
    one = [r for r in ident if (r["moving"], r["fixed"]) == ("s0", "s1") and r["label"] == "1"]
    assert float(one[0]["dice"]) == pytest.approx(12 / 14)
    assert float(one[0]["hd95_mm"]) == pytest.approx(1.5)

    summary = (out / "summary.md").read_text(encoding="utf-8")
    for text in ("identity", "RAN0 (ran0)", "mean over organs", "Wilcoxon", "spleen"):
        assert text in summary
    assert "identity vs RAN0 (ran0) | 6 |" in summary
    assert "landmark error" not in summary  # no landmarks/ folder: no such column
    assert (out / "summary.json").is_file()
    assert (out / "boxplots.png").stat().st_size > 1000
    organ_pngs = sorted(p.name for p in (out / "boxplots").iterdir())
    assert organ_pngs == ["01_spleen.png", "02_right-kidney.png", "03_left-kidney.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eval")]


def test_evaluate_split_layout_default_test(tmp_path: Path) -> None:
    _dataset(tmp_path / "data" / "test", shifts=(0, 2))
    _dataset(tmp_path / "data" / "train", shifts=(1, 2, 3))
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(tmp_path / "data"), "--model", "identity"]
    assert main([*argv, "--out", str(out), "--no-progress", "--labels", "2"]) == 0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2  # identity only, the 2 ordered pairs of test/, one organ
    assert "Only one model" in (out / "summary.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "case", ["missing", "no-labels", "one-subject", "bad-image", "blank-image"]
)
def test_bad_data_folder(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import ranreg.evaluate

    def no_registration(*args, **kwargs):
        raise AssertionError("a pair was registered before the bad file was found")

    monkeypatch.setattr(ranreg.evaluate, "register_volumes", no_registration)
    data = tmp_path / "data"
    name = "data"
    if case == "no-labels":
        _dataset(data, shifts=(0, 1))
        for p in (data / "labels").iterdir():
            p.unlink()
        (data / "labels").rmdir()
        name = "s0.nii.gz"
    elif case == "one-subject":
        _dataset(data, shifts=(0,))
    elif case == "bad-image":
        _dataset(data, shifts=(0, 1))
        (data / "images" / "s1.nii.gz").write_bytes(b"not a nifti file")
        name = "s1.nii.gz"
    elif case == "blank-image":  # the last image read: refused before any registration
        _dataset(data, shifts=(0, 1, 3))
        write_nifti(data / "images" / "s2.nii.gz", np.zeros(SHAPE, np.float32), _affine())
        name = "s2.nii.gz: every voxel is 0"
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(data), "--model", "identity", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and name in err, err
    assert not out.exists()


def test_wilcoxon_table_handles_ties_and_differences() -> None:
    rows = []
    for k in range(6):
        for model, value in (("a", 0.5 + 0.01 * k), ("b", 0.5 + 0.01 * k), ("c", 0.4)):
            rows.append({"model": model, "moving": f"m{k}", "fixed": "f", "dice": value})
    table = wilcoxon_table(rows, ["a", "b", "c"])
    assert table[0]["note"] == "all differences are zero"
    assert table[1]["n"] == 6 and table[1]["p_value"] == pytest.approx(0.03125)
    assert table[1]["median_difference"] == pytest.approx(0.125)


def test_evaluate_refine_suffix_adds_instance_optimisation(tmp_path: Path) -> None:
    # soft-tissue texture inside the HU window (the images of _dataset lie below it)
    rng = np.random.default_rng(3)
    big = (SHAPE[0] + 6, *SHAPE[1:])
    texture = ndimage.gaussian_filter(rng.normal(size=big), 1.5)
    image = 100.0 + 200.0 * texture / np.abs(texture).max()
    label = np.zeros(big, np.uint8)
    label[8:15, 5:11, 6:14] = 1
    label[16:23, 10:16, 12:22] = 2
    data = tmp_path / "data"
    for folder in ("images", "labels"):
        (data / folder).mkdir(parents=True)
    for i, shift in enumerate((0, 2)):
        sl = slice(shift, shift + SHAPE[0])
        nib.save(
            nib.Nifti1Image(image[sl].astype(np.float32), _affine()),
            str(data / "images" / f"s{i}.nii.gz"),
        )
        nib.save(nib.Nifti1Image(label[sl], _affine()), str(data / "labels" / f"s{i}.nii.gz"))
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(data), "--model", "identity+refine60", "--no-progress"]
    assert main([*argv, "--out", str(out), "--labels", "1", "2"]) == 0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["model"] for r in rows} == {"identity+refine60", "identity"}

    def mean_dice(model: str) -> float:
        return float(np.mean([float(r["dice"]) for r in rows if r["model"] == model]))

    # the pairs differ by 2 voxels (3 mm) along axis 0: optimisation alone recovers much of it
    assert mean_dice("identity+refine60") > mean_dice("identity") + 0.05
    summary = (out / "summary.md").read_text(encoding="utf-8")
    row = "| identity+refine60 | `identity` | identity | n/a | model + optimisation 60 x 3 |"
    assert row in summary
    assert "| identity | `identity` | identity | n/a | model |" in summary


def test_evaluate_reports_the_landmark_error_of_each_pair(tmp_path: Path, capsys) -> None:
    """Subject i is the same anatomy shifted by shifts[i] voxels of 1.5 mm along x, so
    without registration corresponding landmarks are 1.5 * |shift difference| mm apart."""
    shifts = (0, 1, 3)
    data = _dataset(tmp_path / "data", shifts)
    (data / "landmarks").mkdir()
    anatomy = np.array([[0.0, 10.0, 20.0], [5.0, 12.0, 40.0], [-3.0, 20.0, 30.0]])  # RAS
    for i, shift in enumerate(shifts):
        ras = anatomy - [1.5 * shift, 0.0, 0.0]
        lines = ["x,y,z"] + [f"{-x},{-y},{z}" for x, y, z in ras]  # LPS
        (data / "landmarks" / f"s{i}.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(data), "--model", "identity", "--labels", "1", "2"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        gap = 1.5 * abs(shifts[int(r["moving"][1])] - shifts[int(r["fixed"][1])])
        assert float(r["landmark_error_mm"]) == pytest.approx(gap, abs=1e-6)
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "landmark error (mm)" in summary
    assert "| identity | 0.000 ± 0.000 | 0.0000 ± 0.0000 |" in summary  # folding, SD log J
    # a subject whose file lists another number of points stops the run before it starts
    (data / "landmarks" / "s2.csv").write_text("x,y,z\n1,2,3\n")
    assert main([*argv, "--out", str(tmp_path / "eval2"), "--no-progress"]) == 2
    assert "different numbers of points" in capsys.readouterr().err
    assert not (tmp_path / "eval2").exists()
    # the same landmarks as Learn2Reg keypoints: voxel indices of each image, no header
    for i, shift in enumerate(shifts):
        ras = anatomy - [1.5 * shift, 0.0, 0.0]
        vox = np.linalg.solve(_affine()[:3, :3], (ras - _affine()[:3, 3]).T).T
        (data / "landmarks" / f"s{i}.csv").write_text(
            "".join(",".join(f"{v:.6f}" for v in row) + "\n" for row in vox)
        )
    voxel = ["--out", str(tmp_path / "eval-vox"), "--landmark-coordinates", "voxel"]
    assert main([*argv, *voxel, "--no-progress"]) == 0
    with (tmp_path / "eval-vox" / "results.csv").open() as fh:
        errors = [float(r["landmark_error_mm"]) for r in csv.DictReader(fh)]
    np.testing.assert_allclose(errors, [float(r["landmark_error_mm"]) for r in rows], atol=1e-5)


#: landmarks of the test anatomy (RAS, mm) before the shift of each subject
_ANATOMY = np.array([[0.0, 10.0, 20.0], [5.0, 12.0, 40.0], [-3.0, 20.0, 30.0]])


def _voxel_lines(shift: int, count: int = 3) -> str:
    """The anatomy's first ``count`` landmarks in a subject shifted by ``shift`` voxels, as
    Learn2Reg keypoints: voxel indices, no header."""
    ras = _ANATOMY[:count] - [1.5 * shift, 0.0, 0.0]
    vox = np.linalg.solve(_affine()[:3, :3], (ras - _affine()[:3, 3]).T).T
    return "".join(",".join(f"{v:.6f}" for v in row) + "\n" for row in vox)


def _learn2reg(root: Path, shifts: dict[str, int], labels: bool) -> Path:
    """A Learn2Reg folder: imagesTr/NAME.nii.gz, keypointsTr/NAME.csv (3 points, 2 for the
    patient P2, as the number differs between patients), labelsTr when ``labels``; the
    test writes the dataset.json."""
    for folder in ("imagesTr", "keypointsTr") + (("labelsTr",) if labels else ()):
        (root / folder).mkdir(parents=True)
    for name, shift in shifts.items():
        image, label = _subject(shift)
        write_nifti(root / "imagesTr" / f"{name}.nii.gz", image, _affine())
        count = 2 if name.startswith("P2") else 3
        (root / "keypointsTr" / f"{name}.csv").write_text(_voxel_lines(shift, count))
        if labels:
            write_nifti(root / "labelsTr" / f"{name}.nii.gz", label, _affine())
    return root


def _write_json(root: Path, **lists: list[tuple[str, str]]) -> None:
    """``lists``: key -> (moving, fixed) names, written as Learn2Reg's fixed/moving paths."""
    data = {
        key: [{"fixed": f"./imagesTr/{f}.nii.gz", "moving": f"./imagesTr/{m}.nii.gz"} for m, f in v]
        for key, v in lists.items()
    }
    (root / "Task_dataset.json").write_text(json.dumps({"name": "Task", **data}))


def test_evaluate_learn2reg_pairs_without_labels_by_keypoints(tmp_path: Path) -> None:
    """NLST's layout: two time points per patient (_0000 fixed, _0001 moving), keypoints
    in voxel indices, no label maps. The time points differ by a shift along x, so without
    registration each pair's keypoints are 1.5 mm per voxel of shift apart."""
    shifts = {"P1_0000": 0, "P1_0001": 1, "P2_0000": 0, "P2_0001": 3, "P3_0000": 2}
    data = _learn2reg(tmp_path / "l2r", shifts, labels=False)
    pairs = [("P1_0001", "P1_0000"), ("P2_0001", "P2_0000")]
    _write_json(data, registration_val=pairs, training_paired_images=[("P3_0000", "P1_0000")])
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(data), "--pairs", "registration_val", "--out", str(out)]
    assert main([*argv, "--model", "identity", "identity+refine20", "--no-progress"]) == 0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["moving"], r["fixed"]) for r in rows if r["model"] == "identity"] == pairs
    assert len(rows) == 4 and {r["organ"] for r in rows} == {""}  # one row per model and pair
    for r in rows:
        if r["model"] == "identity":
            gap = 1.5 * abs(shifts[r["moving"]] - shifts[r["fixed"]])
            assert float(r["landmark_error_mm"]) == pytest.approx(gap, abs=1e-5)
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "(registration_val); organs: none (no label maps)" in summary
    assert "Dice per organ" not in summary
    assert "## Paired Wilcoxon signed-rank tests (per-pair mean landmark error)" in summary
    assert "| identity vs identity+refine20 | 2 |" in summary
    result = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert "wilcoxon" not in result and len(result["wilcoxon_landmarks"]) == 1
    assert result["info"]["subject_names"] == ["P1_0001", "P1_0000", "P2_0001", "P2_0000"]
    assert (out / "landmarks.png").stat().st_size > 1000 and not (out / "boxplots.png").exists()
    # without --pairs or --split, a Learn2Reg folder gives its validation pairs, not every
    # ordered pair of its images (which would pair P1_0000 with P2_0001)
    again = tmp_path / "default"
    assert main(["evaluate", "--data", str(data), "--model", "identity", "--out", str(again)]) == 0
    with (again / "results.csv").open() as fh:
        assert [(r["moving"], r["fixed"]) for r in csv.DictReader(fh)] == pairs
    assert json.loads((again / "summary.json").read_text())["info"]["pairs_from"] == (
        "registration_val"
    )


def test_evaluate_learn2reg_pairs_with_labels_keep_the_json_order(tmp_path: Path) -> None:
    """AbdomenCTCT's layout: labels beside the images; the pairs are the JSON's, in order,
    each (moving, fixed) as the JSON names them."""
    data = _learn2reg(tmp_path / "l2r", {"A_0000": 0, "B_0000": 1, "C_0000": 3}, labels=True)
    pairs = [("B_0000", "A_0000"), ("A_0000", "C_0000"), ("C_0000", "B_0000")]
    _write_json(data, registration_test=pairs)
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(data), "--pairs", "registration_test", "--labels", "1"]
    assert main([*argv, "--model", "identity", "--out", str(out), "--no-progress"]) == 0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["moving"], r["fixed"]) for r in rows] == pairs
    # B is A shifted by one voxel: the spleen box of 7 voxels overlaps in 6 (Dice 12/14)
    assert float(rows[0]["dice"]) == pytest.approx(12 / 14)
    assert float(rows[0]["landmark_error_mm"]) == pytest.approx(1.5, abs=1e-5)
    assert (out / "boxplots.png").is_file() and (out / "landmarks.png").is_file()


def test_evaluate_pairs_from_a_csv_file(tmp_path: Path) -> None:
    """Longitudinal data in the DeepReg layout: only the listed pairs, in the file's order."""
    data = _dataset(tmp_path / "data", shifts=(0, 1, 3))
    listed = tmp_path / "pairs.csv"
    listed.write_text("moving,fixed\ns2,s0\ns0,s1\n")
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(data), "--pairs", str(listed), "--labels", "2"]
    assert main([*argv, "--model", "identity", "--out", str(out), "--no-progress"]) == 0
    with (out / "results.csv").open() as fh:
        assert [(r["moving"], r["fixed"]) for r in csv.DictReader(fh)] == [
            ("s2", "s0"),
            ("s0", "s1"),
        ]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("split", "leave out the split"),
        ("unknown-key", "registration_val, registration_test"),
        ("missing-image", "./imagesTr/Z_0000.nii.gz not found"),
        ("no-json", "no *_dataset.json"),
        ("csv-name", "pairs.csv, line 3: no subject 'nobody'"),
        ("csv-header", "columns moving and fixed"),
        ("some-labels", "no label map, while other subjects have one"),
        ("no-scores", "no label map and no landmarks"),
    ],
)
def test_bad_pairs(case: str, message: str, tmp_path: Path, capsys) -> None:
    data = _learn2reg(tmp_path / "l2r", {"A_0000": 0, "B_0000": 1}, labels=case == "some-labels")
    pairs, key, extra = [("B_0000", "A_0000")], "registration_val", []
    if case == "split":
        extra = ["--split", "test"]
    elif case == "unknown-key":
        key = "validation"
    elif case == "missing-image":
        pairs = [("B_0000", "Z_0000")]
    elif case == "some-labels":
        (data / "labelsTr" / "A_0000.nii.gz").unlink()
    elif case == "no-scores":
        (data / "keypointsTr" / "B_0000.csv").unlink()
    elif case.startswith("csv"):
        data = _dataset(tmp_path / "data", shifts=(0, 1))
        key = str(tmp_path / "pairs.csv")
        body = "moving,fixed\ns0,s1\nnobody,s0\n" if case == "csv-name" else "a,b\ns0,s1\n"
        Path(key).write_text(body)
    if case != "no-json":
        _write_json(tmp_path / "l2r", registration_val=pairs)
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(data), "--pairs", key, "--model", "identity"]
    assert main([*argv, *extra, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert message in err, err
    assert not out.exists()
