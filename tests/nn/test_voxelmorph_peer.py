"""The ``voxelmorph`` package's network as a ranreg model ("VoxelMorph-pkg").

Needs the optional extra ``peers`` (``pip install 'ranreg[peers]'``); skipped without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import default_collate

vxm = pytest.importorskip("voxelmorph")

from ranreg.checkpoint import load_model, save_model  # noqa: E402
from ranreg.config import parse_config  # noqa: E402
from ranreg.nn import build_model  # noqa: E402
from ranreg.nn.voxelmorph_peer import VxmPackageNet  # noqa: E402
from ranreg.objectives import stage_loss  # noqa: E402
from ranreg.spatial import warp  # noqa: E402
from ranreg.train import train  # noqa: E402
from ranreg.train_data import StepSamples, load_subjects  # noqa: E402

NAME = "VoxelMorph-pkg"
SHAPES = {2: (37, 45), 3: (17, 19, 21)}
STEPS = 30  # training steps of the trainer smoke test


def smooth_field(batch: int, shape: tuple[int, ...], amplitude: float) -> torch.Tensor:
    """A random smooth displacement field (B, d, *S) in voxels, float64."""
    d = len(shape)
    coarse = torch.randn(batch, d, *[4] * d, dtype=torch.float64) * amplitude
    mode = "bilinear" if d == 2 else "trilinear"
    return F.interpolate(coarse, size=shape, mode=mode, align_corners=True)


@pytest.mark.parametrize("ndim", [2, 3])
def test_output_shape_on_odd_sizes(ndim: int) -> None:
    torch.manual_seed(0)
    model = build_model(NAME, ndim=ndim, heads=4)  # heads is ignored, as by the trainer
    assert isinstance(model, VxmPackageNet) and model.config["name"] == NAME
    assert isinstance(model.net, vxm.nn.models.VxmPairwise)
    assert model.net.integration_steps == 0  # direct DDF regression, no integration
    shape = SHAPES[ndim]
    with torch.no_grad():
        ddf = model(torch.rand(2, 1, *shape), torch.rand(2, 1, *shape))
    assert ddf.shape == (2, ndim, *shape)
    assert torch.isfinite(ddf).all() and ddf.abs().max() > 0


def test_rejects_mismatched_inputs() -> None:
    model = build_model(NAME, ndim=2)
    with pytest.raises(ValueError, match="differ in shape"):
        model(torch.rand(1, 1, 20, 20), torch.rand(1, 1, 20, 21))
    with pytest.raises(ValueError, match="2D model"):
        model(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))


@pytest.mark.parametrize("shape", [(21, 27), (9, 11, 13)])
def test_ranreg_warp_equals_voxelmorph_transformer(shape: tuple[int, ...]) -> None:
    """Pins the convention: VoxelMorph's flow channel i moves along array axis i, in voxels,
    so ranreg's warp of the returned DDF is VoxelMorph's own warp of its flow."""
    torch.manual_seed(1)
    image = torch.rand(2, 1, *shape, dtype=torch.float64)
    ddf = smooth_field(2, shape, amplitude=3.0)
    theirs = vxm.nn.modules.SpatialTransformer()(image, ddf)
    ours = warp(image, ddf, padding_mode="zeros")  # VoxelMorph pads with zeros
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    # a unit shift along channel 0 samples the next voxel along axis 0
    shift = torch.zeros(1, len(shape), *shape, dtype=torch.float64)
    shift[:, 0] = 1.0
    moved = vxm.nn.modules.SpatialTransformer()(image[:1], shift)
    torch.testing.assert_close(moved[0, 0, :-1], image[0, 0, 1:])


def test_model_output_warps_like_voxelmorph() -> None:
    """The model returns VoxelMorph's own field unchanged: its warped source equals ours."""
    torch.manual_seed(2)
    model = build_model(NAME, ndim=2)
    with torch.no_grad():  # make the near-zero initial field visible
        model.net.flow_layer.conv0.weight.normal_(std=1.0)
        model.net.flow_layer.conv0.bias.fill_(1.5)
    moving, fixed = torch.rand(1, 1, 32, 64), torch.rand(1, 1, 32, 64)  # no padding needed
    with torch.no_grad():
        flow, warped = model.net(moving, fixed, return_warped_source=True)
        ddf = model(moving, fixed)
    torch.testing.assert_close(ddf, flow)
    assert ddf.abs().max() > 1.0
    torch.testing.assert_close(warp(moving, ddf, padding_mode="zeros"), warped)


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = build_model(NAME, ndim=2)
    ddf = model(torch.rand(2, 1, 33, 40), torch.rand(2, 1, 33, 40))
    (ddf**2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("ndim", [2, 3])
def test_save_load_round_trip(tmp_path: Path, ndim: int) -> None:
    torch.manual_seed(0)
    model = build_model(NAME, ndim=ndim)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights that differ from a fresh build
    shape = SHAPES[ndim]
    pair = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert isinstance(loaded, VxmPackageNet)
    assert loaded.config["name"] == NAME and loaded.config["ndim"] == ndim
    with torch.no_grad():
        assert torch.equal(loaded(*pair), model(*pair))


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from ranreg.errors import RanregError

    monkeypatch.setitem(__import__("sys").modules, "voxelmorph", None)  # import fails
    with pytest.raises(RanregError, match=r"ranreg\[peers\]"):
        build_model(NAME, ndim=2)


def mean_stage_loss(cfg, model: torch.nn.Module, subjects, batches: int) -> float:
    """The first stage's loss on its first ``batches`` (seeded, so fixed) training batches."""
    samples = StepSamples(cfg, 0, subjects, rank=0)
    classes = torch.arange(4)  # shapes data: labels 0..3, organs 1..3
    b = cfg.stages[0].batch_size
    total = 0.0
    model.eval()
    with torch.no_grad():
        for step in range(batches):
            batch = default_collate([samples[step * b + k] for k in range(b)])
            total += float(stage_loss(cfg.stages[0], model, batch, classes)[0])
    return total / batches


def test_trainer_runs_and_lowers_loss(tmp_path: Path) -> None:
    raw = {
        "seed": 0,
        "model": {"name": NAME, "ndim": 2, "heads": 4},
        "data": {"shapes": {"size": [32, 32], "count": 6}, "val": 2, "organs": None},
        "stages": [
            {
                "kind": "unsupervised",
                "steps": STEPS,
                "lr": 3e-3,
                "batch_size": 2,
                "ncc_window": 5,
                "weights": {"similarity": 1.0, "smooth": 0.1, "dice": 1.0},
            }
        ],
        "checkpoint_every": 100,
        "val_every": 1000,
        "val_pairs": 2,
    }
    cfg = parse_config(raw)
    summary = train(cfg, tmp_path, progress=False)
    assert summary["finished"] and summary["global_step"] == STEPS
    log = np.genfromtxt(
        tmp_path / "train_log.csv", delimiter=",", names=True, dtype=None, encoding=None
    )
    assert np.isfinite(np.asarray(log["loss"], dtype=float)).all()
    trained = load_model(tmp_path / "model")
    assert isinstance(trained, VxmPackageNet) and trained.config["trained_steps"] == STEPS
    # the trainer builds its model right after torch.manual_seed(seed): the same start
    torch.manual_seed(cfg.seed)
    initial = build_model(NAME, ndim=2)
    subjects, _ = load_subjects(cfg, tmp_path)
    before = mean_stage_loss(cfg, initial, subjects, batches=8)
    after = mean_stage_loss(cfg, trained, subjects, batches=8)
    assert after < before - 0.02, (before, after)
