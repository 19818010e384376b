"""Fault injection (issue 13): crash points inside every filesystem step of checkpoint
and kept-state writing, and crafted files that ask for absurd sizes.

A *kill* at step k: the k-th filesystem operation of the write never happens and nothing
after it runs (no cleanup), as when the process is killed there. An *error* at step k:
the operation raises OSError (disk full, read-only) and the writer's own cleanup runs.
Either way the run must resume from its last complete checkpoint and reach the weights of
an uninterrupted run, and the CLI must end with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import ranreg.checkpoint as checkpoint
from ranreg.cli import main
from ranreg.config import parse_config
from ranreg.errors import RanregError
from ranreg.train import train
from tests.helpers import shapes_config

#: the filesystem operations a checkpoint or kept-state write is made of
OPERATIONS = [
    (checkpoint.os, "replace"),
    (checkpoint.shutil, "rmtree"),
    (checkpoint.shutil, "copytree"),
    (checkpoint.shutil, "copy2"),
    (checkpoint.tempfile, "mkdtemp"),
    (checkpoint, "save_file"),
    (checkpoint, "_write_text"),
    (Path, "write_text"),
]


class Killed(BaseException):
    """The process died here (a BaseException: no ``except Exception`` catches it)."""


class Injector:
    """Counts the operations while armed; fails the ``at``-th one (``kind`` kill/error).
    After a kill every later operation is skipped, as nothing runs in a dead process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int = 0, kind: str = "kill"):
        self.at, self.kind, self.count, self.armed, self.dead = at, kind, 0, False, False
        for owner, name in OPERATIONS:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, original):
        def op(*args, **kwargs):
            if self.dead:
                raise Killed
            if self.armed:
                self.count += 1
                if self.count == self.at:
                    if self.kind == "kill":
                        self.dead = True
                        raise Killed
                    raise OSError(28, "No space left on device (injected)")
            return original(*args, **kwargs)

        return op

    def arm_after(self, step: int):
        def on_step(s: int) -> None:
            self.armed = s >= step

        return on_step


def _config(steps: int = 4) -> dict:
    # the writer does not depend on the network: the small U-Net makes a run 4x cheaper
    raw = shapes_config(steps=(steps, 1), name="VoxelMorph", size=(32, 32))
    raw["stages"] = raw["stages"][:1]
    raw["checkpoint_every"] = 2
    return raw


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "checkpoint" / "model.safetensors"))


def _count_operations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: bool) -> int:
    """How many operations the step-4 checkpoint (and state export) of a run makes."""
    with monkeypatch.context() as m:
        probe = Injector(m)
        cfg = parse_config(_config())
        kept = tmp_path / "probe-state" if state else None
        train(cfg, tmp_path / "probe", progress=False, on_step=probe.arm_after(3), state=kept)
        return probe.count


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight")
    train(parse_config(_config()), out, progress=False)
    return _weights(out)


@pytest.mark.parametrize("kind", ["kill", "error"])
def test_crash_at_every_step_of_checkpoint_writing_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, straight: dict, kind: str
) -> None:
    n = _count_operations(tmp_path, monkeypatch, state=False)
    assert n >= 6  # temporary folder, weights, config, state, rng, two renames, cleanup
    cfg = parse_config(_config())
    for at in range(1, n + 1):
        out = tmp_path / f"{kind}-{at}"
        with monkeypatch.context() as m:
            inject = Injector(m, at, kind)
            # steps 1-2 checkpoint normally; the write after step 4 (armed from step 3) fails
            with pytest.raises((Killed, OSError)):
                train(cfg, out, progress=False, on_step=inject.arm_after(3))
        resumed = train(cfg, out, resume=True, progress=False)
        assert resumed["finished"], (kind, at)
        for key, value in straight.items():
            torch.testing.assert_close(_weights(out)[key], value, rtol=1e-5, atol=1e-6)
        assert not [p.name for p in out.glob(".*")], (kind, at)  # nothing stale left


def test_crash_at_every_step_of_the_kept_state_keeps_the_previous_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, straight: dict
) -> None:
    n = _count_operations(tmp_path, monkeypatch, state=True)
    cfg = parse_config(_config())
    for at in range(1, n + 1):
        state = tmp_path / f"state-{at}" / "run"
        train(cfg, tmp_path / f"first-{at}", max_steps=2, progress=False, state=state)
        with monkeypatch.context() as m:
            inject = Injector(m, at, "kill")
            try:  # a fresh machine runs the next chunk and dies somewhere while writing
                train(
                    cfg,
                    tmp_path / f"m2-{at}",
                    progress=False,
                    state=state,
                    on_step=inject.arm_after(3),
                )
            except Killed:
                pass
        # a third machine finds a complete state (step 2 or step 4) and finishes the run
        done = train(cfg, tmp_path / f"m3-{at}", progress=False, state=state)
        assert done["global_step"] == 4, at
        final = load_file(str(tmp_path / f"m3-{at}" / "checkpoint" / "model.safetensors"))
        for key, value in straight.items():
            torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6)
        assert not list(state.parent.glob(".*")), at


def test_cli_reports_a_full_disk_during_checkpointing_as_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_config()))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_state", full)
    code = main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and "No space left" in err[-1]
    assert "Traceback" not in "\n".join(err)


# ----------------------------------------------------------------------------- sizes
def test_model_file_asking_for_ten_million_heads_is_refused_before_allocating(
    tmp_path: Path,
) -> None:
    from safetensors.torch import save_file

    file = tmp_path / "model.safetensors"
    config = '{"name": "RAN3", "ndim": 3, "heads": 10000000}'
    save_file({"w": torch.zeros(1)}, str(file), metadata={"ranreg": config})
    with pytest.raises(RanregError, match="heads must be an integer from 1 to 64"):
        checkpoint.load_model(file)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"name": "RAN3", "ndim": 3, "heads": 100000}}, "heads: must be at most 64"),
        ({"data": {"labels": "x", "factor": 40}}, "factor: must be at most 4"),
        (
            {"stages": [{"kind": "synthetic", "steps": 1, "lr": 1e-4, "batch_size": 10**6}]},
            "batch_size: must be at most 256",
        ),
        (
            {
                "model": {"name": "RAN0", "ndim": 2},
                "data": {"shapes": {"size": [100000, 100000], "count": 8}},
            },
            "exceed 2e\\+08 voxels",
        ),
    ],
)
def test_training_configs_with_absurd_sizes_are_refused(change: dict, message: str) -> None:
    raw = {
        "model": {"name": "RAN3", "ndim": 3},
        "data": {"labels": "x"},
        "stages": [{"kind": "synthetic", "steps": 1, "lr": 1e-4}],
    }
    raw.update(change)
    with pytest.raises(RanregError, match=message):
        parse_config(raw)


def test_painting_a_label_value_of_four_billion_is_refused(tmp_path: Path, capsys) -> None:
    import nibabel as nib

    labels = tmp_path / "labels"
    labels.mkdir()
    data = np.zeros((8, 8, 8), dtype=np.uint32)
    data[2:4, 2:4, 2:4] = 4_000_000_000
    nib.save(nib.Nifti1Image(data, np.eye(4)), labels / "big.nii.gz")
    code = main(["data", "synth", "--labels", str(labels), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "label value 4000000000" in err[-1] and err[-1].startswith("error:")
    assert not (tmp_path / "out").exists()
