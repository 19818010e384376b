"""``ranreg data ...``: data preparation commands.

``ranreg data synth --labels DIR --out DIR [--seed N]`` paints CT-like images
from label maps (see :mod:`ranreg.data.synth_images`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``data`` command and its sub-commands."""
    from ranreg.cli import command_help

    p = subparsers.add_parser(
        "data",
        help=command_help("data"),
        description="Data preparation commands.",
    )
    sub = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "synth",
        help="make CT-like images from abdominal label maps",
        description=(
            "For each LABELS/*.nii.gz write OUT/images/NAME.nii.gz (int16 HU, CT-like "
            "image painted from the labels) and OUT/labels/NAME.nii.gz (a copy of the "
            "label map), plus OUT/synth.json. OUT must not exist or be empty; it is "
            "written atomically."
        ),
    )
    s.add_argument(
        "--labels",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder of integer label maps (*.nii.gz)",
    )
    s.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="output folder (created; must not exist or be empty)",
    )
    s.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="random seed (default 0); subject NAME uses (seed, crc32(NAME))",
    )
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    s.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from ranreg.data.synth_images import synthesize_dataset

    written = synthesize_dataset(
        args.labels, args.out, seed=args.seed, progress=not args.no_progress
    )
    names = ", ".join(img.name.removesuffix(".nii.gz") for img, _ in written)
    print(f"wrote {len(written)} subject(s) to {args.out} (seed {args.seed}): {names}")
    print(f"  images: {args.out / 'images'}")
    print(f"  labels: {args.out / 'labels'}")
    print(f"  manifest: {args.out / 'synth.json'}")
    sys.stdout.flush()
    return 0
