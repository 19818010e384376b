"""Model files and training checkpoints: safe to load, config kept, atomic."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ranreg import build_model
from ranreg.checkpoint import (
    load_checkpoint,
    load_model,
    read_model_config,
    save_checkpoint,
    save_model,
)
from ranreg.errors import RanregError


def test_model_round_trip_keeps_config_and_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("RAN3", ndim=2, heads=5).eval()
    path = save_model(model, tmp_path / "m", extra={"trained_steps": 7})
    assert read_model_config(path) | {} == {
        "name": "RAN3",
        "ndim": 2,
        "heads": 5,
        "in_channels": 1,
        "format": 1,
        "trained_steps": 7,
    }
    loaded = load_model(tmp_path / "m").eval()  # a directory works as well as the file
    x, y = torch.rand(1, 1, 40, 36), torch.rand(1, 1, 40, 36)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y), model(x, y), rtol=0, atol=0)
    assert (tmp_path / "m" / "model.json").is_file()


def test_untrusted_pickle_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(RanregError, match="not a safetensors model file"):
        load_model(bad)
    torch.save({"w": torch.zeros(1)}, tmp_path / "weights.pt")
    with pytest.raises(RanregError, match="not a safetensors model file"):
        load_model(tmp_path / "weights.pt")
    assert not marker.exists()


def test_foreign_safetensors_and_wrong_weights_are_refused(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(RanregError, match="without a ranreg model config"):
        load_model(tmp_path / "plain.safetensors")
    save_model(build_model("RAN0", ndim=2), tmp_path / "a")
    # a RAN0 file whose config claims RAN4+: weights cannot fit
    import json

    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "a" / "model.safetensors"))
    cfg = {"name": "RAN4+", "ndim": 2, "heads": 6}
    save_file(state, str(tmp_path / "lie.safetensors"), metadata={"ranreg": json.dumps(cfg)})
    with pytest.raises(RanregError, match="weights do not fit RAN4\\+"):
        load_model(tmp_path / "lie.safetensors")
    with pytest.raises(RanregError, match="not found"):
        load_model(tmp_path / "missing.safetensors")


def test_training_checkpoint_restores_weights_optimizer_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model("RAN0", ndim=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, {"global_step": 2, "optimizer": opt.state_dict()})
    # overwrite in place: the old directory is replaced atomically
    save_checkpoint(tmp_path / "ck", model, {"global_step": 3, "optimizer": opt.state_dict()})
    expected_draw = torch.rand(3)  # what the RNG gives right after the checkpoint
    torch.rand(10)  # move the RNG on
    other = build_model("RAN0", ndim=2)
    state = load_checkpoint(tmp_path / "ck", other)
    assert state["global_step"] == 3
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    opt2 = torch.optim.Adam(other.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    torch.testing.assert_close(torch.rand(3), expected_draw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary leftovers


def test_training_state_file_keeps_nested_tensors_int_keys_and_numbers(tmp_path: Path) -> None:
    """The optimizer state travels in safetensors (no pickle): structure, integer keys,
    infinities and tensors come back as they were."""
    from ranreg.checkpoint import load_state, save_state

    state = {
        "global_step": 7,
        "best_val": -float("inf"),
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(4.0)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}],
        },
    }
    save_state(state, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors")
    assert back["global_step"] == 7 and back["best_val"] == -float("inf")
    inner = back["optimizer"]["state"][0]
    torch.testing.assert_close(inner["exp_avg"], torch.arange(4.0))
    assert float(inner["step"]) == 3.0
    assert back["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2, 3],
        {"global_step": "7"},
        {"global_step": -1},
        {"global_step": 3, "stage_index": 1.5},
        {"global_step": 3, "optimizer": {"state": {}}},
        {"global_step": 3, "best_val": "high"},
    ],
)
def test_resume_state_with_the_wrong_structure_is_one_error(tmp_path: Path, bad: object) -> None:
    """A crafted train state (right file format, wrong structure) is refused with one
    RanregError naming the checkpoint, before training reads it."""
    from ranreg.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint

    model = build_model("RAN0", ndim=2)
    ckpt = save_checkpoint(tmp_path / "checkpoint", model, {"global_step": 1})
    save_file({}, str(ckpt / STATE_FILE), metadata={"layout": json.dumps(bad)})
    with pytest.raises(RanregError, match="incomplete or unsafe training checkpoint"):
        load_checkpoint(ckpt, model)
