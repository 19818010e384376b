"""Training: configs, a loss that goes down, exact resume, data-parallel replicas, smoke."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ranreg.checkpoint import load_model
from ranreg.cli import main
from ranreg.config import parse_config
from ranreg.errors import RanregError
from ranreg.train import train
from ranreg.train_data import load_subjects
from ranreg.validation import validate, validation_pairs
from tests.helpers import shapes_config

REPO = Path(__file__).resolve().parents[1]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / "model.safetensors"))


def test_tiny_2d_run_lowers_loss_and_registers_training_pairs(tmp_path: Path) -> None:
    raw = shapes_config(steps=(1, 80), size=(48, 48), val_every=1000)
    raw["stages"][1].update(weights={"similarity": 1.0, "smooth": 0.1, "dice": 1.0})
    cfg = parse_config(raw)
    summary = train(cfg, tmp_path, progress=False)
    assert summary["finished"] and summary["global_step"] == 81
    log = np.genfromtxt(
        tmp_path / "train_log.csv", delimiter=",", names=True, dtype=None, encoding=None
    )
    stage2 = log["loss"][log["stage"] == "unsupervised"]
    assert stage2[-15:].mean() < stage2[:15].mean() - 0.05
    # the trained model aligns the organs of training pairs better than no registration
    model = load_model(tmp_path / "model")
    assert model.config["name"] == "RAN0" and model.config["trained_steps"] == 81
    assert model.config["organs"] == [1, 2, 3] and model.config["window"] is None
    subjects, _ = load_subjects(cfg, tmp_path)
    pairs = validation_pairs(subjects, 8)
    before = validate(model, subjects, pairs, None, torch.device("cpu"), identity=True)
    after = validate(model, subjects, pairs, None, torch.device("cpu"))
    assert after > before + 0.03, (before, after)


def test_resume_after_crash_matches_uninterrupted_run(tmp_path: Path) -> None:
    cfg = parse_config(shapes_config())
    straight = train(cfg, tmp_path / "a", progress=False)
    assert straight["finished"]

    class Crash(Exception):
        pass

    def crash_at_5(step: int) -> None:
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, tmp_path / "b", progress=False, on_step=crash_at_5)
    # the last checkpoint is step 4 (checkpoint_every 2); resuming replays step 5 and 6
    assert (
        json.loads((tmp_path / "b" / "checkpoint" / "model.json").read_text())["trained_steps"] == 4
    )
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed["finished"] and resumed["global_step"] == 6
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    # every loss term also goes to TensorBoard
    events = list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    # chunks: 2 steps, then 3, then the rest
    assert not train(cfg, tmp_path / "c", max_steps=2, progress=False)["finished"]
    assert not train(cfg, tmp_path / "c", resume=True, max_steps=3, progress=False)["finished"]
    assert train(cfg, tmp_path / "c", resume=True, progress=False)["finished"]
    wc = weights(tmp_path / "c")
    for key in wa:
        torch.testing.assert_close(wa[key], wc[key], rtol=1e-5, atol=1e-6)
    # and the logs hold each step once
    steps = np.genfromtxt(
        tmp_path / "c" / "train_log.csv", delimiter=",", names=True, dtype=None, encoding=None
    )["step"]
    assert list(steps) == [1, 2, 3, 4, 5, 6]


def test_weights_change_when_training(tmp_path: Path) -> None:
    cfg = parse_config(shapes_config(steps=(1, 1)))
    train(cfg, tmp_path / "a", max_steps=1, progress=False)
    torch.manual_seed(0)
    from ranreg import build_model

    init = build_model("RAN0", ndim=2, heads=4).state_dict()
    after = weights(tmp_path / "a")
    assert any(not torch.equal(init[k], after[k]) for k in init)


def test_torchrun_two_cpu_replicas_stay_identical(tmp_path: Path) -> None:
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(shapes_config(steps=(1, 1), size=(32, 32))))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "ranreg.cli",
        "train",
        "--config",
        str(config),
        "--out",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("finished at step") == 1  # the main replica reports, once
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    a, b = summary["replica_checksums"]
    assert a == b and a != 0.0


def test_smoke_config_runs_both_stages(tmp_path: Path, shared_dir: Path) -> None:
    out = tmp_path / "smoke"
    config = str(REPO / "configs" / "smoke.yaml")
    argv = ["train", "--config", config, "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    log = (out / "train_log.csv").read_text()
    assert "synthetic" in log and "unsupervised" in log
    model = load_model(out / "model")
    assert model.config["name"] == "RAN4+" and model.config["ndim"] == 3
    # 2 mm label maps resampled by 1/8 -> 16 mm voxels, recorded for `ranreg register`
    assert model.config["spacing"] == [16.0, 16.0, 16.0]
    assert model.config["window"] == [-100.0, 300.0]
    labels = sorted((out / "synth-data" / "labels").glob("*.nii.gz"))
    assert len(labels) == 5
    # a second run into the same folder refuses instead of overwriting
    assert main(argv) == 2


def _write_cfg(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize(
    ("where", "key", "value", "message"),
    [
        ("model", "heads", 2.5, "model.heads: must be a positive integer, got 2.5"),
        ("model", "heads", True, "model.heads: must be a positive integer, got True"),
        ("data", "val", -1, "data.val: must be a non-negative integer, got -1"),
        ("stage", "lr", 0, "stages[0].lr: must be a positive number, got 0"),
        ("stage", "lr", float("nan"), "stages[0].lr: must be a positive number, got nan"),
        ("stage", "lr", "fast", "stages[0].lr: must be a positive number, got 'fast'"),
        ("stage", "edge_alpha", -2.0, "edge_alpha: must be a non-negative number, got -2.0"),
        ("stage", "similarity", "", "stages[0].similarity: must be a non-empty string, got ''"),
        ("stage", "swap", 1, "stages[0].swap: must be true or false, got 1"),
        ("data", "organs", 3, "data.organs: must be a list, got 3"),
        ("stage", "deformation", [], "stages[0].deformation: must be a mapping, got []"),
        ("data", "shapes", {"size": [40, 4]}, "size must be 2 integers >= 8, got [40, 4]"),
        ("data", "shapes", {"size": [40, 48], "count": 1}, "count must be an integer from 2"),
        ("stage", "weights", {"smooth": -1}, "weights.smooth: must be a non-negative number"),
        ("stage", "weights", {"smooth": float("nan")}, "weights.smooth: must be a non-negative"),
        ("stage", "weights", {"smooth": True}, "weights.smooth: must be a non-negative number"),
    ],
)
def test_each_kind_of_config_value_is_checked(where, key, value, message: str) -> None:
    raw = shapes_config()
    (raw["stages"][0] if where == "stage" else raw[where])[key] = value
    with pytest.raises(RanregError) as err:
        parse_config(raw)
    assert message in str(err.value)


def test_config_numbers_keep_their_kind() -> None:
    raw = shapes_config()
    raw["stages"][0]["lr"] = 1  # an integer where a float is asked for
    cfg = parse_config(raw)
    assert cfg.stages[0].lr == 1.0 and isinstance(cfg.stages[0].lr, float)
    assert cfg.model.heads == 4 and isinstance(cfg.model.heads, int)
    assert cfg.data.window is not None and cfg.data.organs is None  # None where allowed


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["stages"][0].update(lr=-1), "stages[0].lr: must be a positive number"),
        (lambda c: c["stages"][1].update(kind="fancy"), "stages[1].kind"),
        (lambda c: c.update(bogus=1), "bogus: unknown key"),
        (lambda c: c["model"].update(name="RAN9"), "model.name"),
        (lambda c: c["stages"][0].update(weights={"nope": 1}), "unknown term"),
        (lambda c: c.update(stages=[]), "at least one stage"),
        (lambda c: c["data"].update(root="missing-folder"), "exactly one of"),
    ],
)
def test_bad_config_values_exit_2(tmp_path: Path, capsys, mutate, expected: str) -> None:
    raw = shapes_config()
    mutate(raw)
    path = _write_cfg(tmp_path, raw)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert not (tmp_path / "o" / "checkpoint").exists()


def _nifti(path: Path, array: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))


@pytest.mark.parametrize("problem", ["missing", "no-label", "shape"])
def test_bad_data_folders_exit_2(tmp_path: Path, capsys, problem: str) -> None:
    root = tmp_path / "data"
    if problem != "missing":
        for name in ("a", "b", "c"):
            _nifti(root / "images" / f"{name}.nii.gz", np.zeros((16, 16, 16), np.float32))
            if not (problem == "no-label" and name == "b"):
                shape = (16, 16, 12) if (problem == "shape" and name == "c") else (16, 16, 16)
                _nifti(root / "labels" / f"{name}.nii.gz", np.zeros(shape, np.int16))
    raw = shapes_config()
    raw["model"]["ndim"] = 3
    raw["data"] = {"root": str(root), "factor": None}
    path = _write_cfg(tmp_path, raw)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    hint = {"missing": "data", "no-label": "b.nii.gz", "shape": "c.nii.gz"}[problem]
    assert hint in err[0]


def test_sigterm_ends_a_chunk_after_its_step_with_state_kept(tmp_path: Path) -> None:
    """A scheduler's SIGTERM stops ``ranreg train`` like its time limit: exit 0, a
    checkpoint of the last step, the kept state exported, and the run resumes."""
    import signal
    import time

    raw = shapes_config(steps=(100000, 1), checkpoint_every=1000, val_every=100000)
    path = _write_cfg(tmp_path, raw)
    out, state = tmp_path / "run", tmp_path / "state"
    args = ["train", "--config", str(path), "--out", str(out), "--state", str(state)]
    cmd = [sys.executable, "-m", "ranreg.cli", *args, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "train_log.csv", time.monotonic() + 120
    while time.monotonic() < deadline and (
        not log.is_file() or len(log.read_text().splitlines()) < 4
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    step = json.loads((out / "checkpoint" / "model.json").read_text())["trained_steps"]
    assert 3 <= step < 1000 and f"paused (resume with --resume) at step {step}/" in stdout
    logged = [int(r["step"]) for r in csv.DictReader(log.open())]
    assert logged == list(range(1, step + 1))  # every step up to the checkpoint, once
    (chunk,) = list(csv.DictReader((state / "chunks.csv").open()))
    assert int(chunk["last_step"]) == step
    assert main([*args, "--no-progress", "--max-steps", "1"]) == 0
    resumed = json.loads((state / "checkpoint" / "model.json").read_text())
    assert resumed["trained_steps"] == step + 1


def _replica_signalled_at_step_2(rank: int, world: int, store: str, raw: dict, out: str) -> None:
    """One data-parallel replica (spawned); rank 1 alone receives SIGTERM after step 2.
    The group meets through a file store, not a TCP port: a port found free by the parent
    can be taken by another process before rank 0 binds it."""
    import signal

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)

    def on_step(step: int) -> None:
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    train(parse_config(raw), out, progress=False, on_step=on_step)
    dist.destroy_process_group()


def test_a_signal_to_one_replica_stops_every_replica_after_the_same_step(tmp_path: Path) -> None:
    """Data-parallel replicas agree each step on stopping: SIGTERM to one of two stops both
    after the next step, with identical weights and a checkpoint of that step."""
    import torch.multiprocessing as mp

    store = str(tmp_path / "group-store")
    raw = shapes_config(steps=(40, 1), size=(32, 32), checkpoint_every=1000, val_every=1000)
    out = tmp_path / "run"
    mp.spawn(_replica_signalled_at_step_2, args=(2, store, raw, str(out)), nprocs=2, join=True)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 3 and not summary["finished"]
    a, b = summary["replica_checksums"]
    assert a == b
    assert json.loads((out / "checkpoint" / "model.json").read_text())["trained_steps"] == 3


def test_loader_workers_do_not_change_a_run(tmp_path: Path, capsys) -> None:
    """``--num-workers``: batches depend on the step alone, so workers give the same run."""
    path = _write_cfg(tmp_path, shapes_config(steps=(3, 2)))
    for name, workers in (("w0", "0"), ("w2", "2")):
        out = str(tmp_path / name)
        args = ["train", "--config", str(path), "--out", out, "--no-progress"]
        assert main([*args, "--num-workers", workers]) == 0
    w0, w2 = weights(tmp_path / "w0"), weights(tmp_path / "w2")
    assert w0.keys() == w2.keys()
    for key in w0:
        torch.testing.assert_close(w0[key], w2[key], rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    bad = ["train", "--config", str(path), "--out", str(tmp_path / "bad"), "--num-workers", "-1"]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --num-workers must be 0 or more, got -1"]
    assert not (tmp_path / "bad").exists()


def test_missing_config_file_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    from ranreg.config import load_config

    cfg = load_config(path)
    assert cfg.stages and all(s.steps > 0 and s.lr > 0 for s in cfg.stages)
    assert cfg.model.ndim == 3


def test_init_fine_tunes_from_trained_weights(tmp_path: Path) -> None:
    """`init:` starts from a trained model's weights (fine-tuning); a wrong architecture is
    one clear error; a packaged name stays a name and a path is relative to the config."""
    first = train(parse_config(shapes_config(steps=(2, 2))), tmp_path / "a", progress=False)
    assert first["finished"]
    src = load_model(tmp_path / "a" / "model")
    raw = shapes_config(steps=(1, 1), init=str(tmp_path / "a" / "model"))
    raw["stages"] = [dict(s, lr=1e-7) for s in raw["stages"]]  # barely moves the weights
    train(parse_config(raw), tmp_path / "b", progress=False)
    tuned = load_model(tmp_path / "b" / "model")
    torch.manual_seed(0)
    from ranreg import build_model

    fresh = build_model("RAN0", ndim=2, heads=4).state_dict()
    for k, v in src.state_dict().items():
        assert torch.allclose(tuned.state_dict()[k], v, atol=1e-5), k  # started from src
    assert any(not torch.allclose(fresh[k], v, atol=1e-3) for k, v in src.state_dict().items())
    assert tuned.config["init"] == str(tmp_path / "a" / "model")
    # architecture mismatch: one error line, exit code 2
    bad = shapes_config(steps=(1, 1), name="RAN3", init=str(tmp_path / "a" / "model"))
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(yaml.safe_dump(bad))
    assert main(["train", "--config", str(cfg_path), "--out", str(tmp_path / "c")]) == 2
    # how specs are read
    assert parse_config(shapes_config(init="ran3-abdomen-cpu")).init == "ran3-abdomen-cpu"
    rel = parse_config(shapes_config(init="runs/x/model"), "cfg", tmp_path)
    assert rel.init == str((tmp_path / "runs" / "x" / "model").resolve())


def test_model_best_is_the_best_validated_model_across_chunks(tmp_path: Path) -> None:
    cfg = parse_config(shapes_config(steps=(1, 2), val_every=1))
    train(cfg, tmp_path / "a", progress=False)
    assert not train(cfg, tmp_path / "b", max_steps=2, progress=False)["finished"]
    assert train(cfg, tmp_path / "b", resume=True, progress=False)["finished"]
    for run in ("a", "b"):
        rows = np.genfromtxt(
            tmp_path / run / "val_log.csv", delimiter=",", names=True, dtype=None, encoding=None
        )
        assert list(rows["step"]) == list(range(4))  # the start and every step
        best = load_model(tmp_path / run / "model-best")
        i = int(np.argmax(rows["dice"]))  # the first of equal values is kept
        assert best.config["trained_steps"] == rows["step"][i]
        assert best.config["val_dice"] == pytest.approx(rows["dice"][i], abs=1e-9)
        # the stored weights are the ones that scored it
        subjects = load_subjects(cfg, tmp_path / run)[1]
        pairs = validation_pairs(subjects, cfg.val_pairs)
        again = validate(best, subjects, pairs, cfg.data.organs, torch.device("cpu"))
        assert again == pytest.approx(rows["dice"][i], abs=1e-6)
    wa = load_file(str(tmp_path / "a" / "model-best" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model-best" / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_crash_between_the_checkpoint_renames_resumes_from_the_last_complete_step(
    tmp_path: Path, monkeypatch
) -> None:
    """save_checkpoint moves the old checkpoint aside, then the new one in: a crash between
    the two leaves only the aside copy; --resume puts it back and continues from it."""
    import ranreg.checkpoint as checkpoint

    cfg = parse_config(shapes_config())
    assert not train(cfg, tmp_path / "r", max_steps=2, progress=False)["finished"]
    real_replace = os.replace

    def crash_on_second(src, dst):
        # the new checkpoint about to be moved in, the old one already aside: crash here
        if Path(dst).name == "checkpoint" and Path(src).name.startswith(".checkpoint."):
            if Path(dst).with_name(".checkpoint.old").exists():
                raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="simulated crash"):
        train(cfg, tmp_path / "r", resume=True, max_steps=2, progress=False)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert not (tmp_path / "r" / "checkpoint").exists()
    assert (tmp_path / "r" / ".checkpoint.old").is_dir()
    resumed = train(cfg, tmp_path / "r", resume=True, progress=False)
    assert resumed["finished"] and resumed["global_step"] == 6
    rows = (tmp_path / "r" / "train_log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6  # header + every step once, none lost, none twice


def test_an_earlier_run_is_never_overwritten_by_accident(tmp_path: Path) -> None:
    cfg = parse_config(shapes_config())
    out = tmp_path / "run"
    assert train(cfg, out, progress=False)["finished"]
    with pytest.raises(RanregError, match="--resume, --overwrite"):
        train(cfg, out, progress=False)
    shutil.rmtree(out / "checkpoint")  # a finished run whose checkpoint was removed
    with pytest.raises(RanregError, match="earlier run"):
        train(cfg, out, progress=False)
    with pytest.raises(RanregError, match="no checkpoint to resume"):
        train(cfg, out, resume=True, progress=False)
    assert train(cfg, out, overwrite=True, progress=False)["finished"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RanregError, match="not a directory"):
        train(cfg, tmp_path / "file", progress=False)


def test_select_epe_keeps_the_model_of_the_lowest_real_scan_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``select: epe`` keeps the lowest end-point error (not the highest Dice); a run whose
    selection changes starts its best afresh instead of comparing Dice with millimetres."""
    import ranreg.train as train_module

    errors = iter([9.0, 7.0, 8.0, 5.0, 6.0, 4.0, 4.5])
    dice = iter([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6])

    def fake_measure(self, row):
        return {**row, "dice": next(dice), "epe_mm": next(errors)}

    monkeypatch.setattr(train_module._Run, "measure", fake_measure)
    raw = shapes_config(steps=(2, 2), val_every=1)
    out = tmp_path / "r"
    train(parse_config(raw), out, max_steps=2, progress=False)  # steps 0-2 by Dice
    assert load_model(out / "model-best").config["trained_steps"] == 0
    with pytest.raises(RanregError, match="val_scans"):
        parse_config({**raw, "select": "epe"})
    with pytest.raises(RanregError, match="dice or epe"):
        parse_config({**raw, "select": "loss"})
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")  # never read: measure is replaced
    cfg = parse_config({**raw, "select": "epe", "data": {**raw["data"], "val_scans": [str(scan)]}})
    monkeypatch.setattr(train_module._Run, "prepare_validation", _no_scan_cases)
    train(cfg, out, resume=True, progress=False)  # steps 3-4: errors 5.0, 6.0
    best = load_model(out / "model-best").config
    assert best["trained_steps"] == 3 and best["val_epe_mm"] == 5.0
    rows = list(csv.DictReader((out / "val_log.csv").open()))
    assert [float(r["epe_mm"]) for r in rows] == [9.0, 7.0, 8.0, 5.0, 6.0]


