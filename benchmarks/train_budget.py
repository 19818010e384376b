"""Train every compared model with one recipe and one budget (configs/budget-abdomen.yaml).

    python benchmarks/train_budget.py --out runs/budget               # all models
    python benchmarks/train_budget.py --out runs/budget --quick       # < 10 min: RAN0, 20 steps
    python benchmarks/train_budget.py --out runs/budget --time-limit 30   # a chunk; rerun resumes

The images are painted once (`ranreg data synth --seed 0`, shared by every model); each
model then trains with `ranreg train` in its own process, ``--jobs`` at a time (each with
cores/jobs threads), longest first. A model whose ``model/`` exists is done; one with a
checkpoint resumes (``--resume``), so an interrupted run continues where it stopped, in
this session or the next. The trained models land in ``OUT/<model>/model``, ready for
``ranreg evaluate --model`` and benchmarks/sliding.py and separability.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import ROOT, SHARED_LABELS

#: Compared models, the most expensive first (for the job queue).
MODELS = ["RAN4+", "RAN4", "RAN3", "RAN3-noRA", "RAN0", "VoxelMorph-pkg"]
CONFIG = ROOT / "configs" / "budget-abdomen.yaml"


def model_config(base: dict, model: str, cache: Path, steps: int | None) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
    cfg["model"]["name"] = model
    cfg["data"]["labels"] = str(SHARED_LABELS)
    cfg["data"]["cache"] = str(cache.resolve())
    if steps is not None:
        cfg["stages"][-1]["steps"] = steps
        cfg["stages"] = cfg["stages"][-1:]
    return cfg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "budget")
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--jobs", type=int, default=2, help="models trained at once")
    p.add_argument("--time-limit", type=float, help="minutes per model in this chunk")
    p.add_argument("--quick", action="store_true", help="RAN0 only, 20 steps (a smoke run)")
    args = p.parse_args()
    models = ["RAN0"] if args.quick else args.models
    steps = 20 if args.quick else None
    out = args.out / "quick" if args.quick else args.out
    base = yaml.safe_load(args.config.read_text())
    cache = args.out / "synth-data"
    ranreg = [sys.executable, "-m", "ranreg.cli"]
    if not (cache / "images").is_dir():
        subprocess.run(
            [*ranreg, "data", "synth", "--labels", str(SHARED_LABELS), "--out", str(cache)],
            check=True,
        )
    (out / "configs").mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    queue, running = list(models), {}
    while queue or running:
        while queue and len(running) < args.jobs:
            model = queue.pop(0)
            run_dir = out / model.replace("+", "plus")
            if (run_dir / "model").is_dir():
                print(f"{model}: done already ({run_dir / 'model'})", file=sys.stderr)
                continue
            cfg_path = out / "configs" / f"{run_dir.name}.yaml"
            cfg_path.write_text(yaml.safe_dump(model_config(base, model, cache, steps)))
            cmd = [*ranreg, "train", "--config", str(cfg_path), "--out", str(run_dir)]
            cmd.append("--no-progress")
            if (run_dir / "checkpoint").exists():
                cmd.append("--resume")
            if args.time_limit:
                cmd += ["--time-limit", str(args.time_limit)]
            run_dir.mkdir(parents=True, exist_ok=True)
            log = (run_dir / "train.log").open("a")
            print(f"{model}: training ({' '.join(cmd[2:])})", file=sys.stderr, flush=True)
            running[model] = (subprocess.Popen(cmd, stdout=log, stderr=log, env=env), time.time())
        time.sleep(5)
        for model, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                del running[model]
                took = (time.time() - start) / 60
                state = "ok" if proc.returncode == 0 else f"FAILED (rc {proc.returncode})"
                print(f"{model}: {state} after {took:.1f} min", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
