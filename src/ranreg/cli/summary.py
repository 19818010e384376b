"""``ranreg summary``: parameters, MACs, memory and motion ranges of a model."""

from __future__ import annotations

import argparse
import json

import torch

from ranreg.errors import RanregError
from ranreg.nn import MODEL_NAMES
from ranreg.summary import format_summary, summarize


def _run(args: argparse.Namespace) -> int:
    shape = args.shape or ([96, 80, 128] if args.ndim == 3 else [96, 128])
    if len(shape) != args.ndim:
        raise RanregError(f"--shape needs {args.ndim} sizes for --ndim {args.ndim}, got {shape}")
    if any(n < 1 for n in shape):
        raise RanregError(f"--shape sizes must be positive, got {shape}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RanregError(f"--device {args.device}: CUDA is not available on this machine")
    try:
        info = summarize(
            args.model, args.ndim, shape, heads=args.heads, device=args.device, grad=args.grad
        )
    except ValueError as exc:
        raise RanregError(str(exc)) from None
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ranreg.cli import command_help

    p = sub.add_parser(
        "summary",
        help=command_help("summary"),
        description="Build a model and measure one forward pass on a random pair.",
    )
    p.add_argument(
        "--model",
        default="RAN4+",
        choices=MODEL_NAMES,
        metavar="NAME",
        help=f"one of {', '.join(MODEL_NAMES)} (default RAN4+)",
    )
    p.add_argument("--ndim", type=int, default=3, choices=(2, 3))
    p.add_argument(
        "--shape",
        type=int,
        nargs="+",
        metavar="N",
        help="input size (default 96 80 128, or 96 128 in 2D)",
    )
    p.add_argument("--heads", type=int, default=None, help="number of heads m (default 6)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument(
        "--grad",
        action="store_true",
        help="measure a training step's forward+backward instead of inference",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)