def _no_scan_cases(self) -> None:
    self.vpairs = validation_pairs(self.val_subjects, self.cfg.val_pairs)
    self.cases = []


def test_a_continued_run_takes_the_learning_rate_of_its_config(tmp_path: Path) -> None:
    """Adam's state is restored, but the rate is the config's: a user who lowers (or
    raises) ``lr`` for the next chunk gets it, and the same rate continues exactly."""
    raw = shapes_config(steps=(4, 1))
    out = tmp_path / "r"
    train(parse_config(raw), out, max_steps=2, progress=False)
    seen: list[float] = []
    real_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    torch.optim.Adam.step = spy
    try:
        raw["stages"][0]["lr"] = 2.5e-4
        train(parse_config(raw), out, resume=True, max_steps=1, progress=False)
    finally:
        torch.optim.Adam.step = real_step
    assert seen == [2.5e-4]


def test_2d_bf16_training_does_not_crash_in_dilated_convolutions(tmp_path: Path) -> None:
    """torch 2.13's oneDNN segfaults in the bf16 channels-last backward of 2D convolutions
    with dilation >= 8 (RAN3's RA modules); 2D bf16 runs use the contiguous layout. Run in
    a child process: a crash must fail this test, not end the test session."""
    cfg = shapes_config(steps=(2, 0), name="RAN3", size=(48, 64), amp=True)
    cfg["stages"] = cfg["stages"][:1]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = (
        "import sys; from ranreg.cli import main; "
        f"sys.exit(main(['train', '--config', {str(path)!r}, '--out', {str(tmp_path / 'r')!r}, "
        "'--no-progress']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "train_summary.json").read_text())["global_step"] == 2
    bad = dict(cfg, channels_last=True)
    path.write_text(yaml.safe_dump(bad))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "s")]) == 2


