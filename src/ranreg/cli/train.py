"""``ranreg train``: train a model from a YAML config, in chunks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ranreg.train import is_main_process, train


def _run(args: Any) -> int:
    from ranreg.config import load_config
    from ranreg.errors import RanregError

    cfg = load_config(args.config)
    if args.device:
        cfg.device = args.device
    if args.num_workers is not None:  # batches depend on the step alone, not on the workers
        if args.num_workers < 0:
            raise RanregError(f"--num-workers must be 0 or more, got {args.num_workers}")
        cfg.num_workers = args.num_workers
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    try:
        summary = train(
            cfg,
            out,
            resume=args.resume,
            max_steps=args.max_steps,
            time_limit=None if args.time_limit is None else 60 * args.time_limit,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            state=args.state,
            command=" ".join(["ranreg", *sys.argv[1:]]),
        )
        main = is_main_process()  # read before the process group goes
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if main:
        state = "finished" if summary["finished"] else "paused (resume with --resume)"
        print(
            f"{state} at step {summary['global_step']}/{summary['total_steps']}, "
            f"last loss {summary['last_loss']:.4f}; outputs in {out}"
        )
    return 0


def add_parser(sub: Any) -> None:
    from ranreg.cli import command_help

    p = sub.add_parser(
        "train",
        help=command_help("train"),
        description="Synthetic pre-training, then unsupervised training.",
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--out", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an OUT that holds an earlier run (its files are replaced)",
    )
    p.add_argument(
        "--state",
        help="keep the run's latest state here across machines (training-state/NAME): the "
        "run goes on from it or from OUT's checkpoint, whichever is further; replaced "
        "after the chunk",
    )
    p.add_argument("--max-steps", type=int, help="stop after this many steps (a chunk)")
    p.add_argument("--time-limit", type=float, help="stop after this many minutes (a chunk)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the config)")
    p.add_argument(
        "--num-workers",
        type=int,
        help="processes preparing batches (overrides the config; a GPU needs several)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
