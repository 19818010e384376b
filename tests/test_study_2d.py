"""The 2D study's harness (benchmarks/study_2d*.py): batches, scores, resumed runs, claims."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import study_2d  # noqa: E402
import study_2d_data as data  # noqa: E402
import study_2d_report as report  # noqa: E402


def _planes() -> list:
    """Planes of a small synthetic subject: liver (6) and right kidney (2) form one sliding
    group, spleen (1) and left kidney (3) the other, inside a body (tissue 20)."""
    from ranreg.data.slices import subject_slices

    lab = np.zeros((32, 32, 32), dtype=np.int64)
    lab[4:14, 6:20, 4:28], lab[6:12, 20:26, 8:20] = 6, 2
    lab[18:28, 8:18, 6:26], lab[20:26, 18:24, 10:22] = 1, 3
    tissues = np.where(lab > 0, lab, 0).astype(np.int32)
    tissues[1:31, 2:30, :][tissues[1:31, 2:30, :] == 0] = 20
    image = (tissues.astype(np.float32) / 25.0).astype(np.float32)
    organs = np.where(np.isin(lab, data.ORGANS), lab, 0).astype(np.uint8)
    vols = {"image": image, "labels": lab, "organs": organs}
    vols |= {f"tissues{k}": tissues for k in range(data.TISSUE_DRAWS)}
    return subject_slices("x", vols, {"axial": 2, "coronal": 2})


def test_batches_depend_on_seed_and_step_only() -> None:
    planes = _planes()
    a, b = data.training_batch(planes, 0, 5, 3), data.training_batch(planes, 0, 5, 3)
    for key in ("moving", "fixed", "ddf_true"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert a["moving"].shape[:2] == (3, 1) and a["ddf_true"].shape[:2] == (3, 2)
    c = data.training_batch(planes, 0, 6, 3)
    assert a["moving"].shape != c["moving"].shape or not torch.equal(a["moving"], c["moving"])


def test_true_field_scores_perfectly_and_zero_field_scores_its_size() -> None:
    pairs = data.known_pairs(_planes(), seed=3)
    assert [p["kind"] for p in pairs[:2]] == ["sliding", "smooth"]
    for p in pairs:
        s = data.score(p, p["ddf"])
        assert s["epe_mm"] == 0.0 and s["dice"] == 1.0 and s["folding_percent"] >= 0
        if p["kind"] == "sliding":
            assert s["epe_boundary_mm"] == 0.0
        z = data.score(p, np.zeros_like(p["ddf"]))
        size = np.linalg.norm(p["ddf"], axis=0)[p["body"]].mean() * data.SPACING_MM
        assert z["epe_mm"] == pytest.approx(size, rel=1e-5)
        assert z["sd_log_jacobian"] == 0.0


def test_a_resumed_run_is_the_uninterrupted_run(tmp_path: Path) -> None:
    planes = _planes()
    for cache in (tmp_path / "a", tmp_path / "b"):
        data.write_split(cache / "train.npz", planes)
        data.write_split(cache / "val.npz", planes[:2])
    straight = study_2d.train_run("RAN0", 0, tmp_path / "a" / "run", tmp_path / "a", 2, 1, 5.0)
    assert straight == 2
    assert study_2d.train_run("RAN0", 0, tmp_path / "b" / "run", tmp_path / "b", 1, 1, 5.0) == 1
    assert study_2d.train_run("RAN0", 0, tmp_path / "b" / "run", tmp_path / "b", 2, 1, 5.0) == 2
    wa = load_file(str(tmp_path / "a" / "run" / "checkpoint" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "run" / "checkpoint" / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    rows = (tmp_path / "b" / "run" / "val_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]  # each validation once
    assert study_2d.trained_steps(tmp_path / "b" / "run") == 2


def test_a_chunk_stopped_by_sigterm_keeps_its_state_and_chunk_row(tmp_path: Path) -> None:
    """SIGTERM to a chunk ends each run after its current step: checkpoint and chunk row
    agree on that step, no report is written, the exit is clean, and the run continues."""
    import csv
    import json
    import signal
    import subprocess
    import time

    planes = _planes()
    for split, part in (("train", planes), ("val", planes[:2]), ("test", planes[:2])):
        data.write_split(tmp_path / "data" / f"{split}.npz", part)
    study = [sys.executable, str(BENCH / "study_2d.py"), "--models", "RAN0", "--jobs", "1"]
    where = ["--state", str(tmp_path / "state"), "--work", str(tmp_path), "--val-every", "1000"]
    report_md = tmp_path / "study-2d.md"
    proc = subprocess.Popen(
        [*study, *where, "--out", str(report_md), "--steps", "100000", "--time-limit", "5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "state" / "RAN0-s0"
    deadline = time.monotonic() + 120
    while not (run / "val_log.csv").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)  # the step-0 validation is written just before training starts
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)  # to the chunk, which passes it on to its runs
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped: every run kept its state" in out, out
    assert not report_md.exists()
    step = json.loads((run / "checkpoint" / "model.json").read_text())["trained_steps"]
    (row,) = list(csv.DictReader((run / "chunks.csv").open()))
    assert 0 < step < 100000 and int(row["first_step"]) == 1 and int(row["last_step"]) == step
    assert study_2d.trained_steps(run) == step
    # the stopped run goes on from there
    assert study_2d.train_run("RAN0", 0, run, tmp_path / "data", step + 1, 1000, 5.0) == step + 1


def test_claims_are_paired_tests_in_the_right_direction() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(2, 4, size=20)
    rows = lambda v: [{"epe_boundary_mm": x, "dice": 0.5} for x in v]  # noqa: E731
    scores = {
        "RAN4+": {0: rows(base - 1.0), 1: rows(base - 0.8)},  # clearly lower error
        "RAN4+-noRA": {0: rows(base)},
        "RAN4": {0: rows(base - 1.5)},  # lower still: RAN4+ is not better than it
    }
    lines = report.claims_table(scores)
    noRA = next(line for line in lines if "than RAN4+-noRA | epe_boundary_mm" in line)
    assert noRA.endswith("| yes |") and "-0.900" in noRA
    ran4 = next(line for line in lines if "than RAN4 | epe_boundary_mm" in line)
    assert ran4.endswith("| no: the reverse |")
    dice = next(line for line in lines if "than RAN4+-noRA | dice" in line)
    assert dice.endswith("| no: n.s. |")  # equal Dice everywhere
    table = report.results_table(scores)
    assert any(r.startswith("| RAN4+ | 2 |") and "±" in r for r in table)


def test_the_best_network_is_chosen_by_validation_at_the_last_point() -> None:
    conv = {"ranking": {2500: ["RAN4", "RAN0"], 5000: ["RAN0", "RAN4"]}}
    claims = report.best_against_peers(conv)
    assert {better for better, _, _ in claims} == {"RAN0"}  # the order at 5000, not 2500
    assert {(peer, key) for _, peer, key in claims} == {
        (peer, key) for peer in report.PEERS for key in ("epe_boundary_mm", "dice")
    }
    assert report.best_against_peers({"ranking": {}}) == ()
    rows = lambda v: [{"epe_boundary_mm": x, "dice": 0.5} for x in v]  # noqa: E731
    base = np.random.default_rng(1).uniform(8, 10, size=16)
    scores = {"RAN0": {0: rows(base - 0.5)}, "identity": {0: rows(base)}}
    lines = report.claims_table(scores, claims)
    assert len(lines) == 2 + 2  # header, rule, and the two rows whose peer has scores
    assert lines[2].startswith("| RAN0 better than identity | epe_boundary_mm | -0.500 |")
    assert lines[2].endswith("| yes |")


def test_a_chunk_out_of_time_ends_with_runs_left_in_the_queue(tmp_path: Path) -> None:
    """No run starts with under a minute left; the chunk returns instead of waiting."""
    import argparse
    import time

    args = argparse.Namespace(
        state=tmp_path, work=tmp_path, steps=10, val_every=5, time_limit=0.5, jobs=2, cycle=10
    )
    started = time.monotonic()
    study_2d.train_all(args, [("RAN0", 0), ("RAN3", 0)])
    assert time.monotonic() - started < 10
    assert not list(tmp_path.iterdir())  # nothing was trained


def test_the_learning_rate_restarts_each_cycle_and_cycle_one_is_unchanged() -> None:
    lr, cycle = study_2d.LR, study_2d.STEPS
    decay = int(study_2d.DECAY_AT * cycle)
    # the first cycle is the schedule the finished runs trained with (a tenth from 80 %)
    assert [study_2d.lr_at(k) for k in (0, decay - 1, decay, cycle - 1)] == [
        lr,
        lr,
        lr / 10,
        lr / 10,
    ]
    # a longer budget restarts at the full rate and decays at the same fraction
    assert study_2d.lr_at(cycle) == lr and study_2d.lr_at(cycle + decay - 1) == lr
    assert study_2d.lr_at(cycle + decay) == lr / 10
    assert study_2d.lr_at(7, cycle=10) == lr and study_2d.lr_at(8, cycle=10) == lr / 10


def test_convergence_tells_a_plateau_from_a_falling_curve() -> None:
    def run(name: str, epe: dict[int, float]) -> dict:
        return {"run": name, "val": [(k, v, 0.0) for k, v in sorted(epe.items())]}

    flat = {0: 10.0, 600: 8.0, 800: 5.0, 1000: 4.95}  # 1 % over the last fifth
    falling = {0: 10.0, 600: 9.0, 800: 8.0, 1000: 7.0}  # 12.5 %
    progress = [
        run("A-s0", flat),
        run("A-s1", {k: v + 0.1 for k, v in flat.items()}),
        run("B-s0", falling),
        run("B-s1", {0: 10.0, 600: 2.0}),  # unfinished seed: left out of B's curve
    ]
    conv = report.convergence(progress, cycle=1000)
    assert conv["points"] == [600, 800, 1000]
    assert conv["rows"]["A"]["plateau"] and not conv["rows"]["B"]["plateau"]
    assert conv["rows"]["B"]["epe"] == [9.0, 8.0, 7.0]  # seed 1 did not reach step 1000
    assert conv["rows"]["A"]["fall_last_fifth"] == pytest.approx((5.05 - 5.0) / 5.05)
    assert conv["ranking"][600] == ["A", "B"] and conv["ranking"][1000] == ["A", "B"]
    # a second cycle: A improves 10 % from its first cycle's end, so it is not at its plateau
    again = [run("A-s0", {**flat, 1600: 4.6, 1800: 4.5, 2000: 4.455})]
    conv = report.convergence(again, cycle=1000)
    assert conv["points"] == [1000, 1600, 1800, 2000]
    row = conv["rows"]["A"]
    assert row["fall_last_fifth"] < 0.02 and row["fall_last_cycle"] == pytest.approx(0.1)
    assert not row["plateau"]
    assert any("no: still falling" in line for line in report.convergence_table(conv))


def test_the_figure_curves_average_seeds_where_all_were_validated() -> None:
    progress = [
        {"run": "A-s0", "val": [(0, 10.0, 8.0), (250, 6.0, 4.0), (500, 4.0, 2.0)]},
        {"run": "A-s1", "val": [(0, 12.0, 9.0), (250, 8.0, 5.0)]},  # a step behind
    ]
    assert report._val_by_model(progress) == {"A": {0: 11.0, 250: 7.0}}
    assert report._val_by_model(progress, column=2) == {"A": {0: 8.5, 250: 4.5}}
    assert report._val_by_model(progress, at=500) == {"A": {0: 10.0, 250: 6.0, 500: 4.0}}


def test_trends_recover_a_power_law_and_where_two_curves_meet(tmp_path: Path) -> None:
    def run(name: str, k: float, slope: float) -> dict:
        return {"run": name, "val": [(s, k * s**slope, 0.0) for s in range(1000, 5001, 500)]}

    # A is ahead but falls slower: k_a s^-0.1 = k_b s^-0.2 at s = (k_b / k_a)^10 = 20,000
    k_b = 5.0 * 20000**0.1
    progress = [run("A-s0", 5.0, -0.1), run("B-s0", k_b, -0.2), run("C-s0", 9.0, 0.0)]
    trend = report.trends(progress, cycle=1000)
    assert trend["ends"] == [3000, 4000, 5000] and trend["best"] == "A"
    a, b, c = (trend["rows"][m] for m in "ABC")
    assert a["slope"] == pytest.approx(-0.1) and b["slope"] == pytest.approx(-0.2)
    assert b["fall_per_doubling"] == pytest.approx(1 - 2**-0.2)
    assert b["at_double"] == pytest.approx(k_b * 10000**-0.2)
    assert b["meets_best_at"] == pytest.approx(20000, rel=1e-6)
    assert a["meets_best_at"] is None and c["meets_best_at"] is None  # the best; flat: never
    table = "\n".join(report.trends_table(trend))
    assert "| C | 9.00 | 0.0% | 9.00 | never |" in table and "| A |" in table
    assert report.trends([run("A-s0", 5.0, -0.1)], cycle=5000)["rows"] == {}
    png = report._curve_figure(progress, trend, tmp_path / "curves.png")
    assert png.stat().st_size > 10_000  # three panels drawn
