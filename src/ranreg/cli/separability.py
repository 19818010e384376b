"""``ranreg separability``: the Theorem-1 bound against networks at a sliding boundary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ranreg.atomic import write_text_atomic
from ranreg.errors import RanregError
from ranreg.nn import MODEL_NAMES
from ranreg.separability import DEFAULT_DISTANCES, DEFAULT_SHIFTS, MODES
from ranreg.separability_report import (
    _parse_checkpoints,
    _to_json,
    format_separability,
    plot_separability,
    run_separability,
)


def _run(args: argparse.Namespace) -> int:
    shape = args.shape or ([64, 64] if args.ndim == 2 else [32, 32, 32])
    if len(shape) != args.ndim:
        raise RanregError(f"--shape needs {args.ndim} sizes for --ndim {args.ndim}, got {shape}")
    if any(n < 2 for n in shape):
        raise RanregError(f"--shape sizes must be >= 2, got {shape}")
    if any(p < 1 for p in args.distances):
        raise RanregError(f"--distances must be >= 1 voxel, got {args.distances}")
    if args.pairs < 1:
        raise RanregError(f"--pairs must be >= 1, got {args.pairs}")
    if not -args.ndim <= args.axis < args.ndim:
        raise RanregError(f"--axis {args.axis} out of range for --ndim {args.ndim}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RanregError(f"--device {args.device}: CUDA is not available on this machine")
    checkpoints = _parse_checkpoints(args.checkpoint or [])
    try:
        result = run_separability(
            args.models,
            checkpoints,
            args.ndim,
            shape,
            args.distances,
            mode=args.mode,
            empirical=not args.bound_only,
            shifts=args.shifts,
            n_pairs=args.pairs,
            seed=args.seed,
            axis=args.axis % args.ndim,
            device=args.device,
        )
    except ValueError as exc:
        raise RanregError(str(exc)) from None
    payload = _to_json(result)
    if args.out is not None:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RanregError(f"--out {out}: cannot create directory ({exc})") from None
        write_text_atomic(out / "separability.json", json.dumps(payload, indent=2) + "\n")
        plot_separability(
            {
                r["name"]: (result["distances"], r["empirical"], r["bound"])
                for r in result["models"]
            },
            out / "separability.png",
            title=f"Motion separability ({args.ndim}D, mode '{args.mode}')",
            reference=None if args.bound_only else result["true_jump"],
        )
    print(json.dumps(payload, indent=2) if args.json else format_separability(result))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ranreg.cli import command_help

    p = sub.add_parser(
        "separability",
        help=command_help("separability"),
        description=(
            "Print, per distance p, the Theorem-1 upper bound of the displacement difference "
            "two points at distance p can have (sum of 2 a_k over the levels that separate "
            "them), and the largest difference each network produces across a synthetic "
            "sliding boundary. Networks are untrained unless --checkpoint gives weights."
        ),
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["RAN0", "RAN3", "RAN4", "RAN4+"],
        choices=MODEL_NAMES,
        metavar="NAME",
        help=f"architectures to report, untrained (from {', '.join(MODEL_NAMES)}; "
        "default RAN0 RAN3 RAN4 RAN4+)",
    )
    p.add_argument(
        "--checkpoint",
        nargs="+",
        action="extend",
        metavar="NAME=PATH",
        help="trained model file/dir to measure under label NAME (replaces a same-named "
        "--models entry)",
    )
    p.add_argument("--ndim", type=int, default=2, choices=(2, 3))
    p.add_argument(
        "--shape", type=int, nargs="+", metavar="N", help="probe size (default 64 64 / 32 32 32)"
    )
    p.add_argument(
        "--distances",
        type=int,
        nargs="+",
        default=list(DEFAULT_DISTANCES),
        metavar="P",
        help="distances p in voxels (default 1 2 4 8 16 32)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="all",
        help="level k separates distance p when p >= p_k ('all', default) or p >= 1 ('best')",
    )
    p.add_argument(
        "--shifts",
        type=float,
        nargs="+",
        default=list(DEFAULT_SHIFTS),
        metavar="S",
        help="the probe halves move by -S and +S voxels (default 2 4 8)",
    )
    p.add_argument("--pairs", type=int, default=2, help="random textures per shift (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of textures and untrained weights")
    p.add_argument("--axis", type=int, default=0, help="boundary normal axis (default 0)")
    p.add_argument("--bound-only", action="store_true", help="skip running the networks")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--out", metavar="DIR", help="write separability.json and separability.png")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)
