"""The paper's claims at a scale that converges on a CPU: every variant trained in 2D.

    python benchmarks/study_2d.py --time-limit 60      # a chunk of the full study; rerun
    python benchmarks/study_2d.py --report             # evaluate what is trained, write it
    python benchmarks/study_2d.py --quick              # < 10 min: 2 networks, 40 steps

Data: axial and coronal planes of the shared abdomen subjects at 4 mm with known fields,
sliding organ groups and smooth warps (benchmarks/study_2d_data.py). Every network (RAN0,
RAN3, RAN4, RAN4+, RAN4+ without RA modules, the voxelmorph package's U-Net) trains with
one recipe: :data:`STEPS` Adam steps (learning rate :data:`LR`) of :data:`BATCH` pairs,
loss = MSE to the true field (the paper's Eq. 11) + :data:`W_SMOOTH` |grad u|^2 +
:data:`W_IMAGE` MSE(warped moving, fixed) (pairs of one contrast), float32,
one CPU thread per run, :data:`SEEDS` seeds each (three for RAN4+ and its ablation). Every
:data:`VAL_EVERY` steps the validation planes (subjects 0025, 0026) are registered; the
model of the lowest validation end-point error is the one tested. A run keeps its state
(weights, Adam, step, validation log, chunk log) in ``--state``/NAME (a few MB), so the
study continues on another machine from the committed state; batches depend only on
(seed, step), so a resumed run is the uninterrupted run.

Test: the planes of subjects 0027-0030 (one sliding and one smooth field each), every
trained network next to ANTs SyN (2D, default settings) and no registration: per-organ
Dice, end-point error in the body and within 2 pixels of the sliding boundaries, folding,
SD log J; paired Wilcoxon tests over the test pairs; the motion separability of each
trained network against its Theorem-1 bound. Writes docs/results/study-2d.md (+ .json,
figures) with the command, date and machine.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, command_line, machine

from ranreg.signals import stop_signals

HERE = Path(__file__).resolve()
#: network -> seeds; the comparison that matters most (RA modules or not) gets three
SEEDS: dict[str, tuple[int, ...]] = {
    "RAN4+": (0, 1, 2),
    "RAN4+-noRA": (0, 1, 2),
    "RAN4": (0,),
    "RAN3": (0,),
    "RAN0": (0,),
    "VoxelMorph-pkg": (0,),
}
#: rough seconds per step on one thread (AMD EPYC, 2 cores busy): the order runs start in
COST = {"RAN4+": 2.4, "RAN4": 2.3, "RAN4+-noRA": 2.1, "RAN3": 0.9, "RAN0": 0.5}
STEPS, BATCH, LR, W_SMOOTH, VAL_EVERY = 2500, 4, 1e-3, 0.1, 250
#: weight of MSE(warped moving, fixed), the paper's stage-1 image term: the field term
#: alone leaves every network at the zero field for hundreds of steps (RAN0 and both
#: VoxelMorphs: training loss = the zero field's after 300 steps); chosen on the
#: validation planes among 0, 100, 300, 1000 (RAN0, 300 steps: EPE 11.39, 10.86, 11.22,
#: 11.53 mm)
W_IMAGE = 100.0
#: the learning rate drops tenfold for the last fifth of each cycle of :data:`STEPS` steps
#: (a fixed-budget schedule); a longer ``--steps`` restarts it (warm restarts), so every
#: cycle's end is one more point of a budget comparison and the end of cycle 1 is unchanged
DECAY_AT = 0.8
VAL_SEED, TEST_SEED = 1, 2
QUICK = {"models": ("RAN3", "VoxelMorph-pkg"), "steps": 40, "val_every": 20, "test_pairs": 8}


def run_name(model: str, seed: int) -> str:
    return f"{model}-s{seed}"


def lr_at(step: int, cycle: int = STEPS) -> float:
    """The learning rate of ``step`` (from 0): :data:`LR`, a tenth in each cycle's last
    fifth (:data:`DECAY_AT`)."""
    return LR if step % cycle < DECAY_AT * cycle else LR / 10


def build(model: str, seed: int) -> Any:
    import torch

    from ranreg.nn import build_model

    torch.manual_seed(seed)
    options = {"heads": 6} if model.startswith("RAN") else {}
    return build_model(model, ndim=2, **options).to(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- one run
def predict(net: Any, pairs: list[dict[str, Any]], chunk: int = 8) -> list[np.ndarray]:
    """The network's field for every pair (batched by plane shape), on the net's device."""
    import torch

    device = next(net.parameters()).device
    net.eval()
    out: dict[int, np.ndarray] = {}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pairs):
        by_shape.setdefault(p["moving"].shape, []).append(i)
    with torch.no_grad():
        for idx in by_shape.values():
            for k in range(0, len(idx), chunk):
                part = idx[k : k + chunk]
                m = torch.from_numpy(np.stack([pairs[i]["moving"] for i in part]))[:, None]
                f = torch.from_numpy(np.stack([pairs[i]["fixed"] for i in part]))[:, None]
                ddf = net(m.to(device), f.to(device)).float().cpu()
                for i, d in zip(part, ddf.numpy(), strict=True):
                    out[i] = d
    net.train()
    return [out[i] for i in range(len(pairs))]


def _validate(net: Any, pairs: list[dict[str, Any]]) -> dict[str, float]:
    from study_2d_data import score

    rows = [score(p, d) for p, d in zip(pairs, predict(net, pairs), strict=True)]
    return {
        k: float(np.nanmean([r.get(k, math.nan) for r in rows]))
        for k in ("epe_mm", "epe_boundary_mm", "dice")
    }


def _append_csv(path: Path, row: dict[str, Any], keep_below: int | None = None) -> None:
    """Add ``row``; with ``keep_below``, rows of steps at or past it (a validation
    written after the last checkpoint of a killed chunk, and repeated now) are dropped."""
    rows = list(csv.DictReader(path.open(encoding="utf-8"))) if path.is_file() else []
    if keep_below is not None:
        rows = [r for r in rows if int(r["step"]) < keep_below]
    rows.append({k: str(v) for k, v in row.items()})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def train_run(
    model: str,
    seed: int,
    run: Path,
    cache: Path,
    steps: int,
    val_every: int,
    minutes: float,
    cycle: int = STEPS,
    device: str = "cpu",
) -> int:
    """Train (or continue) one network until ``steps`` or ``minutes``, the learning rate
    restarting every ``cycle`` steps (:func:`lr_at`), on ``device``; returns the step.
    Batches are drawn on the CPU (they depend on seed and step only); on a GPU, TF32 is
    off so that the recipe stays float32."""
    import torch
    from study_2d_data import known_pairs, load_split, training_batch

    from ranreg.checkpoint import load_checkpoint, save_checkpoint, save_model
    from ranreg.losses import gradient_l2, mse_loss
    from ranreg.objectives import image_term
    from ranreg.spatial import warp

    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    train, val = load_split("train", cache), known_pairs(load_split("val", cache), VAL_SEED)
    net = build(model, seed).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    ckpt, step, best = run / "checkpoint", 0, math.inf
    run.mkdir(parents=True, exist_ok=True)
    if ckpt.is_dir():
        state = load_checkpoint(ckpt, net)
        opt.load_state_dict(state["optimizer"])
        step, best = int(state["global_step"]), float(state["best_epe_mm"])
    first, started, losses = step, time.monotonic(), []
    log = run / "val_log.csv"

    def checkpoint() -> None:
        state = {
            "global_step": step,
            "stage_index": 0,
            "optimizer": opt.state_dict(),
            "best_epe_mm": best,
        }
        save_checkpoint(ckpt, net, state, extra={"trained_steps": step, "seed": seed})

    def validate() -> None:
        nonlocal best
        row = {"step": step, "train_loss": float(np.mean(losses)) if losses else math.nan}
        row |= _validate(net, val)
        _append_csv(log, row, keep_below=step)
        losses.clear()
        if row["epe_mm"] < best:
            best = row["epe_mm"]
            save_model(net, run / "model-best", extra={"trained_steps": step, **row})

    def train_step() -> None:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cycle)
        batch = {k: v.to(device) for k, v in training_batch(train, seed, step, BATCH).items()}
        ddf = net(batch["moving"], batch["fixed"]).float()
        if not bool(torch.isfinite(ddf).all()):  # grid_sample would crash the process on it
            raise RuntimeError(f"{run.name}: non-finite field at step {step}")
        loss = mse_loss(ddf, batch["ddf_true"]) + W_SMOOTH * gradient_l2(ddf)
        warped = warp(batch["moving"], ddf)
        loss = loss + W_IMAGE * image_term(warped, batch["fixed"], batch["image_weight"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    if step == 0:
        validate()
    with stop_signals() as stopped:
        while step < steps and not stopped.is_set() and time.monotonic() - started < 60 * minutes:
            train_step()
            step += 1
            if step % val_every == 0 or step == steps:
                validate()
                checkpoint()
    if step > first:
        checkpoint()
        per_step = (time.monotonic() - started) / (step - first)
        chunk = {
            "first_step": first + 1,
            "last_step": step,
            "s_per_step": round(per_step, 3),
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "command": os.environ.get("STUDY_2D_COMMAND", ""),
        }
        _append_csv(run / "chunks.csv", {"step": step, **chunk})
    return step


# ----------------------------------------------------------------------------- all runs
def runs_of(models: tuple[str, ...]) -> list[tuple[str, int]]:
    """Every network's first seed before any second one (a complete one-seed comparison
    comes first), the longest runs first within a seed."""
    out = [(m, s) for m in models for s in SEEDS[m]]
    return sorted(out, key=lambda r: (r[1], -COST.get(r[0], 0.1)))


def trained_steps(run: Path) -> int:
    rows = (
        list(csv.DictReader((run / "chunks.csv").open())) if (run / "chunks.csv").is_file() else []
    )
    return int(rows[-1]["last_step"]) if rows else 0


def train_all(args: argparse.Namespace, runs: list[tuple[str, int]]) -> bool:
    """The unfinished runs, ``--jobs`` at a time, each a process on one thread, until
    ``--time-limit`` minutes from now. SIGTERM or SIGINT stops the chunk: the running runs
    end after their current step with their state and chunk row, no other run starts;
    returns whether it was stopped so."""
    deadline = time.monotonic() + 60 * args.time_limit
    queue = [r for r in runs if trained_steps(args.state / run_name(*r)) < args.steps]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["STUDY_2D_COMMAND"] = command_line()  # logged with each run's chunk
    active: list[subprocess.Popen] = []

    def forward() -> None:
        for p in active:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    with stop_signals(forward) as stopped:
        _schedule(args, queue, active, deadline, env, stopped)
    return stopped.is_set()


def _schedule(
    args: argparse.Namespace,
    queue: list[tuple[str, int]],
    active: list[subprocess.Popen],
    deadline: float,
    env: dict[str, str],
    stopped: threading.Event,
) -> None:
    """Start queued runs while there is time and no stop, until none is left running."""
    while queue or active:
        for p in active:
            if p.poll() not in (None, 0):  # a crashed run must not pass unnoticed
                print(
                    f"error: {p.args[3]}-s{p.args[4]} exited with code {p.returncode}", flush=True
                )
        active[:] = [p for p in active if p.poll() is None]  # in place: forward() reads it
        left = (deadline - time.monotonic()) / 60
        while queue and not stopped.is_set() and len(active) < args.jobs and left > 1:
            model, seed = queue.pop(0)
            cmd = [
                sys.executable,
                str(HERE),
                "--worker",
                model,
                str(seed),
                "--steps",
                str(args.steps),
                "--val-every",
                str(args.val_every),
                "--cycle",
                str(args.cycle),
                "--state",
                str(args.state),
                "--work",
                str(args.work),
                "--time-limit",
                f"{left:.2f}",
                "--device",
                args.device,
            ]
            print(f"training {run_name(model, seed)} ({left:.0f} min left)", flush=True)
            active.append(subprocess.Popen(cmd, env=env))
        if not active and (stopped.is_set() or not queue or left <= 1):  # done, or no time
            break
        time.sleep(2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state", type=Path, default=ROOT / "training-state" / "study-2d")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "study-2d")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "study-2d.md")
    p.add_argument("--time-limit", type=float, default=60.0, help="minutes of training")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    p.add_argument("--device", default="cpu", help="where the runs train: cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, default=STEPS, help="steps per run (all cycles)")
    p.add_argument("--cycle", type=int, default=STEPS, help="steps per learning-rate cycle")
    p.add_argument("--val-every", type=int, default=VAL_EVERY)
    p.add_argument("--models", nargs="+", default=list(SEEDS), choices=list(SEEDS))
    p.add_argument("--report", action="store_true", help="evaluate and write, no training")
    p.add_argument("--quick", action="store_true", help="2 networks, 40 steps, 8 test pairs")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(HERE.parent))
    cache = args.work / "data"
    if args.worker:
        model, seed = args.worker[0], int(args.worker[1])
        run = args.state / run_name(model, seed)
        steps, minutes = args.steps, args.time_limit
        train_run(model, seed, run, cache, steps, args.val_every, minutes, args.cycle, args.device)
        return 0
    if args.quick:
        args.state, args.out = args.work / "quick", args.out.with_name("study-2d-quick.md")
        args.models, args.steps, args.val_every = (
            QUICK["models"],
            QUICK["steps"],
            QUICK["val_every"],
        )
        args.cycle = args.steps
    from study_2d_data import load_split

    for split in ("train", "val", "test"):
        load_split(split, cache)  # painted and cut once, before the workers read them
    runs = runs_of(tuple(args.models))
    if not args.report and train_all(args, runs):
        print("stopped: every run kept its state and chunk row; rerun to continue", flush=True)
        return 0
    from study_2d_report import report

    report(args, runs, cache, QUICK["test_pairs"] if args.quick else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
