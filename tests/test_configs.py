"""The shipped training configs: each one parses, and the 4 mm run keeps the 8 mm recipe in mm."""

from __future__ import annotations

from pathlib import Path

import pytest

from ranreg.config import TrainConfig, load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))

# field sizes given in voxels, which must scale with 1 / voxel size to stay the same in mm
_VOXEL_KEYS = ("max_translation", "tps_scale", "bump_scale", "bump_sigma")


def _shipped(name: str) -> TrainConfig:
    """The shipped config ``configs/<name>``."""
    return load_config(CONFIG_DIR / name)


def _window(cfg: TrainConfig, full: tuple[int, ...] = (192, 160, 256)) -> list[float]:
    """The training window of the shared label maps (``full`` voxels at 2 mm)."""
    return [s * cfg.data.factor - 2 * m for s, m in zip(full, cfg.data.crop, strict=True)]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.stages and all(s.steps > 0 for s in cfg.stages)


def test_4mm_run_is_the_8mm_recipe_in_mm_on_windows_of_the_8mm_size() -> None:
    coarse = _shipped("ran3-synth.yaml")
    fine = _shipped("ran3-synth-4mm.yaml")
    scale = coarse.data.factor / fine.data.factor  # voxel size ratio fine / coarse
    assert scale == 0.5
    c, f = coarse.stages[0], fine.stages[0]
    for key in _VOXEL_KEYS:
        assert f.deformation[key] * scale == c.deformation[key]
    slide_c, slide_f = c.pairs["sliding_deformation"], f.pairs["sliding_deformation"]
    assert slide_f["max_translation"] * scale == slide_c["max_translation"]
    assert f.deformation["max_angle"] == c.deformation["max_angle"]  # angles have no unit
    # the label maps are 192x160x256 at 2 mm: 48x40x64 at 8 mm, of which the 8 mm run
    # trains on 48x32x64 windows; the 4 mm volumes are twice as large, the windows the same
    assert _window(fine) == _window(coarse) == [48, 32, 64]
    assert fine.model == coarse.model and fine.init == "ran3.abdomen-synth"


def test_real_ct_run_is_the_8mm_known_field_stage_plus_a_scan_share() -> None:
    base = _shipped("ran3-synth.yaml")
    real = _shipped("ran3-realct.yaml")
    b, r = base.stages[0], real.stages[0]
    assert {k: v for k, v in r.pairs.items() if k != "scans"} == b.pairs
    assert r.pairs["scans"] == 0.5 and r.deformation == b.deformation and r.weights == b.weights
    assert real.data.train_scans and not set(real.data.train_scans) & set(real.data.val_scans)
    assert real.init == "ran3.abdomen-synth"


def test_small_field_run_is_the_real_ct_run_with_scaled_fields() -> None:
    real = _shipped("ran3-realct.yaml")
    small = _shipped("ran3-small-fields.yaml")
    r, s = real.stages[0], small.stages[0]
    assert {k: v for k, v in s.pairs.items() if k != "field_scale"} == r.pairs
    assert s.pairs["field_scale"] == [0.1, 1.0] and s.deformation == r.deformation
    assert small.data == real.data and small.init == real.init and small.model == real.model
