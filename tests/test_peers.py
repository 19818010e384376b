"""The classical ANTs SyN peer (``ants-syn``): conventions, harness, missing extra.

Needs the optional extra ``peers`` (antspyx, ``pip install 'ranreg[peers]'``); skipped
without it. Images are tiny (about 0.5 s per ANTs registration).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("ants")

from ranreg.cli import main  # noqa: E402
from ranreg.errors import RanregError  # noqa: E402
from ranreg.models import model_label, resolve_model  # noqa: E402
from ranreg.peers import ANTS_SYN, AntsSyN  # noqa: E402
from ranreg.spatial import warp  # noqa: E402
from tests.helpers import write_nifti

SHAPE = (32, 28, 36)
#: Centres (voxels) and sigmas of the gaussian blobs of the test image.
BLOBS = (((14.0, 12.0, 16.0), 4.0), ((20.0, 16.0, 21.0), 3.0), ((12.0, 18.0, 22.0), 3.5))


def blob_image(shift: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Smooth gaussian blobs in [0, 1]; ``shift`` moves every blob by that many voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"))
    out = np.zeros(SHAPE)
    for centre, sigma in BLOBS:
        c = np.asarray(centre) + np.asarray(shift)
        out += np.exp(-((grid - c[:, None, None, None]) ** 2).sum(0) / (2.0 * sigma**2))
    return (out / out.max()).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> AntsSyN:
    return AntsSyN()


@pytest.mark.parametrize("axis", [0, 2])
def test_recovers_a_known_shift_along_the_right_axis(model: AntsSyN, axis: int) -> None:
    # moving has the content of fixed moved by +3 voxels along `axis`, so
    # warped(x) = moving(x + ddf(x)) = fixed(x) needs ddf = +3 e_axis where there is content.
    shift = [0.0, 0.0, 0.0]
    shift[axis] = 3.0
    fixed = torch.from_numpy(blob_image())[None, None]
    moving = torch.from_numpy(blob_image(tuple(shift)))[None, None]
    ddf = model(moving, fixed)
    assert ddf.shape == (1, 3, *SHAPE) and ddf.dtype == fixed.dtype
    assert torch.isfinite(ddf).all()
    interior = fixed[0, 0] > 0.5  # the cores of the blobs
    assert int(interior.sum()) > 100
    mean = ddf[0][:, interior].mean(dim=1)
    expected = torch.tensor(shift)
    assert torch.allclose(mean, expected, atol=0.5), (mean, expected)
    assert (ddf[0, axis][interior] - 3.0).abs().median() < 0.5
    warped = warp(moving, ddf)
    before = float(((moving - fixed) ** 2).mean())
    after = float(((warped - fixed) ** 2).mean())
    assert after < 0.2 * before, (before, after)


def test_ddf_reproduces_the_ants_warped_image(model: AntsSyN) -> None:
    # the DDF read from ANTs' composed forward transform, applied by ranreg.spatial.warp,
    # gives the image ANTs itself resampled (away from the border, where padding differs)
    fixed, moving = blob_image(), blob_image((2.0, -1.0, 3.0))
    ddf, ants_warped = model.register_arrays_with_warped(moving, fixed)
    ours = warp(torch.from_numpy(moving)[None, None], torch.from_numpy(ddf)[None])[0, 0]
    inner = (slice(3, -3),) * 3
    assert np.abs(ours.numpy()[inner] - ants_warped[inner]).max() < 1e-4


def test_deterministic_and_zero_without_contrast(model: AntsSyN) -> None:
    fixed = torch.from_numpy(blob_image())[None, None]
    moving = torch.from_numpy(blob_image((0.0, 2.0, -1.0)))[None, None]
    if model.config["itk_threads"] == "1":  # several ITK threads are not reproducible
        assert torch.equal(model(moving, fixed), model(moving, fixed))
    flat = torch.zeros_like(fixed)
    assert not model(flat, fixed).any()
    with pytest.raises(ValueError, match="same shape"):
        model(moving[..., :-1], fixed)


def test_register_cli_with_ants_syn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 4 mm voxels (the network grid is the image grid) with permuted and flipped axes and an
    # origin: the DDF must come back in world mm through the affine.
    affine = np.array(
        [[0.0, 0.0, -4.0, 30.0], [4.0, 0.0, 0.0, -12.0], [0.0, 4.0, 0.0, 7.0], [0, 0, 0, 1.0]]
    )
    hu = lambda a: (-200.0 + 450.0 * a).astype(np.float32)  # noqa: E731 (CT-like, in window)
    label = lambda a: (a > 0.5).astype(np.uint8)  # noqa: E731
    fixed_img, moving_img = blob_image(), blob_image((3.0, 0.0, -2.0))
    files = {
        "fixed": write_nifti(tmp_path / "f.nii.gz", hu(fixed_img), affine),
        "moving": write_nifti(tmp_path / "m.nii.gz", hu(moving_img), affine),
        "fixed-labels": write_nifti(tmp_path / "fl.nii.gz", label(fixed_img), affine),
        "moving-labels": write_nifti(tmp_path / "ml.nii.gz", label(moving_img), affine),
    }
    out = tmp_path / "out"
    args = ["register", "--model", ANTS_SYN, "--out", str(out), "--labels", "1"]
    for key, path in files.items():
        args += [f"--{key}", str(path)]
    assert main(args) == 0
    assert "with ants-syn" in capsys.readouterr().out
    for name in ("warped.nii.gz", "ddf.nii.gz", "jacobian.nii.gz", "warped_labels.nii.gz"):
        assert (out / name).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["label"] == ANTS_SYN
    assert metrics["model"]["config"]["name"] == ANTS_SYN
    assert metrics["network_shape"] == list(SHAPE)
    dice = metrics["labels"]["1"]
    assert dice["after"]["dice"] > dice["before"]["dice"] + 0.1
    assert dice["after"]["dice"] > 0.85
    ddf = np.asarray(nib.load(str(out / "ddf.nii.gz")).dataobj)[:, :, :, 0, :]
    # +3 voxels along array axis 0 and -2 along axis 2: world mm through the affine
    core = fixed_img > 0.5
    expected = affine[:3, :3] @ np.array([3.0, 0.0, -2.0])
    assert np.allclose(ddf[core].mean(axis=0), expected, atol=2.0), ddf[core].mean(axis=0)


def test_resolve_model_names_and_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    net = resolve_model(ANTS_SYN)
    assert isinstance(net, AntsSyN) and model_label(net) == ANTS_SYN
    assert net.config["spacing"] == [4.0, 4.0, 4.0]
    monkeypatch.setitem(sys.modules, "ants", None)  # the import fails as if not installed
    with pytest.raises(RanregError, match=r"pip install 'ranreg\[peers\]'"):
        resolve_model(ANTS_SYN)
    with pytest.raises(RanregError, match="ants-syn"):  # listed among the known names
        resolve_model("no-such-model")
