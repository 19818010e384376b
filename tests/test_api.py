"""The Python API (:func:`ranreg.register`): docs/api.md runs as written, and it matches
``ranreg register`` (same files, same metrics)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ranreg.cli import main
from ranreg.data.io import Volume, load_nifti
from ranreg.errors import RanregError
from ranreg.infer import register_files
from tests.helpers import write_nifti

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _blob(points: np.ndarray, centre: tuple[float, float, float], sigma: float) -> np.ndarray:
    return np.exp(-((points - np.asarray(centre)) ** 2).sum(-1) / (2 * sigma**2))


def _grid_points(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    vox = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    return vox @ affine[:3, :3].T + affine[:3, 3]


def make_pair(folder: Path) -> None:
    """The files docs/api.md uses: a smooth pair (moving shifted 4 mm, on a rotated,
    anisotropic grid), both label maps and a float map in moving space."""
    fixed_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    fixed_affine[:3, 3] = (-33.0, -30.0, -27.0)
    c, s = np.cos(0.2), np.sin(0.2)
    moving_affine = np.eye(4)
    moving_affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([2.5, 3, 3.5])
    moving_affine[:3, 3] = (-36.0, -38.0, -30.0)
    for role, shape, affine, shift in (
        ("fixed", (23, 21, 19), fixed_affine, 0.0),
        ("moving", (28, 24, 18), moving_affine, 4.0),
    ):
        p = _grid_points(shape, affine)
        a, b = _blob(p, (-8 + shift, 0, 0), 9.0), _blob(p, (10 + shift, 5, 2), 7.0)
        image = (20 + 80 * a + 50 * b).astype(np.float32)
        labels = ((a > 0.5) * 1 + (b > 0.5) * 2).astype(np.uint8)
        write_nifti(folder / f"{role}.nii.gz", image, affine)
        write_nifti(folder / f"{role}_labels.nii.gz", labels, affine)
        if role == "moving":
            dose = (0.9 * a + 0.3 * b).astype(np.float32)
            write_nifti(folder / "moving_dose.nii.gz", dose, affine)
    # landmarks at the blobs' centres: LPS, as ANTs and Slicer write them
    (folder / "fixed_landmarks.csv").write_text("name,x,y,z\na,8,0,0\nb,-10,-5,2\n")
    (folder / "moving_landmarks.fcsv").write_text(
        "# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        "f_0,4,0,0,0,0,0,1,1,1,0,a,,\nf_1,-14,-5,2,0,0,0,1,1,1,0,b,,\n"
    )


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def doc_apply_commands() -> list[list[str]]:
    """The concrete ``ranreg apply`` command lines of the docs (not the synopsis)."""
    commands = []
    for block in doc_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line)
            if words[:2] == ["ranreg", "apply"] and "RESULT_DIR" not in line:
                commands.append(words[1:])
    return commands


def test_docs_examples_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_pair(tmp_path)
    monkeypatch.chdir(tmp_path)
    blocks = doc_blocks("python")
    assert len(blocks) >= 5
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    reg, inv = namespace["reg"], namespace["inv"]
    cohort = namespace["rows"][0]  # type: ignore[index]
    assert cohort["status"] == "done" and (tmp_path / "cohort" / "first" / "ddf.nii.gz").is_file()
    assert cohort["mean_dice_after"] > cohort["mean_dice_before"]
    assert inv.round_trip_mm["mean"] < 0.1  # type: ignore[attr-defined]
    assert reg.metrics["moving_grid"]["shape"] == [28, 24, 18]  # type: ignore[attr-defined]
    saved = {p.name for p in (tmp_path / "result").iterdir()}
    assert {"warped.nii.gz", "warped_labels.nii.gz", "ddf.nii.gz", "metrics.json"} <= saved
    assert {"jacobian.nii.gz", "overlay.png"} <= saved

    commands = doc_apply_commands()
    assert len(commands) == 5
    capsys.readouterr()
    for argv in commands:
        assert main(argv) == 0, argv
        assert Path(argv[argv.index("--out") + 1]).is_file()
    out = capsys.readouterr().out
    assert "round-trip error" in out and "residual at most" in out


def test_api_matches_register_files(tmp_path: Path) -> None:
    """The same inputs give the same files and the same metrics keys as the command."""
    from ranreg import register

    make_pair(tmp_path)
    files = {k: tmp_path / f"{k}.nii.gz" for k in ("fixed", "moving", "moving_labels")}
    metrics = register_files(
        files["fixed"],
        files["moving"],
        tmp_path / "cli",
        "identity",
        moving_labels=files["moving_labels"],
        affine="rigid",
    )
    reg = register(
        files["fixed"],
        files["moving"],
        model="identity",
        moving_labels=files["moving_labels"],
        affine="rigid",
    )
    reg.save(tmp_path / "api")
    assert sorted(p.name for p in (tmp_path / "api").iterdir()) == sorted(
        p.name for p in (tmp_path / "cli").iterdir()
    )
    assert set(reg.metrics) <= set(metrics) | {"fixed_grid", "moving_grid"}
    cli_warped = load_nifti(tmp_path / "cli" / "warped.nii.gz").array
    assert np.allclose(reg.warped.array, cli_warped, atol=1e-3)
    assert np.allclose(
        reg.metrics["affine"]["world_matrix_ras"], metrics["affine"]["world_matrix_ras"], atol=1e-6
    )


def test_api_accepts_arrays_and_volumes(tmp_path: Path) -> None:
    from ranreg import register

    make_pair(tmp_path)
    fixed = load_nifti(tmp_path / "fixed.nii.gz")
    moving = nib.load(str(tmp_path / "moving.nii.gz"))
    reg = register(fixed, (np.asarray(moving.dataobj), moving.affine), model="identity")
    assert isinstance(reg.warped, Volume) and reg.warped.shape == fixed.shape
    assert reg.metrics["moving"] is None and reg.metrics["fixed"] == str(fixed.path)
    labels = reg.apply((np.full(moving.shape, 2.0), moving.affine), labels=True)
    assert labels.array.dtype == np.int32 and set(np.unique(labels.array)) <= {0, 2}
    with pytest.raises(RanregError, match="unknown registration option"):
        register(fixed, fixed, model="identity", refine_steps=3)
    with pytest.raises(RanregError, match="3D"):
        register(fixed, (np.zeros((4, 4)), np.eye(4)), model="identity")


def test_import_ranreg_stays_light() -> None:
    code = (
        "import sys, ranreg; assert 'ranreg.api' not in sys.modules; "
        "f = ranreg.register; import ranreg.api; assert f is ranreg.api.register"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
