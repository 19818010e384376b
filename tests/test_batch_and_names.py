"""Cohorts (``register --pairs``: model loaded once, resumable after a kill, failures
recorded), label names from the data, and a ``--help`` that imports nothing heavy."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from ranreg.atomic import temporary_sibling
from ranreg.cli import main
from ranreg.errors import RanregError
from ranreg.labelnames import label_name, load_label_names
from tests.helpers import write_nifti


def _volume(path: Path, seed: int, labels: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.normal(size=(20, 18, 16)), 2.0) * 800.0
    if labels:
        lab = np.zeros(image.shape, np.uint8)
        lab[4:10, 4:10, 4:10] = 5
        lab[11:16, 9:15, 6:12] = 63
        write_nifti(path, lab, np.diag([3.0, 3.0, 3.0, 1.0]))
    else:
        write_nifti(path, image.astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    return path


def _pairs_csv(tmp: Path, rows: list[tuple[str, str, str]]) -> Path:
    path = tmp / "pairs.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "fixed", "moving"])
        w.writerows(rows)
    return path


def test_pairs_run_resume_after_a_kill_and_record_failures(tmp_path: Path, capsys) -> None:
    for i in range(3):
        _volume(tmp_path / f"img{i}.nii.gz", i)
    pairs = _pairs_csv(
        tmp_path, [("a", "img0.nii.gz", "img1.nii.gz"), ("b", "img1.nii.gz", "img2.nii.gz")]
    )
    out = tmp_path / "cohort"
    argv = ["register", "--pairs", str(pairs), "--out", str(out), "--model", "identity"]
    assert main(argv) == 0
    first = (out / "a" / "metrics.json").stat().st_mtime_ns
    with (out / "summary.csv").open() as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["done", "done"]
    # a kill in the middle of pair b: its folder never appeared, a temporary one is left
    import shutil

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stale = out / f".b.{gone}.x1y2.tmp"  # the killed process's temporary folder
    shutil.rmtree(out / "b")
    stale.mkdir()
    (stale / "warped.nii.gz").write_bytes(b"partial")
    # its summary's temporary file, named as atomic_file names it, with the dead pid
    mine = temporary_sibling(out / "summary.csv").name
    half = out / mine.replace(f".{os.getpid()}.", f".{gone}.", 1)
    half.write_text("half a summary")
    (out / "summary.csv").unlink()
    assert main(argv) == 0
    assert (out / "a" / "metrics.json").stat().st_mtime_ns == first  # a was not redone
    assert (out / "b" / "metrics.json").is_file() and not stale.exists()
    assert not half.exists()
    with (out / "summary.csv").open() as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == ["a", "b"]
    # a pair whose image is corrupt fails alone, recorded; the command ends with exit 2
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    pairs = _pairs_csv(
        tmp_path, [("a", "img0.nii.gz", "img1.nii.gz"), ("c", "img0.nii.gz", "bad.nii.gz")]
    )
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 of 2 pairs failed")
    with (out / "summary.csv").open() as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert rows["a"]["status"] == "done" and rows["c"]["status"] == "failed"
    assert "bad.nii.gz" in rows["c"]["error"] and not (out / "c").exists()


def test_pairs_file_is_checked_before_anything_runs(tmp_path: Path, capsys) -> None:
    _volume(tmp_path / "img0.nii.gz", 0)
    pairs = _pairs_csv(tmp_path, [("a", "img0.nii.gz", "missing.nii.gz")])
    out = tmp_path / "cohort"
    assert main(["register", "--pairs", str(pairs), "--out", str(out), "--model", "identity"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.nii.gz not found" in err[0] and not out.exists()
    assert main(["register", "--out", str(out)]) == 2
    assert "--fixed and --moving, or --pairs" in capsys.readouterr().err


def test_builtin_and_file_label_names(tmp_path: Path) -> None:
    assert label_name(load_label_names("totalseg"), 5) == "liver"
    assert label_name(load_label_names("totalseg"), 117) == "costal_cartilages"
    assert label_name(load_label_names("totalseg-mr"), 23) == "aorta"
    assert label_name(load_label_names(None), 6) == "liver"  # the abdomen default
    assert label_name(load_label_names("totalseg"), 500) == "label 500"
    (tmp_path / "n.json").write_text(json.dumps({"5": "my liver", "7": "pancreas"}))
    (tmp_path / "n.csv").write_text("id,name\n5,my liver\n7,pancreas\n")
    assert load_label_names(tmp_path / "n.json") == {5: "my liver", 7: "pancreas"}
    assert load_label_names(tmp_path / "n.csv") == {5: "my liver", 7: "pancreas"}
    (tmp_path / "bad.csv").write_text("5,liver\nx,spleen\n")
    with pytest.raises(RanregError, match="not an integer"):
        load_label_names(tmp_path / "bad.csv")
    with pytest.raises(RanregError, match="built-in table"):
        load_label_names("no-such-table")


def test_register_reports_names_from_the_chosen_table(tmp_path: Path, capsys) -> None:
    f, m = _volume(tmp_path / "f.nii.gz", 0), _volume(tmp_path / "m.nii.gz", 1)
    fl = _volume(tmp_path / "fl.nii.gz", 0, labels=True)
    ml = _volume(tmp_path / "ml.nii.gz", 1, labels=True)
    out = tmp_path / "out"
    argv = ["register", "--fixed", str(f), "--moving", str(m), "--fixed-labels", str(fl)]
    argv += ["--moving-labels", str(ml), "--model", "identity", "--label-names", "totalseg"]
    assert main([*argv, "--out", str(out)]) == 0
    labels = json.loads((out / "metrics.json").read_text())["labels"]
    assert {k: v["organ"] for k, v in labels.items()} == {"5": "liver", "63": "inferior_vena_cava"}
    text = capsys.readouterr().out
    assert "liver" in text and "esophagus" not in text


def test_top_level_help_imports_no_torch() -> None:
    code = (
        "import sys\nfrom ranreg.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
    assert "register" in out.stdout and "apply" in out.stdout


def test_version_is_the_package_version(capsys) -> None:
    from ranreg import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"ranreg {__version__}"
    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as fh:
        import tomllib

        assert tomllib.load(fh)["project"]["version"] == __version__


def test_outputs_follow_the_input_format_or_format(tmp_path: Path) -> None:
    import SimpleITK as sitk

    from ranreg.data.io import load_nifti

    f = _volume(tmp_path / "f.nii.gz", 0)
    m = _volume(tmp_path / "m.nii.gz", 1)
    sitk.WriteImage(sitk.ReadImage(str(f)), str(tmp_path / "f.nrrd"))
    base = ["register", "--moving", str(m), "--model", "identity"]
    assert main([*base, "--fixed", str(tmp_path / "f.nrrd"), "--out", str(tmp_path / "a")]) == 0
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"warped.nrrd", "jacobian.nrrd", "ddf.nii.gz"} <= names
    assert "warped.nii.gz" not in names
    warped = load_nifti(tmp_path / "a" / "warped.nrrd")
    np.testing.assert_allclose(warped.affine, load_nifti(f).affine, atol=1e-5)
    argv = [*base, "--fixed", str(f), "--out", str(tmp_path / "b"), "--format", "mha"]
    assert main(argv) == 0
    assert (tmp_path / "b" / "warped.mha").is_file() and (tmp_path / "b" / "ddf.nii.gz").is_file()


def test_evaluate_finds_nrrd_subjects(tmp_path: Path) -> None:
    import SimpleITK as sitk

    data = tmp_path / "data"
    for sub in ("images", "labels"):
        (data / sub).mkdir(parents=True)
    for i in range(2):
        img = _volume(tmp_path / f"i{i}.nii.gz", i)
        lab = _volume(tmp_path / f"l{i}.nii.gz", i, labels=True)
        sitk.WriteImage(sitk.ReadImage(str(img)), str(data / "images" / f"s{i}.nrrd"))
        sitk.WriteImage(sitk.ReadImage(str(lab)), str(data / "labels" / f"s{i}.nrrd"))
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(data), "--model", "identity", "--no-progress"]
    assert main([*argv, "--out", str(out), "--labels", "5", "63"]) == 0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["moving"], r["fixed"]) for r in rows} == {("s0", "s1"), ("s1", "s0")}
    assert {r["organ"] for r in rows} == {"esophagus", "label 63"}  # the abdomen table
    argv += ["--label-names", "totalseg", "--labels", "5", "63"]
    assert main([*argv, "--out", str(tmp_path / "eval2")]) == 0
    with (tmp_path / "eval2" / "results.csv").open() as fh:
        assert {r["organ"] for r in csv.DictReader(fh)} == {"liver", "inferior_vena_cava"}


def test_register_cohort_api_matches_the_command(tmp_path: Path, capsys) -> None:
    """``ranreg.register_cohort`` with Pair objects writes what ``register --pairs CSV``
    writes (same fields, same summary), and refuses bad pair lists before writing."""
    import nibabel as nib

    import ranreg
    from ranreg.batch import Pair

    for i in range(3):
        _volume(tmp_path / f"img{i}.nii.gz", i)
    rows = [("a", "img0.nii.gz", "img1.nii.gz"), ("b", "img1.nii.gz", "img2.nii.gz")]
    csv_path = _pairs_csv(tmp_path, rows)
    settings = {"refine": 4, "refine_levels": [6.0]}
    argv = ["register", "--pairs", str(csv_path), "--out", str(tmp_path / "cli")]
    argv += ["--model", "identity", "--refine", "4", "--refine-levels", "6"]
    assert main(argv) == 0
    pairs = [Pair(n, tmp_path / f, tmp_path / m) for n, f, m in rows]
    got = ranreg.register_cohort(pairs, tmp_path / "api", model="identity", **settings)
    assert [r["status"] for r in got] == ["done", "done"]
    for name in ("a", "b"):
        cli = nib.load(tmp_path / "cli" / name / "ddf.nii.gz").get_fdata()
        api = nib.load(tmp_path / "api" / name / "ddf.nii.gz").get_fdata()
        assert np.abs(cli).max() > 0.01  # the optimisation moved something
        np.testing.assert_allclose(api, cli, atol=1e-5)
    with (tmp_path / "cli" / "summary.csv").open() as fh:
        cli_rows = list(csv.DictReader(fh))
    for a, c in zip(got, cli_rows, strict=True):
        assert a["name"] == c["name"] and a["status"] == c["status"]
        assert float(c["sd_log_jacobian"]) == pytest.approx(a["sd_log_jacobian"], rel=1e-4)

    bad = {
        "unsafe": ([Pair("../x", pairs[0].fixed, pairs[0].moving)], {}, "not a safe folder"),
        "twice": ([pairs[0], pairs[0]], {}, "must be unique"),
        "empty": ([], {}, "give a CSV file"),
        "affine": (pairs, {"initial_affine": str(csv_path)}, "initial_affine column"),
        "option": (pairs, {"refine_steps": 3}, "unknown registration option"),
    }
    for name, (listed, extra, message) in bad.items():
        with pytest.raises(RanregError, match=message):
            ranreg.register_cohort(listed, tmp_path / name, model="identity", **extra)
        assert not (tmp_path / name).exists(), name
