"""The benchmark harness's own arithmetic: sliding-motion scoring and budget configs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import sliding  # noqa: E402
import train_budget  # noqa: E402


@pytest.fixture(scope="module")
def pair(shared_dir_module: Path) -> dict:
    return sliding.sliding_pairs(1, ["0027"])[0]


@pytest.fixture(scope="module")
def shared_dir_module() -> Path:
    path = BENCH.parents[1] / "shared" / "data" / "abdomen-ct-labels"
    if not path.is_dir():
        pytest.skip(f"shared labels not found: {path}")
    return path


def test_sliding_pair_is_consistent(pair: dict) -> None:
    from ranreg.sliding import sliding_boundary_mask

    ddf, regions = pair["ddf"], pair["regions"]
    assert ddf.shape == (3, 96, 80, 128) and regions.shape == (96, 80, 128)
    assert set(np.unique(regions)) == {0, 1, 2}
    # the body wall and air (region 0) stay still; both organ groups move
    assert not ddf[:, regions == 0].any()
    for k in (1, 2):
        assert np.abs(ddf[:, regions == k]).max() > 0.5
    # the field jumps across the sliding boundaries: neighbours differ by > 1 voxel somewhere
    jump = np.abs(np.diff(ddf, axis=1)).max()
    assert jump > 1.0
    near = sliding_boundary_mask(regions, sliding.BOUNDARY_WIDTH)
    assert 0 < near.sum() < near.size // 2


def test_scores_of_the_true_and_the_zero_field(pair: dict) -> None:
    from ranreg.metrics import PAPER_ORGANS, dice

    true_vox = np.moveaxis(pair["ddf"], 0, -1)
    # warping the moving labels with the true field reproduces the fixed labels exactly
    s = sliding.score(pair, true_vox, pair["fixed_labels"].array)
    assert s["epe_mm"] == s["epe_boundary_mm"] == s["epe_interior_mm"] == 0.0
    assert s["dice"] == 1.0
    # the zero field: EPE = mean |true DDF| in mm inside the body, Dice = no registration
    z = sliding.score(pair, np.zeros_like(true_vox), pair["moving_labels"].array)
    body = pair["fixed"].array > -500.0
    size = np.linalg.norm(pair["ddf"] * 4.0, axis=0)  # 4 mm voxels
    assert z["epe_mm"] == pytest.approx(size[body].mean(), rel=1e-5)
    assert z["epe_boundary_mm"] > 0.0 and z["epe_interior_mm"] >= 0.0
    d = dice(pair["moving_labels"].array, pair["fixed_labels"].array, PAPER_ORGANS)
    assert z["dice"] == pytest.approx(np.nanmean(list(d.values())), abs=1e-9)
    assert z["dice"] < 0.95


def test_budget_configs_differ_only_in_the_model(tmp_path: Path) -> None:
    from ranreg.config import parse_config

    base = yaml.safe_load(train_budget.CONFIG.read_text())
    cfgs = {
        m: train_budget.model_config(base, m, tmp_path / "cache", None) for m in train_budget.MODELS
    }
    for m, cfg in cfgs.items():
        parsed = parse_config(cfg, m, tmp_path)
        assert parsed.model.name == m
        assert parsed.data.cache == str((tmp_path / "cache").resolve())
        assert Path(parsed.data.labels).is_absolute()
        rest = dict(cfg, model=None)
        assert rest == dict(cfgs["RAN3"], model=None)  # one recipe, one budget
    quick = train_budget.model_config(base, "RAN0", tmp_path, 20)
    assert [s["steps"] for s in quick["stages"]] == [20]


def test_thin_slab_cases_carry_their_true_map(tmp_path: Path) -> None:
    """benchmarks/thin_slabs.py: fixed(p) = moving(T p) up to the added noise, inside the
    scored region; the identity (no motion) explains the pair far worse."""
    import nibabel as nib
    import thin_slabs
    from scipy import ndimage

    if not thin_slabs.SCAN.is_file():
        pytest.skip(f"shared scan not found: {thin_slabs.SCAN}")
    img = nib.load(thin_slabs.SCAN)
    scan = np.asarray(img.dataobj, dtype=np.float32)
    case, truth, world, scored = thin_slabs.make_pair(scan, img.affine, 6, 1, tmp_path)
    fixed = np.asarray(nib.load(case / "fixed.nii.gz").dataobj)
    moving_img = nib.load(case / "moving.nii.gz")
    moving = np.asarray(moving_img.dataobj)
    to_voxel = np.linalg.inv(moving_img.affine)

    def residual(world_map: np.ndarray) -> float:
        q = world[scored] @ world_map[:3, :3].T + world_map[:3, 3]
        vox = q @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        seen = ndimage.map_coordinates(moving, vox.T, order=1, mode="nearest")
        return float(np.abs(seen - fixed[scored]).mean())

    assert not np.allclose(truth, np.eye(4)) and scored.mean() > 0.4
    # two noises of SD 10 HU and two linear interpolations of a real CT's edges: ~37 HU;
    # no motion, or the map taken the wrong way round, leave 150-200 HU
    assert residual(truth) < 50.0
    assert residual(truth) < 0.3 * min(residual(np.eye(4)), residual(np.linalg.inv(truth)))
    # the truth moves the slab within its plane only
    normal = img.affine[:3, 2] / np.linalg.norm(img.affine[:3, 2])
    moved = world[scored] @ truth[:3, :3].T + truth[:3, 3] - world[scored]
    assert np.abs(moved @ normal).max() < 1e-6
