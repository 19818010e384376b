"""``ranreg demo``: register the pair shipped with the package."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ranreg.cli.options import (
    add_device_option,
    add_registration_options,
    options_from_args,
)
from ranreg.cli.register import print_report
from ranreg.demo import demo_files, run_demo


def _run(args: argparse.Namespace) -> int:
    metrics = run_demo(
        args.out,
        args.model,
        args.device,
        options=options_from_args(args),
    )
    f = demo_files()
    print_report(metrics, Path(args.out), f["moving_image"].name, f["fixed_image"].name)
    print(f"open {Path(args.out) / 'overlay.png'} to see the result")
    return 0


def add_parser(sub: Any) -> None:
    from ranreg.cli import command_help

    p = sub.add_parser(
        "demo",
        help=command_help("demo"),
        description="Register the packaged abdomen pair (moving 0027 -> fixed 0028) and write "
        "the same outputs as `ranreg register`.",
    )
    p.add_argument("--out", default="ranreg-demo", help="output folder (default ranreg-demo)")
    p.add_argument("--model", default=None, help="model (default: the packaged default)")
    add_device_option(p)
    add_registration_options(p)
    p.set_defaults(func=_run)