def test_mixed_stage_alternates_known_field_steps_and_resumes_exactly(tmp_path: Path) -> None:
    raw = shapes_config(steps=(1, 6))
    raw["stages"][1]["mix"] = {"with": "synthetic", "every": 3}
    cfg = parse_config(raw)
    assert cfg.stages[1].mix == "synthetic" and cfg.stages[1].mix_every == 3
    assert train(cfg, tmp_path / "a", progress=False)["finished"]
    with (tmp_path / "a" / "train_log.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    # steps 2-7 are the mixed stage's 0-5: its steps 2 and 5 take the known-field loss
    kinds = [r["stage"] for r in rows]
    assert kinds == ["synthetic", "unsupervised", "unsupervised", "synthetic"] + [
        "unsupervised",
        "unsupervised",
        "synthetic",
    ]
    assert all(r["ddf"] for r in rows if r["stage"] == "synthetic")
    assert all(r["similarity"] and not r["ddf"] for r in rows if r["stage"] == "unsupervised")
    # a chunked run gives the same weights
    assert not train(cfg, tmp_path / "b", max_steps=3, progress=False)["finished"]
    assert train(cfg, tmp_path / "b", resume=True, progress=False)["finished"]
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ({"with": "nowhere"}, "not an earlier synthetic stage"),
        ({"with": "synthetic", "every": 1}, "integer >= 2"),
        ({"with": "synthetic", "often": 2}, "must be {with"),
        ({"with": "synthetic", "batch": 4}, "must be {with"),
    ],
)
def test_bad_mix_is_one_clear_error(mix: dict, message: str) -> None:
    raw = shapes_config()
    raw["stages"][1]["mix"] = mix
    with pytest.raises(RanregError, match=message):
        parse_config(raw)


def test_mix_needs_one_batch_size_and_an_unsupervised_stage() -> None:
    raw = shapes_config()
    raw["stages"][1].update(mix={"with": "synthetic"}, batch_size=4)
    with pytest.raises(RanregError, match="one batch size"):
        parse_config(raw)
    raw = shapes_config()
    raw["stages"][0]["mix"] = {"with": "unsupervised"}
    with pytest.raises(RanregError, match="only an unsupervised stage"):
        parse_config(raw)
