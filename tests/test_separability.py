"""Theorem-1 bound, the sliding-boundary probe and ``ranreg separability``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ranreg.cli import main
from ranreg.nn import build_model
from ranreg.nn.variants import VARIANTS
from ranreg.separability import (
    boundary_jumps,
    empirical_separability,
    separating_levels,
    sliding_pair,
    theoretical_separability,
)
from ranreg.separability_report import plot_separability
from ranreg.spatial import warp

DISTANCES = [1, 2, 3, 4, 8, 16, 32, 64]


# ---------------------------------------------------------------- Theorem 1


def test_bound_values_of_the_paper_ranges():
    ran0 = theoretical_separability("RAN0", [1, 2, 4, 8, 16, 100])
    # RAN0: a_k = 40, 20, 10, 5, 2.5 at p_k = 16, 8, 4, 2, 1
    assert ran0.tolist() == [5.0, 15.0, 35.0, 75.0, 155.0, 155.0]
    assert ran0[0] == 2 * 2.5
    assert ran0[4] == 2 * (40 + 20 + 10 + 5 + 2.5)
    ran4 = theoretical_separability("RAN4", [1, 16])
    assert ran4.tolist() == [2 * (32.5 + 16.5 + 8.5 + 4.5 + 2.5)] * 2 == [129.0, 129.0]
    # RAN3: only level 4 has p_k = 1, the others p_k = 2
    assert theoretical_separability("RAN3", [1, 2]).tolist() == [5.0, 133.0]
    assert theoretical_separability("RAN0", [0]).tolist() == [0.0]
    assert separating_levels("RAN0", 1) == (4,)
    assert separating_levels("RAN0", 5) == (2, 3, 4)
    assert separating_levels("RAN4", 1) == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("name", [*VARIANTS, "RAN0-noRA", "ran4+-nora"])
@pytest.mark.parametrize("mode", ["all", "best"])
def test_bound_monotone_and_bounded(name, mode):
    bound = theoretical_separability(name, [0, *DISTANCES], mode=mode)
    assert bound.shape == (len(DISTANCES) + 1,)
    assert np.all(np.diff(bound) >= 0)
    total = theoretical_separability(name, [1], mode="best")[0]
    assert bound[-1] == total  # every level separates far-apart points
    assert np.all(bound <= total)


def test_no_ra_ablation_shares_the_bound_and_more_ms_layers_help_at_small_p():
    small = [1, 2, 4, 8]
    ran0, ran4 = (theoretical_separability(n, small) for n in ("RAN0", "RAN4"))
    assert np.all(ran4 >= ran0) and ran4[0] > ran0[0]
    np.testing.assert_array_equal(
        theoretical_separability("RAN4+-noRA", DISTANCES),
        theoretical_separability("RAN4+", DISTANCES),
    )
    # a built model resolves to its variant
    model = build_model("RAN3-noRA", ndim=2)
    np.testing.assert_array_equal(
        theoretical_separability(model, DISTANCES), theoretical_separability("RAN3", DISTANCES)
    )


def test_best_mode_counts_every_level_from_one_voxel():
    best = theoretical_separability("RAN0", [0, 1, 16], mode="best")
    assert best.tolist() == [0.0, 155.0, 155.0]


@pytest.mark.parametrize(
    "args, match",
    [
        (("VoxelMorph", [1]), "no level structure"),
        (("RAN9", [1]), "unknown model"),
        (("RAN0", [-1]), ">= 0"),
        (("RAN0", [1], "some"), "mode"),
    ],
)
def test_bound_errors(args, match):
    with pytest.raises(ValueError, match=match):
        theoretical_separability(*args)


# ---------------------------------------------------------------- the probe


def test_sliding_pair_is_exactly_registered_by_its_true_ddf():
    moving, fixed, ddf = sliding_pair((24, 20), 3, axis=0, ndim=2, rng=1)
    assert moving.shape == fixed.shape == (1, 1, 24, 20) and ddf.shape == (1, 2, 24, 20)
    assert ddf[0, 0].abs().max() == 0  # motion along axis 1, parallel to the boundary
    assert torch.all(ddf[0, 1, :12] == -3) and torch.all(ddf[0, 1, 12:] == 3)
    warped = warp(moving, ddf)
    inner = (slice(None), slice(None), slice(None), slice(3, -3))  # sampled inside the grid
    torch.testing.assert_close(warped[inner], fixed[inner], atol=1e-5, rtol=0)
    assert (moving - fixed).abs().max() > 0.05
    m3, f3, d3 = sliding_pair((8, 10, 12), 1.5, axis=2, ndim=3)
    assert d3.shape == (1, 3, 8, 10, 12) and torch.all(d3[0, 0, ..., 6:] == 1.5)
    with pytest.raises(ValueError, match="ndim"):
        sliding_pair((8, 8), 1, 0, 3)
    with pytest.raises(ValueError, match="differ"):
        sliding_pair((8, 8), 1, 0, 2, slide_axis=0)


class StepModel(nn.Module):
    """A fake network: DDF = ``jump`` on the upper half along ``axis``, 0 below."""

    def __init__(self, ndim: int, jump: float, axis: int = 0) -> None:
        super().__init__()
        self.ndim, self.jump, self.axis = ndim, jump, axis
        self.calls = 0

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        b, shape = fixed.shape[0], fixed.shape[2:]
        upper = torch.arange(shape[self.axis]) >= shape[self.axis] // 2
        view = [1] * len(shape)
        view[self.axis] = shape[self.axis]
        ddf = torch.zeros(b, self.ndim, *shape)
        ddf[:, -1] = self.jump * upper.reshape(view).float()
        return ddf


class ConstantModel(StepModel):
    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return torch.full((fixed.shape[0], self.ndim, *fixed.shape[2:]), 3.25)


def test_empirical_recovers_a_known_jump():
    distances = [0, 1, 2, 5, 8, 15, 16]
    step = StepModel(2, jump=7.5)
    got = empirical_separability(step, 2, (16, 12), distances, n_pairs=2, shifts=(1.0, 2.0))
    assert got.tolist() == [0.0] + [7.5] * 5 + [pytest.approx(np.nan, nan_ok=True)]
    assert np.isnan(got[-1])  # no pair 16 apart on a 16-voxel axis
    assert step.calls == 1  # four probes in one batch
    const = empirical_separability(ConstantModel(2, 0.0), 2, (16, 12), distances[:-1])
    assert const.tolist() == [0.0] * 6
    step3 = StepModel(3, jump=-2.0, axis=1)
    got3 = empirical_separability(step3, 3, (6, 10, 4), [1, 3, 5], n_pairs=1, axis=1)
    assert got3.tolist() == [2.0, 2.0, 2.0]


def test_boundary_jumps_only_counts_straddling_pairs():
    ddf = torch.zeros(1, 2, 10, 3)
    ddf[0, 0, :, 1] = torch.arange(10.0)  # a smooth ramp away from the boundary too
    ddf[0, 1, 5:] = 4.0
    got = boundary_jumps(ddf, 0, [1, 3, 5, 9, 10])
    assert got[:3].tolist() == [4.0, 4.0, 5.0]  # ramp: |x - (x + p)| = p
    assert got[3] == 9.0 and np.isnan(got[4])


def test_empirical_on_an_untrained_ran0():
    torch.manual_seed(0)
    model = build_model("RAN0", ndim=2).train()
    distances = [1, 2, 4, 8]
    got = empirical_separability(model, 2, (32, 32), distances, n_pairs=1, shifts=(2.0,))
    assert got.shape == (4,) and np.all(np.isfinite(got)) and np.all(got >= 0)
    assert model.training  # mode restored


def test_empirical_errors():
    step = StepModel(2, 1.0)
    with pytest.raises(ValueError, match="integers"):
        empirical_separability(step, 2, (8, 8), [1.5])
    with pytest.raises(ValueError, match="ndim"):
        empirical_separability(step, 2, (8, 8, 8), [1])
    with pytest.raises(ValueError, match="DDF of shape"):
        empirical_separability(StepModel(3, 1.0), 2, (8, 8), [1])


def test_plot_is_written(tmp_path):
    path = plot_separability(
        {
            "RAN0": ([1, 2, 4], [0.1, 0.2, np.nan], [5.0, 15.0, 35.0]),
            "VoxelMorph": ([1, 2, 4], [0.0, 0.3, 0.3], None),
        },
        tmp_path / "sub" / "sep.png",
        reference=8.0,
    )
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in path.parent.iterdir()] == ["sep.png"]


# ---------------------------------------------------------------- command line


def test_cli_bound_only_json(capsys):
    rc = main(
        ["separability", "--bound-only", "--json", "--models", "RAN0", "RAN4", "VoxelMorph"]
        + ["--distances", "1", "16"]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in out["models"]}
    assert rows["RAN0"]["bound"] == [5.0, 155.0] and rows["RAN4"]["bound"] == [129.0, 129.0]
    assert rows["VoxelMorph"]["bound"] is None
    assert all(r["empirical"] is None for r in out["models"])


def test_cli_measures_and_writes_files(tmp_path, capsys):
    out_dir = tmp_path / "sep"
    args = ["separability", "--models", "RAN0", "--shape", "32", "32", "--pairs", "1"]
    args += ["--shifts", "2", "--distances", "1", "4", "32", "--out", str(out_dir)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "RAN0 bound" in text and "RAN0 empirical*" in text and "depends on training" in text
    data = json.loads((out_dir / "separability.json").read_text())
    (row,) = data["models"]
    assert row["bound"] == [5.0, 35.0, 155.0]
    assert row["empirical"][2] is None  # no pair 32 apart on a 32-voxel axis
    assert all(v >= 0 for v in row["empirical"][:2])
    assert sorted(p.name for p in out_dir.iterdir()) == ["separability.json", "separability.png"]


@pytest.mark.parametrize(
    "argv",
    [
        ["separability", "--models", "RAN7"],
        ["separability", "--ndim", "2", "--shape", "32"],
        ["separability", "--distances", "0"],
        ["separability", "--checkpoint", "nonsense"],
        ["separability", "--checkpoint", "x=/nonexistent/model.safetensors", "--bound-only"],
        ["separability", "--mode", "worst"],
    ],
)
def test_cli_bad_args(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_cli_checkpoint_replaces_the_untrained_entry(tmp_path, capsys):
    from ranreg.checkpoint import save_model

    torch.manual_seed(3)
    save_model(build_model("RAN3", ndim=2), tmp_path / "ckpt")
    args = ["separability", "--models", "RAN0", "--checkpoint", f"mine={tmp_path / 'ckpt'}"]
    args += ["--shape", "32", "32", "--pairs", "1", "--shifts", "1", "--distances", "1", "2"]
    assert main([*args, "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["mine"]["architecture"] == "RAN3" and rows["mine"]["source"] == "checkpoint"
    assert rows["mine"]["bound"] == [5.0, 133.0] and len(rows["mine"]["empirical"]) == 2
    assert main([*args, "--ndim", "3", "--shape", "32", "32", "32"]) == 2
    assert "a 2D model, --ndim is 3" in capsys.readouterr().err
