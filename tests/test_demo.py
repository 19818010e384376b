"""`ranreg demo`: the packaged pair registers out of the box."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from ranreg.cli import main
from ranreg.demo import demo_files


def test_packaged_pair_is_complete_and_consistent() -> None:
    files = demo_files()
    assert all(p.is_file() for p in files.values())
    img = nib.load(str(files["moving_image"]))
    lab = nib.load(str(files["moving_labels"]))
    assert img.shape == lab.shape == (96, 80, 128)
    np.testing.assert_allclose(img.affine, lab.affine)
    np.testing.assert_allclose(np.abs(np.diag(img.affine))[:3], [4.0, 4.0, 4.0])
    values = set(np.unique(np.asarray(lab.dataobj)).tolist())
    assert values <= {0, 1, 2, 3, 5, 6, 8, 9, 10, 11} and len(values) >= 8


def test_demo_with_identity_writes_every_output(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--model", "identity", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "warped.nii.gz",
        "ddf.nii.gz",
        "jacobian.nii.gz",
        "warped_labels.nii.gz",
        "overlay.png",
        "metrics.json",
    } <= names
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["mean_before"]["dice"], metrics["mean_after"]["dice"]
    assert 0.2 < before < 0.5 and after == before  # identity moves nothing
    assert "Dice before -> after" in capsys.readouterr().out
    # the output folder is never overwritten
    assert main(["demo", "--model", "identity", "--out", str(out)]) == 2


def test_packaged_default_model_registers_the_demo_pair(tmp_path: Path) -> None:
    from ranreg.models import resolve_model
    from ranreg.pretrained import DEFAULT_MODEL, PRETRAINED, path_of

    assert DEFAULT_MODEL in PRETRAINED and path_of(DEFAULT_MODEL).is_file()
    model = resolve_model(None)
    cfg = model.config
    assert cfg["name"] == "RAN3" and cfg["spacing"] == [8.0, 8.0, 8.0]
    # no stored window: "auto", the CT window [-100, 300] HU for CT (ranreg.pipeline)
    assert "window" not in cfg and cfg["trained_steps"] >= 10000
    assert cfg["inverse_consistent"] and cfg["init"] == "ran3-abdomen-weak"
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["label"] == DEFAULT_MODEL
    # the field is a real, non-zero deformation with little folding
    ddf = np.asarray(nib.load(str(out / "ddf.nii.gz")).dataobj)
    assert ddf.shape == (96, 80, 128, 1, 3) and np.abs(ddf).max() > 1.0
    assert metrics["folding_percent"] < 5.0
    assert (out / "head_masks.png").is_file()
