"""``ranreg register``: world-space geometry checked with oracle networks, outputs, errors."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import ranreg
from ranreg import build_model
from ranreg.checkpoint import save_model
from ranreg.cli import main
from ranreg.data.io import Volume, load_label_volume, load_nifti, spacing_from_affine
from ranreg.errors import RanregError
from ranreg.figures import head_mask_figure
from ranreg.infer import register_files
from ranreg.models import IdentityModel, resolve_model
from ranreg.nn import LevelOutput, RegistrationOutput
from ranreg.pipeline import register_volumes
from tests.helpers import write_nifti

SHAPE = (24, 20, 28)


def world_affine() -> np.ndarray:
    """Anisotropic (1.5, 2.0, 3.0) mm, axes permuted (array 0 -> world y, 1 -> z, 2 -> -x)
    and flipped, with an origin offset."""
    a = np.zeros((4, 4))
    a[1, 0] = 1.5
    a[2, 1] = 2.0
    a[0, 2] = -3.0
    a[:3, 3] = (10.0, -20.0, 5.0)
    a[3, 3] = 1.0
    return a


def subject_arrays(seed: int = 0, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth CT-like image (HU) and a label map with organs 1 and 2 away from the
    borders; ``shift`` moves the content by that many voxels towards index 0 of axis 0."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(SHAPE[0] + 8, *SHAPE[1:])), 2.0)
    image = -600.0 + 2000.0 * noise
    label = np.zeros(image.shape, np.uint8)
    label[8:15, 5:11, 6:14] = 1
    label[17:24, 10:16, 12:22] = 2
    image += 300.0 * (label == 1) + 150.0 * (label == 2)
    image = ndimage.gaussian_filter(image, 0.7)
    sl = (slice(shift, shift + SHAPE[0]), slice(None), slice(None))
    return image[sl].astype(np.float32), label[sl]


class ConstantShift(torch.nn.Module):
    """Oracle 'network': a constant DDF of ``shift`` network voxels along axis 0."""

    def __init__(self, shift: float, **config: object) -> None:
        super().__init__()
        self.shift = shift
        self.config = {"name": "oracle", "ndim": 3, **config}

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        ddf = torch.zeros(1, 3, *fixed.shape[2:])
        ddf[:, 0] = self.shift
        return ddf


class LinearStretch(torch.nn.Module):
    """Oracle: ddf_0(x) = 0.1 (x_0 - 10), so det(I + grad ddf) = 1.1 everywhere."""

    config = {"name": "stretch", "ndim": 3}

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x0 = torch.arange(fixed.shape[2], dtype=torch.float32).view(-1, 1, 1)
        ddf = torch.zeros(1, 3, *fixed.shape[2:])
        ddf[0, 0] = 0.1 * (x0 - 10.0)
        return ddf


@pytest.fixture
def pair(tmp_path: Path) -> dict[str, Path]:
    """Fixed = moving content shifted by 2 voxels along axis 0 (labels likewise).

    The moving image is stored on another grid than the fixed one: axes 0 and 1 swapped and
    axis 2 flipped, with the affine changed to match, so its world content is unchanged.
    """
    a = world_affine()
    mov_img, mov_lab = subject_arrays(0, shift=0)
    fix_img, fix_lab = subject_arrays(0, shift=2)
    # moving grid: stored[j, i, k] = moving[i, j, n2 - 1 - k]
    perm = np.zeros((4, 4))
    perm[0, 1] = perm[1, 0] = 1.0
    perm[2, 2] = -1.0
    perm[2, 3] = SHAPE[2] - 1
    perm[3, 3] = 1.0
    a_m = a @ perm
    stored_img = np.ascontiguousarray(mov_img.transpose(1, 0, 2)[:, :, ::-1])
    stored_lab = np.ascontiguousarray(mov_lab.transpose(1, 0, 2)[:, :, ::-1])
    return {
        "fixed": write_nifti(tmp_path / "fixed.nii.gz", fix_img, a),
        "fixed_labels": write_nifti(tmp_path / "fixed_labels.nii.gz", fix_lab, a),
        "moving": write_nifti(tmp_path / "moving.nii.gz", stored_img, a_m),
        "moving_labels": write_nifti(tmp_path / "moving_labels.nii.gz", stored_lab, a_m),
    }


def test_oracle_shift_through_files(pair: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    metrics = register_files(
        pair["fixed"],
        pair["moving"],
        out,
        ConstantShift(2.0),
        moving_labels=pair["moving_labels"],
        fixed_labels=pair["fixed_labels"],
        labels_to_score=(1, 2),
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "ddf.nii.gz",
        "jacobian.nii.gz",
        "metrics.json",
        "overlay.png",
        "warped.nii.gz",
        "warped_labels.nii.gz",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp left
    a = world_affine()
    mov_img, mov_lab = subject_arrays(0, shift=0)
    fix_img, fix_lab = subject_arrays(0, shift=2)

    warped = load_nifti(out / "warped.nii.gz")
    np.testing.assert_allclose(warped.affine, a)
    # warped(x) = moving(x + 2 e_0): exactly the moving image shifted by two voxels
    np.testing.assert_allclose(warped.array[:-2], mov_img[2:], atol=1e-2)
    np.testing.assert_allclose(warped.array[:-2], fix_img[:-2], atol=1e-2)
    assert np.all(warped.array[-1] == mov_img.min())  # outside the moving field of view
    labels = load_label_volume(out / "warped_labels.nii.gz").array
    np.testing.assert_array_equal(labels, fix_lab)

    ddf = nib.load(str(out / "ddf.nii.gz"))
    assert ddf.shape == (*SHAPE, 1, 3)
    assert ddf.get_data_dtype() == np.float32
    assert int(ddf.header["intent_code"]) == 1006  # NIFTI_INTENT_DISPVECT (ITK reads it as LPS)
    np.testing.assert_allclose(ddf.affine, a)
    data = np.asarray(ddf.dataobj)
    # 2 voxels along array axis 0 = 3 mm along world +y
    np.testing.assert_allclose(data[..., 0, :], np.broadcast_to([0.0, 3.0, 0.0], (*SHAPE, 3)))
    np.testing.assert_allclose(load_nifti(out / "jacobian.nii.gz").array, 1.0, atol=1e-6)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    assert saved["software"] == {"ranreg": ranreg.__version__, "torch": torch.__version__}
    assert saved["folding_percent"] == 0.0 and saved["sd_log_jacobian"] < 1e-6
    for lab, name in (("1", "spleen"), ("2", "right kidney")):
        entry = saved["labels"][lab]
        assert entry["organ"] == name
        assert entry["after"] == {"dice": 1.0, "asd_mm": 0.0, "hd95_mm": 0.0}
        assert entry["before"]["dice"] < 0.8
        assert entry["before"]["hd95_mm"] == pytest.approx(3.0)  # 2 voxels of 1.5 mm
    assert saved["mean_after"]["dice"] == 1.0
    assert saved["runtime_s"] >= saved["network_s"] >= 0


def test_network_grid_from_model_spacing(pair: dict[str, Path]) -> None:
    """A model with spacing twice the fixed one runs on a 12x10x14 grid; one network voxel
    is two fixed voxels, so a shift of 1 gives exactly the result of the shift of 2."""
    fix, mov = load_nifti(pair["fixed"]), load_nifti(pair["moving"])
    mov_lab = load_label_volume(pair["moving_labels"])
    coarse = register_volumes(ConstantShift(1.0, spacing=[3.0, 4.0, 6.0]), mov, fix, mov_lab)
    fine = register_volumes(ConstantShift(2.0), mov, fix, mov_lab)
    assert coarse.network_shape == (12, 10, 14)
    assert coarse.network_spacing == pytest.approx((3.0, 4.0, 6.0))
    np.testing.assert_allclose(coarse.ddf_vox, fine.ddf_vox, atol=1e-5)
    np.testing.assert_allclose(coarse.warped, fine.warped, atol=1e-3)
    np.testing.assert_array_equal(coarse.warped_label, fine.warped_label)


def test_jacobian_and_world_sampling_of_a_linear_field(pair: dict[str, Path]) -> None:
    fix, mov = load_nifti(pair["fixed"]), load_nifti(pair["moving"])
    res = register_volumes(LinearStretch(), mov, fix)
    np.testing.assert_allclose(res.jacobian, 1.1, rtol=1e-5)
    stats = res.jacobian_stats()
    assert stats["folding_percent"] == 0.0 and stats["sd_log_jacobian"] < 1e-5
    # ddf_mm is the world displacement: the warped image is the ORIGINAL moving image
    # sampled at A_m^-1 (A_f x + u); check with an independent interpolator
    x = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    world = x @ fix.affine[:3, :3].T + fix.affine[:3, 3] + res.ddf_mm
    to_mov = np.linalg.inv(mov.affine)
    coords = world @ to_mov[:3, :3].T + to_mov[:3, 3]
    inside = np.all((coords >= 0) & (coords <= np.array(mov.shape) - 1), axis=-1)
    expected = ndimage.map_coordinates(mov.array, coords[inside].T, order=1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(res.warped[inside], expected, rtol=1e-4, atol=1e-2)


def test_identity_model_resamples_only(pair: dict[str, Path]) -> None:
    fix, mov = load_nifti(pair["fixed"]), load_nifti(pair["moving"])
    res = register_volumes(resolve_model("identity"), mov, fix)
    mov_img, _ = subject_arrays(0, shift=0)
    np.testing.assert_allclose(res.warped, mov_img, atol=1e-3)  # the stored grid undone
    np.testing.assert_allclose(res.warped, res.moving_on_fixed)
    assert not res.ddf_mm.any()


def test_ran0_file_and_head_masks(pair: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_model(build_model("RAN0", ndim=3), tmp_path / "ran0", extra={"window": None})
    out = tmp_path / "reg"
    rc = main(
        [
            "register",
            "--fixed",
            str(pair["fixed"]),
            "--moving",
            str(pair["moving"]),
            "--model",
            str(tmp_path / "ran0"),
            "--out",
            str(out),
            "--moving-labels",
            str(pair["moving_labels"]),
            "--fixed-labels",
            str(pair["fixed_labels"]),
            "--head-masks",
        ]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["config"]["name"] == "RAN0"
    assert metrics["head_masks"] == "head_masks.png"
    assert (out / "head_masks.png").stat().st_size > 1000
    assert metrics["labels"]["1"]["after"]["dice"] is not None
    assert metrics["labels"]["3"]["after"]["dice"] is None  # absent from both maps


def test_head_mask_figure_takes_levels(tmp_path: Path) -> None:
    """Levels as RAN0 returns them: (1, m, *ceil(S / p_k)) masks, coarse to fine."""
    shape, scales = (20, 16, 18), (16, 8, 4, 2, 1)
    levels = []
    for p in scales:
        grid = tuple(-(-n // p) for n in shape)
        masks = torch.softmax(torch.randn(1, 3, *grid), dim=1)
        levels.append(LevelOutput(ddf=torch.zeros(1, 3, *grid), head_masks=masks))
    out = RegistrationOutput(torch.zeros(1, 3, *shape), levels, scales)
    path = head_mask_figure(out, torch.rand(1, 1, *shape), tmp_path / "h.png")
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="no level has head masks"):
        head_mask_figure([LevelOutput(ddf=torch.zeros(1, 3, 2, 2, 2))], np.zeros(shape), path)


def test_pretrained_lookup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    save_model(build_model("RAN0", ndim=3), tmp_path / "pkg", extra={"spacing": [4, 4, 4]})
    fake = types.ModuleType("ranreg.pretrained")
    fake.__file__ = str(tmp_path / "pkg" / "__init__.py")
    fake.PRETRAINED = {"abdomen-ran0": "model.safetensors", "broken": "missing.safetensors"}
    fake.DEFAULT_MODEL = "abdomen-ran0"
    monkeypatch.setitem(sys.modules, "ranreg.pretrained", fake)
    assert resolve_model(None).config["spacing"] == [4, 4, 4]
    assert resolve_model("abdomen-ran0").source == "abdomen-ran0"
    with pytest.raises(RanregError, match="missing.safetensors"):
        resolve_model("broken")
    with pytest.raises(RanregError, match="known: identity, abdomen-ran0, broken"):
        resolve_model("RAN9")


def test_no_packaged_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ranreg.pretrained", None)  # import fails
    with pytest.raises(RanregError, match="known: identity"):
        resolve_model("abdomen")
    with pytest.raises(RanregError, match="no packaged default"):
        resolve_model(None)
    assert isinstance(resolve_model("identity"), IdentityModel)


# ----------------------------------------------------------------------------- bad input
def _bad_case(case: str, pair: dict[str, Path], tmp: Path) -> tuple[list[str], str]:
    """Arguments that replace the good ones, and the file name the error must mention."""
    a = world_affine()
    img, _ = subject_arrays(1)
    if case == "missing":
        return ["--moving", str(tmp / "nope.nii.gz")], "nope.nii.gz"
    if case == "truncated":
        raw = pair["moving"].read_bytes()
        (tmp / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
        return ["--moving", str(tmp / "cut.nii.gz")], "cut.nii.gz"
    if case == "4d":
        write_nifti(tmp / "four.nii.gz", np.stack([img, img], axis=-1), a)
        return ["--fixed", str(tmp / "four.nii.gz")], "four.nii.gz"
    if case == "2d":
        write_nifti(tmp / "flat.nii.gz", img[:, :, 0], np.eye(4))
        return ["--moving", str(tmp / "flat.nii.gz")], "flat.nii.gz"
    if case == "nan":
        bad = img.copy()
        bad[3, 4, 5] = np.nan
        write_nifti(tmp / "nan.nii.gz", bad, a)
        return ["--fixed", str(tmp / "nan.nii.gz")], "nan.nii.gz"
    if case == "label-shape":  # another grid, 500 mm away: nothing of it inside the image
        far = a.copy()
        far[:3, 3] += 500.0
        write_nifti(tmp / "lab.nii.gz", np.ones((24, 20, 27), np.uint8), far)
        return ["--fixed-labels", str(tmp / "lab.nii.gz")], "lab.nii.gz"
    if case == "torch-pickle":
        torch.save(build_model("RAN0", ndim=3).state_dict(), tmp / "weights.pt")
        return ["--model", str(tmp / "weights.pt")], "weights.pt"
    if case == "random-file":
        (tmp / "junk.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
        return ["--model", str(tmp / "junk.safetensors")], "junk.safetensors"
    if case == "unknown-name":
        return ["--model", "RAN9"], "RAN9"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "truncated",
        "4d",
        "2d",
        "nan",
        "label-shape",
        "torch-pickle",
        "random-file",
        "unknown-name",
    ],
)
def test_bad_input_is_one_error_line(
    case: str, pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replace, name = _bad_case(case, pair, tmp_path)
    args = {
        "--fixed": str(pair["fixed"]),
        "--moving": str(pair["moving"]),
        "--model": "identity",
        "--moving-labels": str(pair["moving_labels"]),
        "--fixed-labels": str(pair["fixed_labels"]),
    }
    args.update(dict(zip(replace[::2], replace[1::2], strict=True)))
    out = tmp_path / "sub" / "out"
    argv = ["register", "--out", str(out), *[x for kv in args.items() for x in kv]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and name in err, err
    if case == "label-shape":
        assert "fixed.nii.gz" in err
    assert not (tmp_path / "sub").exists()


def test_non_empty_out_dir_is_refused(
    pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["register", "--fixed", str(pair["fixed"]), "--moving", str(pair["moving"])]
    assert main([*argv, "--model", "identity", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failure_while_writing_leaves_nothing(
    pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ranreg.figures

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(ranreg.figures, "overlay_figure", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        register_files(pair["fixed"], pair["moving"], tmp_path / "a" / "b", "identity")
    assert not (tmp_path / "a").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in pair.values())


def test_volume_spacing_matches_affine() -> None:
    assert spacing_from_affine(world_affine()) == (1.5, 2.0, 3.0)
    vol = Volume(np.zeros(SHAPE, np.float32), world_affine(), (1.5, 2.0, 3.0))
    assert vol.shape == SHAPE
