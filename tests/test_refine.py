"""Instance optimisation (ranreg.refine): recovers known shifts, keeps its contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from ranreg.cli import main
from ranreg.data.io import Volume, save_nifti
from ranreg.errors import RanregError
from ranreg.evaluate import model_runs, split_pipeline
from ranreg.losses import local_ncc_loss
from ranreg.models import resolve_model
from ranreg.pipeline import register_volumes
from ranreg.refine import DEFAULT_STEPS, check_refine, refine_ddf
from ranreg.runtime import is_neural
from ranreg.spatial import warp

SHAPE = (32, 28, 36)
MARGIN = 4
#: smooth random texture (gaussian-filtered noise), larger than SHAPE to crop shifted copies
TEXTURE = ndimage.gaussian_filter(
    np.random.default_rng(0).random(tuple(n + 2 * MARGIN for n in SHAPE)), 1.5
)


def texture(shift: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Texture in [0, 1] (``fixed``); with ``shift`` s the same texture moved by +s voxels,
    so that ``moving(x + s) = fixed(x)``."""
    start = [MARGIN - int(k) for k in shift]
    crop = TEXTURE[tuple(slice(a, a + n) for a, n in zip(start, SHAPE, strict=True))]
    lo, hi = TEXTURE.min(), TEXTURE.max()
    return ((crop - lo) / (hi - lo)).astype(np.float32)


def as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)[None, None]


@pytest.mark.parametrize("axis", [0, 2])
def test_recovers_a_known_shift_from_zero(axis: int) -> None:
    # moving = fixed moved by +2 voxels along `axis`: warped(x) = moving(x + u) = fixed(x)
    # needs u = +2 e_axis where the blobs are
    shift = [0, 0, 0]
    shift[axis] = 2
    fixed, moving = as_tensor(texture()), as_tensor(texture(tuple(shift)))
    zero = torch.zeros(1, 3, *SHAPE)
    u = refine_ddf(zero, moving, fixed, 100, mask_threshold=None)
    assert u.shape == zero.shape and u.dtype == torch.float32 and not u.requires_grad
    core = torch.ones(SHAPE, dtype=torch.bool)
    core[tuple(slice(MARGIN, -MARGIN) for _ in SHAPE)] = False
    core = ~core  # away from the borders, where the shifted content is missing
    mean = u[0][:, core].mean(dim=1)
    torch.testing.assert_close(mean, torch.tensor(shift, dtype=torch.float32), atol=0.1, rtol=0)
    before = local_ncc_loss(fixed, moving, window=5)
    after = local_ncc_loss(fixed, warp(moving, u), window=5)
    assert after < before - 0.05, (before, after)
    assert torch.equal(zero, torch.zeros_like(zero))  # the start field is not modified


def test_zero_steps_and_inference_mode() -> None:
    fixed, moving = as_tensor(texture()), as_tensor(texture((1, 0, 0)))
    start = torch.randn(1, 3, *SHAPE) * 0.1
    same = refine_ddf(start, moving, fixed, 0)
    assert torch.equal(same, start) and same.data_ptr() != start.data_ptr()
    with torch.inference_mode():  # as inside inference code: refinement still has gradients
        inf_start = start.clone()
        u = refine_ddf(inf_start, moving.clone(), fixed.clone(), 3)
    assert not torch.equal(u, start) and torch.isfinite(u).all()


@pytest.mark.parametrize(("steps", "weight"), [(-1, 1.0), (True, 1.0), (2.5, 1.0), (5, -1.0)])
def test_bad_settings_raise_one_line(steps, weight) -> None:
    with pytest.raises(RanregError, match="refine"):
        check_refine(steps, weight)
    with pytest.raises(RanregError):
        check_refine(5, float("nan"))


@pytest.mark.parametrize("spacing", [4.0, 2.0])  # 2 mm: refined on a 4 mm grid, resampled back
def test_register_volumes_refines_in_world_space(spacing: float) -> None:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    fixed = Volume(texture(), affine, (spacing,) * 3)
    moving = Volume(texture((3, 0, 0)), affine, (spacing,) * 3)
    identity = resolve_model("identity")
    plain = register_volumes(identity, moving, fixed)
    assert not plain.ddf_mm.any() and plain.refine_s == 0.0
    res = register_volumes(identity, moving, fixed, refine=DEFAULT_STEPS)
    assert res.refine_s > 0 and res.runtime_s >= res.refine_s
    core = np.zeros(SHAPE, dtype=bool)
    core[tuple(slice(MARGIN, -MARGIN) for _ in SHAPE)] = True
    mean_mm = res.ddf_mm[core].mean(axis=0)  # world axes = array axes here
    np.testing.assert_allclose(mean_mm, [3.0 * spacing, 0.0, 0.0], atol=0.3 * spacing)
    # the warped image now matches the fixed one where the blobs are
    err_before = np.abs(plain.warped - fixed.array)[core].mean()
    err_after = np.abs(res.warped - fixed.array)[core].mean()
    assert err_after < 0.3 * err_before


def test_pipeline_suffixes_in_evaluate_specs() -> None:
    assert split_pipeline("ran3-abdomen-cpu") == ("ran3-abdomen-cpu", {})
    assert split_pipeline("ran3-abdomen-cpu+refine") == (
        "ran3-abdomen-cpu",
        {"refine": DEFAULT_STEPS},
    )
    assert split_pipeline("m@bf16+refine25") == ("m@bf16", {"refine": 25})
    assert split_pipeline("m+fast+noaffine") == ("m", {"fast": True, "affine": "none"})
    assert split_pipeline(None) == (None, {})
    for bad in ("m+refine-3", "m+refinex", "+refine5", "m+slow"):
        with pytest.raises(RanregError, match=r"suffix"):
            split_pipeline(bad)
    runs = model_runs(
        ["ran3-abdomen-cpu+refine10", "opt=identity+refine5", "ran3-abdomen-cpu+fast"]
    )
    steps = [(r.name, r.options.refine_steps(is_neural(r.net))) for r in runs]
    assert steps == [
        ("ran3-abdomen-cpu+refine10", 10),
        ("opt+refine5", 5),
        ("ran3-abdomen-cpu+fast", 0),
        ("identity", 0),  # the plain reference is still added
    ]


def test_cli_register_records_refinement_and_refuses_bad_steps(tmp_path: Path, capsys) -> None:
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    save_nifti(tmp_path / "f.nii.gz", texture(), affine)
    save_nifti(tmp_path / "m.nii.gz", texture((2, 0, 0)), affine)
    common = ["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving"]
    common += [str(tmp_path / "m.nii.gz"), "--model", "identity"]
    out = tmp_path / "out"
    assert main([*common, "--out", str(out), "--refine", "20"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["refine"]["steps"] == 20 and metrics["refine"]["weight"] == 1.0
    assert metrics["refine"]["seconds"] > 0
    assert "optimisation 20 steps" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "bad"), "--refine", "-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "refine" in err[0]
    assert not (tmp_path / "bad").exists()
