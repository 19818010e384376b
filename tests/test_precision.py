"""Network precision and memory layout (`--precision`, `--channels-last`)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ranreg import build_model
from ranreg.cli import main
from ranreg.data.datasets import crop_offsets
from ranreg.data.io import Volume, load_label_volume, load_nifti
from ranreg.demo import demo_files
from ranreg.errors import RanregError
from ranreg.evaluate import model_runs, split_label, split_precision
from ranreg.models import IdentityModel, resolve_model
from ranreg.options import RegistrationOptions
from ranreg.pipeline import register_volumes
from ranreg.runtime import fast_bf16, is_neural, run_network
from tests.helpers import smooth_image, write_nifti


def _pair(ndim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (1, 1, 32, 32, 32)[: 2 + ndim]
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g)


@pytest.mark.parametrize("ndim", [2, 3])
def test_channels_last_gives_the_same_ddf(ndim: int) -> None:
    torch.manual_seed(0)
    net = build_model("RAN4", ndim=ndim).eval()
    moving, fixed = _pair(ndim)
    plain, _ = run_network(net, moving, fixed, channels_last=False)
    last, _ = run_network(net, moving, fixed, channels_last=True)
    assert plain.shape == last.shape == (1, ndim, *moving.shape[2:])
    assert plain.dtype == last.dtype == torch.float32 and last.is_contiguous()
    assert plain.abs().max() > 1e-3  # a real, non-zero field
    torch.testing.assert_close(last, plain, rtol=1e-4, atol=1e-5)


def test_bf16_runs_convolutions_in_bf16_and_returns_float32() -> None:
    # where bf16 is emulated the user is told it is slow; there the check runs in 2D
    # (the same autocast path), as a 3D RAN3 takes ~35 s at its 32^3 minimum size
    emulated = not fast_bf16(torch.device("cpu"))
    ndim = 2 if emulated else 3
    torch.manual_seed(0)
    net = build_model("RAN3", ndim=ndim).eval()
    seen: list[torch.dtype] = []
    conv_cls = {2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[ndim]
    first_conv = next(m for m in net.modules() if isinstance(m, conv_cls))
    hook = first_conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    moving, fixed = _pair(ndim)
    with pytest.warns(UserWarning, match="bf16 is emulated") if emulated else nullcontext():
        ddf, _ = run_network(net, moving, fixed, precision="bf16")
    hook.remove()
    ref, _ = run_network(net, moving, fixed, precision="fp32")
    assert seen == [torch.bfloat16] and ddf.dtype == torch.float32
    # bf16 keeps ~3 significant digits: on average the fields agree to a few percent
    assert (ddf - ref).abs().mean() <= 0.05 * ref.abs().mean()


def test_precision_does_not_touch_models_without_weights() -> None:
    moving, fixed = _pair(3)
    ident = IdentityModel()
    assert not is_neural(ident) and is_neural(build_model("RAN0", ndim=3))
    ddf, levels = run_network(ident, moving, fixed, precision="bf16", channels_last=True)
    assert ddf.dtype == torch.float32 and not ddf.any() and levels is None
    with pytest.raises(RanregError, match="precision must be one of auto, fp32, bf16"):
        run_network(ident, moving, fixed, precision="fp16")


def _central_half(vol: Volume) -> Volume:
    """The middle half of ``vol`` along each axis, with the affine moved to match."""
    box, lo = crop_offsets(vol.shape, [n // 4 for n in vol.shape])
    affine = vol.affine.copy()
    affine[:3, 3] = vol.affine[:3, :3] @ np.asarray(lo, dtype=float) + vol.affine[:3, 3]
    return replace(vol, array=np.ascontiguousarray(vol.array[box]), affine=affine)


def test_bf16_costs_little_on_the_packaged_pair() -> None:
    """The packaged model on the packaged pair: bf16 moves the field by well under a voxel
    on average and changes the mean Dice by less than 0.01.

    Where bf16 is emulated (no AVX512-BF16 or AMX) the network runs many times slower in
    bf16 (docs/registration.md), so there the check runs on the middle half of the pair
    along each axis (1/8 of it) and without instance optimisation: on the crop, refinement
    amplifies the small bf16 difference at the crop's cut edges into a different local
    optimum, which says nothing about the precision of the network itself."""
    f = demo_files()
    vols = [load_nifti(f["moving_image"]), load_nifti(f["fixed_image"])]
    vols += [load_label_volume(f["moving_labels"]), load_label_volume(f["fixed_labels"])]
    changes: dict[str, int] = {}
    if not fast_bf16(torch.device("cpu")):
        vols, changes = [_central_half(v) for v in vols], {"refine": 0}
    mov, fix, mov_lab, fix_lab = vols
    net = resolve_model(None)
    res = {
        p: register_volumes(net, mov, fix, mov_lab, fix_lab, precision=p, **changes)
        for p in ("fp32", "bf16")
    }
    err = np.linalg.norm(res["bf16"].ddf_mm - res["fp32"].ddf_mm, axis=-1)
    size = np.linalg.norm(res["fp32"].ddf_mm, axis=-1)
    assert size.mean() > 2.0  # mm: a real deformation
    assert err.mean() < 0.05 * size.mean() and np.percentile(err, 99) < 4.0  # 4 mm = 1 voxel
    from ranreg.metrics import dice

    def mean_dice(warped: np.ndarray) -> float:
        return float(np.nanmean(list(dice(warped, fix_lab.array, [1, 2, 3, 6, 8]).values())))

    assert not np.isnan(mean_dice(res["fp32"].warped_label))  # organs inside the crop
    assert abs(mean_dice(res["bf16"].warped_label) - mean_dice(res["fp32"].warped_label)) < 0.01


def test_precision_suffix_in_evaluate() -> None:
    assert split_precision("ran3-abdomen-cpu@bf16", "fp32") == ("ran3-abdomen-cpu", "bf16")
    assert split_precision("a@b/model.safetensors", "bf16") == ("a@b/model.safetensors", "bf16")
    assert split_precision(None, "fp32") == (None, "fp32")
    assert split_label("fast=ran3-abdomen-cpu@bf16") == ("fast", "ran3-abdomen-cpu@bf16")
    assert split_label("runs/a=b/model") == (None, "runs/a=b/model")
    named = model_runs(
        [
            "ran3-abdomen-cpu",
            "ran3-abdomen-cpu@bf16",
            "fast=ran3-abdomen-cpu@bf16",
            "identity@bf16",
        ],
        RegistrationOptions(precision="fp32"),
    )
    assert [(n, opts.precision) for n, _, opts in named] == [
        ("ran3-abdomen-cpu", "fp32"),
        ("ran3-abdomen-cpu@bf16", "bf16"),
        ("fast@bf16", "bf16"),
        ("identity", "bf16"),
    ]


def test_cli_records_precision_and_refuses_unknown(tmp_path: Path, capsys) -> None:
    a = np.diag([4.0, 4.0, 4.0, 1.0])
    for name, seed in (("f", 5), ("m", 6)):
        write_nifti(tmp_path / f"{name}.nii.gz", smooth_image((24, 20, 28), seed) * 500, a)
    pair = ["--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz")]
    out = tmp_path / "reg"
    args = ["register", *pair, "--out", str(out), "--precision", "auto", "--no-channels-last"]
    assert main([*args, "--refine", "2"]) == 0
    # auto is recorded as what ran: bf16 with bf16 units, else fp32 (emulated bf16 is slow)
    expected = "bf16" if fast_bf16(torch.device("cpu")) else "fp32"
    assert json.loads((out / "metrics.json").read_text())["precision"] == expected
    assert main(["demo", "--out", str(tmp_path / "x"), "--precision", "fp16"]) == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_reduced_precision_instance_norm_matches_group_norm_and_its_gradient() -> None:
    """The bf16 training path of InstanceNorm (own backward, float32 statistics) gives the
    values and gradients of ATen's group norm computed in float64."""
    from ranreg.nn.blocks import InstanceNorm

    torch.manual_seed(0)
    x64 = (3 * torch.randn(2, 4, 6, 5, 7, dtype=torch.float64) + 1).requires_grad_()
    grad = torch.randn(2, 4, 6, 5, 7, dtype=torch.float64)
    ref = torch.nn.functional.group_norm(x64, 4, None, None, 1e-5)
    ref.backward(grad)
    xb = x64.detach().to(torch.bfloat16).requires_grad_()
    norm = InstanceNorm(4)
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    out.backward(grad.to(torch.bfloat16))
    torch.testing.assert_close(out.double(), ref.detach(), atol=0.03, rtol=0.02)
    torch.testing.assert_close(xb.grad.double(), x64.grad, atol=0.05, rtol=0.05)
    # without gradients (inference) the module keeps ATen's kernel
    with torch.no_grad():
        torch.testing.assert_close(norm(xb).double(), ref.detach(), atol=0.03, rtol=0.02)
