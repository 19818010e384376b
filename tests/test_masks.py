"""A fixed mask (``--fixed-mask``, ``register(fixed_mask=)``) limits the similarity of the
affine stage and of the optimisation to the voxels inside it, as ANTs' ``-x`` does; a
moving mask (``--moving-mask``) to the fixed voxels that the transform sends inside it.

The scene: two textured blocks A and B side by side along axis 0; in the moving image A
moved by +6 mm and B by -6 mm along axis 1. No rigid map fits both (the best one turns
between them); with a mask on A (in either image) the affine stage finds A's shift, and the
optimisation fits A and leaves B to the regulariser.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from ranreg.cli import main
from ranreg.data.io import Volume
from ranreg.models import resolve_model
from ranreg.pipeline import register_volumes
from ranreg.similarity import LocalNCC, box_mean
from tests.helpers import write_nifti

SHAPE = (40, 32, 32)
SPACING = 2.0
AFFINE = np.diag([SPACING, SPACING, SPACING, 1.0])
SHIFT_VOX = 3  # 6 mm
A = (slice(4, 17), slice(6, 26), slice(6, 26))
B = (slice(23, 36), slice(6, 26), slice(6, 26))


def _image(shift_a: int, shift_b: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    texture = ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.5)
    texture /= texture.std()
    image = np.zeros(SHAPE, np.float32)
    for block, shift in ((A, shift_a), (B, shift_b)):
        inside = np.zeros(SHAPE, bool)
        inside[block] = True
        moved = np.roll(inside, shift, axis=1)
        image[moved] = 100.0 + 30.0 * np.roll(texture, shift, axis=1)[moved]
    return image


def _volume(array: np.ndarray) -> Volume:
    return Volume(array, AFFINE, (SPACING,) * 3, None)


@pytest.fixture(scope="module")
def scene() -> dict[str, Volume]:
    mask_a = np.zeros(SHAPE, np.uint8)
    mask_a[A] = 1
    return {
        "fixed": _volume(_image(0, 0)),
        "moving": _volume(_image(SHIFT_VOX, -SHIFT_VOX)),
        "mask_a": _volume(mask_a),
        "moving_mask_a": _volume(np.roll(mask_a, SHIFT_VOX, axis=1)),  # A where it moved
    }


def _shift_mm(ddf_mm: np.ndarray, block: tuple[slice, ...]) -> float:
    """Mean displacement along axis 1 inside a block (world y: the affine is diagonal)."""
    return float(ddf_mm[block][..., 1].mean())


def _register(scene: dict[str, Volume], mask: Volume | None, **options) -> np.ndarray:
    net = resolve_model("identity")
    result = register_volumes(
        net, scene["moving"], scene["fixed"], fixed_mask=mask, progress=False, **options
    )
    return result.ddf_mm


def _register_moving_mask(scene: dict[str, Volume], mask: Volume, **options) -> np.ndarray:
    net = resolve_model("identity")
    result = register_volumes(
        net, scene["moving"], scene["fixed"], moving_mask=mask, progress=False, **options
    )
    return result.ddf_mm


def test_the_affine_stage_follows_the_masked_block(scene: dict[str, Volume]) -> None:
    true = SHIFT_VOX * SPACING
    whole = _register(scene, None, affine="rigid", refine=0)
    masked = _register(scene, scene["mask_a"], affine="rigid", refine=0)
    # without a mask the rigid map turns between the blocks: A and B move apart
    assert abs(_shift_mm(whole, A) - true) > 1.5
    assert _shift_mm(whole, B) < 0
    # with the mask it is A's shift, and B (outside the mask) moves with A
    assert abs(_shift_mm(masked, A) - true) < 0.5
    assert np.abs(masked[A][..., 1] - true).max() < 1.0
    assert _shift_mm(masked, B) > 0.5 * true


def test_the_optimisation_fits_only_inside_the_mask(scene: dict[str, Volume]) -> None:
    true = SHIFT_VOX * SPACING
    whole = _register(scene, None, affine="none", refine=50)
    masked = _register(scene, scene["mask_a"], affine="none", refine=50)
    assert abs(_shift_mm(whole, A) - true) < 1.0 and abs(_shift_mm(whole, B) + true) < 1.0
    assert abs(_shift_mm(masked, A) - true) < 1.0
    assert abs(_shift_mm(masked, B) + true) > 3.0  # B's motion was not fitted


def test_a_mask_of_the_whole_image_changes_nothing(scene: dict[str, Volume]) -> None:
    everything = _volume(np.ones(SHAPE, np.uint8))
    without = _register(scene, None, affine="rigid", refine=20)
    with_all = _register(scene, everything, affine="rigid", refine=20)
    assert np.array_equal(without, with_all)


def test_a_mask_outside_the_body_is_refused_and_one_without_use_warns(scene) -> None:
    from ranreg.errors import RanregError

    air = np.zeros(SHAPE, np.uint8)
    air[:3] = 1  # in front of block A: no tissue there
    with pytest.raises(RanregError, match="no voxel of the mask lies in the fixed image's body"):
        _register(scene, _volume(air), affine="rigid", refine=0)
    with pytest.warns(UserWarning, match="has no effect"):
        ddf = _register(scene, scene["mask_a"], affine="none", refine=0)
    assert not ddf.any()


def test_a_peer_is_said_not_to_use_the_mask(scene: dict[str, Volume]) -> None:
    pytest.importorskip("ants")
    net = resolve_model("ants-syn")
    for affine, message in (("none", "has no effect"), ("rigid", "only ranreg's affine stage")):
        with pytest.warns(UserWarning, match=message) as caught:
            register_volumes(
                net, scene["moving"], scene["fixed"], fixed_mask=scene["mask_a"], affine=affine
            )
        assert len(caught) == 1 and "do not use it" in str(caught[0].message)


def test_local_ncc_averages_over_the_body_within_the_region() -> None:
    rng = np.random.default_rng(1)
    fixed = torch.from_numpy(rng.uniform(0.0, 1.0, (1, 1, 9, 8, 7)).astype(np.float32))
    warped = torch.from_numpy(rng.uniform(0.0, 1.0, (1, 1, 9, 8, 7)).astype(np.float32))
    region = torch.zeros_like(fixed)
    region[..., :4, :, :] = 1.0
    # the squared local correlation, computed here from its definition with the same boxes
    mean_f, mean_w = box_mean(fixed, 3), box_mean(warped, 3)
    cov = box_mean(fixed * warped, 3) - mean_f * mean_w
    var_f = box_mean(fixed * fixed, 3) - mean_f**2
    var_w = box_mean(warped * warped, 3) - mean_w**2
    cc = cov**2 / (var_f.clamp_min(0) * var_w.clamp_min(0) + 1e-8)
    inside = (fixed > 0.1) & (region > 0.5)
    expected = -float(cc[inside].mean())
    assert float(LocalNCC(fixed, 3, region)(warped)) == pytest.approx(expected, rel=1e-4)
    assert float(LocalNCC(fixed, 3)(warped)) == pytest.approx(
        -float(cc[fixed > 0.1].mean()), rel=1e-4
    )


def _files(tmp_path: Path, scene: dict[str, Volume]) -> dict[str, str]:
    # the mask stored on a finer grid than the fixed image: resampled onto it
    fine = np.zeros(tuple(2 * n for n in SHAPE), np.uint8)
    fine[tuple(slice(2 * s.start, 2 * s.stop) for s in A)] = 1
    fine_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine_affine[:3, 3] = -0.5
    far_affine = AFFINE.copy()
    far_affine[:3, 3] = 1000.0  # a metre away: no voxel of it over the fixed image
    return {
        "fixed": str(write_nifti(tmp_path / "f.nii.gz", scene["fixed"].array, AFFINE)),
        "moving": str(write_nifti(tmp_path / "m.nii.gz", scene["moving"].array, AFFINE)),
        "mask": str(write_nifti(tmp_path / "mask.nii.gz", fine, fine_affine)),
        "empty": str(write_nifti(tmp_path / "e.nii.gz", np.zeros(SHAPE, np.uint8), AFFINE)),
        "far": str(write_nifti(tmp_path / "far.nii.gz", np.ones(SHAPE, np.uint8), far_affine)),
    }


def _cohort(tmp_path: Path, row: dict[str, str]) -> list[str]:
    """The arguments of ``ranreg register --pairs`` over a CSV of the one ``row``."""
    with (tmp_path / "pairs.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    pairs = ["register", "--pairs", str(tmp_path / "pairs.csv"), "--model", "identity"]
    return [*pairs, "--affine", "rigid", "--refine", "0", "--out", str(tmp_path / "cohort")]


def test_register_command_with_a_fixed_mask(tmp_path: Path, scene, capsys) -> None:
    f = _files(tmp_path, scene)
    base = ["register", "--fixed", f["fixed"], "--moving", f["moving"], "--model", "identity"]
    base += ["--affine", "rigid", "--refine", "0"]
    with pytest.warns(UserWarning, match="another grid"):
        assert main([*base, "--out", str(tmp_path / "o"), "--fixed-mask", f["mask"]]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    expected = np.prod([s.stop - s.start for s in A]) / np.prod(SHAPE)
    assert metrics["fixed_mask"]["path"] == f["mask"]
    assert metrics["fixed_mask"]["fraction"] == pytest.approx(expected, rel=1e-6)
    # the same map as the Python API with the mask on the fixed grid
    ddf = _register(scene, scene["mask_a"], affine="rigid", refine=0)
    import nibabel as nib

    written = np.asarray(nib.load(tmp_path / "o" / "ddf.nii.gz").dataobj)[..., 0, :]
    assert np.abs(written[A][..., 1] - ddf[A][..., 1]).max() < 1e-3
    capsys.readouterr()
    # an empty mask, and --fixed-mask with --pairs: one error line, nothing written
    for extra, message in (
        (["--fixed-mask", f["empty"]], "the mask is empty"),
        (["--fixed-mask", f["fixed"]], "non-integer"),
        (["--fixed-mask", f["far"]], "no voxel of this mask falls inside its image"),
    ):
        assert main([*base, "--out", str(tmp_path / "bad"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert not (tmp_path / "bad").exists()
    pairs = _cohort(tmp_path, {"fixed": f["fixed"], "moving": f["moving"], "fixed_mask": f["mask"]})
    assert main([*pairs, "--fixed-mask", f["mask"]]) == 2
    assert "--pairs takes the images from its list" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="another grid"):
        assert main(pairs) == 0
    cohort = json.loads((tmp_path / "cohort" / "pair-0001" / "metrics.json").read_text())
    assert cohort["fixed_mask"] == metrics["fixed_mask"]


def test_a_moving_mask_on_one_block_is_followed(scene: dict[str, Volume]) -> None:
    true = SHIFT_VOX * SPACING
    affine = _register_moving_mask(scene, scene["moving_mask_a"], affine="rigid", refine=0)
    assert abs(_shift_mm(affine, A) - true) < 0.5
    assert _shift_mm(affine, B) > 0.5 * true  # B moves with A, as with the fixed mask
    fitted = _register_moving_mask(scene, scene["moving_mask_a"], affine="none", refine=50)
    assert abs(_shift_mm(fitted, A) - true) < 1.0
    assert abs(_shift_mm(fitted, B) + true) > 3.0  # B's motion was not fitted


def test_a_moving_mask_outside_the_moving_body_is_refused(scene: dict[str, Volume]) -> None:
    from ranreg.errors import RanregError

    air = np.zeros(SHAPE, np.uint8)
    air[:3] = 1
    with pytest.raises(RanregError, match="no voxel of the mask lies in the moving image's body"):
        _register_moving_mask(scene, _volume(air), affine="rigid", refine=0)


def test_the_similarities_count_only_where_the_moving_mask_lands() -> None:
    from ranreg.similarity import MutualInformation

    rng = np.random.default_rng(2)
    fixed = torch.from_numpy(rng.uniform(0.0, 1.0, (1, 1, 9, 8, 7)).astype(np.float32))
    warped = torch.from_numpy(rng.uniform(0.0, 1.0, (1, 1, 9, 8, 7)).astype(np.float32))
    valid = torch.zeros_like(fixed)
    valid[..., 3:, :, :] = 1.0
    mean_f, mean_w = box_mean(fixed, 3), box_mean(warped, 3)
    cov = box_mean(fixed * warped, 3) - mean_f * mean_w
    var_f = box_mean(fixed * fixed, 3) - mean_f**2
    var_w = box_mean(warped * warped, 3) - mean_w**2
    cc = cov**2 / (var_f.clamp_min(0) * var_w.clamp_min(0) + 1e-8)
    expected = -float(cc[(fixed > 0.1) & (valid > 0.5)].mean())
    assert float(LocalNCC(fixed, 3)(warped, valid)) == pytest.approx(expected, rel=1e-4)
    # mutual information: the same as on the voxels it keeps alone
    keep = ((fixed > 0.05) & (valid > 0.5)).flatten()
    alone = MutualInformation(fixed.flatten()[keep].view(1, 1, -1, 1, 1))
    whole = MutualInformation(fixed)
    got = float(whole(warped, valid))
    assert got == pytest.approx(float(alone(warped.flatten()[keep].view(1, 1, -1, 1, 1))), rel=1e-5)
    assert got != pytest.approx(float(whole(warped)), rel=1e-3)


def test_register_command_with_a_moving_mask(tmp_path: Path, scene, capsys) -> None:
    f = _files(tmp_path, scene)
    moved = write_nifti(tmp_path / "mm.nii.gz", scene["moving_mask_a"].array, AFFINE)
    base = ["register", "--fixed", f["fixed"], "--moving", f["moving"], "--model", "identity"]
    base += ["--affine", "rigid", "--refine", "0"]
    assert main([*base, "--out", str(tmp_path / "o"), "--moving-mask", str(moved)]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    expected = np.prod([s.stop - s.start for s in A]) / np.prod(SHAPE)
    assert metrics["moving_mask"] == {"path": str(moved), "fraction": pytest.approx(expected)}
    assert metrics["fixed_mask"] is None
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "bad"), "--moving-mask", f["empty"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "the mask is empty" in err[0]
    assert not (tmp_path / "bad").exists()
    pairs = _cohort(
        tmp_path, {"fixed": f["fixed"], "moving": f["moving"], "moving_mask": str(moved)}
    )
    assert main([*pairs, "--moving-mask", str(moved)]) == 2
    assert main(pairs) == 0
    cohort = json.loads((tmp_path / "cohort" / "pair-0001" / "metrics.json").read_text())
    assert cohort["moving_mask"] == metrics["moving_mask"]
