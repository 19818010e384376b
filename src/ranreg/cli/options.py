"""Option groups shared by the commands that register (register, evaluate, demo): defined once."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ranreg.affine import AFFINE_MODES, SIMILARITIES
from ranreg.options import PRECISIONS, RegistrationOptions
from ranreg.refine import DEFAULT_STEPS, DEFAULT_WEIGHT, RefineSettings


def add_registration_options(p: Any, progress_flag: bool = True) -> None:
    """The pipeline options shared by ``register``, ``demo`` and ``evaluate``."""
    g = p.add_argument_group("registration pipeline (affine -> network -> optimisation)")
    g.add_argument(
        "--affine",
        choices=AFFINE_MODES,
        default=None,
        help="pre-alignment in world space before the network (default: affine for "
        "networks, none for identity and ants-syn); written as affine.txt (ITK, LPS)",
    )
    g.add_argument(
        "--similarity",
        choices=SIMILARITIES,
        default="auto",
        help="similarity of the affine stage: local NCC, mutual information, or auto "
        "(MI when exactly one image is CT)",
    )
    g.add_argument(
        "--fast",
        action="store_true",
        help="skip the instance optimisation: affine + network alone (the network on a grid "
        "of half its trained spacing unless --network-spacing)",
    )
    g.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average the network's field over the flips of both "
        "images along every subset of axes (8 passes in 3D: lower error, 8x the time)",
    )
    g.add_argument(
        "--network-spacing",
        type=float,
        default=None,
        metavar="MM",
        help="grid the network runs on, in mm (default: the model's own; with --fast half of it)",
    )
    g.add_argument(
        "--refine",
        type=int,
        default=None,
        metavar="N",
        help=f"instance-optimisation steps per level (default {DEFAULT_STEPS} for networks, "
        "0 for identity and ants-syn; 0 turns it off)",
    )
    g.add_argument(
        "--refine-weight",
        type=float,
        default=DEFAULT_WEIGHT,
        metavar="W",
        help=f"smoothness weight of the optimisation (default {DEFAULT_WEIGHT:g}; higher: "
        "smoother fields, less folding)",
    )
    g.add_argument(
        "--refine-levels",
        type=float,
        nargs="+",
        default=list(RefineSettings().levels),
        metavar="MM",
        help="grid spacings of the optimisation levels, coarse to fine (default "
        + " ".join(f"{s:g}" for s in RefineSettings().levels)
        + ")",
    )
    g.add_argument(
        "--diffeomorphic",
        action="store_true",
        help="optimise a stationary velocity field (scaling and squaring): no folding",
    )
    if progress_flag:
        g.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="progress bar while optimising (default: when stderr is a terminal)",
        )
    add_precision_options(g)


def options_from_args(args: Any) -> RegistrationOptions:
    """The :class:`RegistrationOptions` of parsed command-line arguments (checked)."""
    flag = getattr(args, "progress", False)
    progress = sys.stderr.isatty() if flag is None else bool(flag)
    return RegistrationOptions(
        affine=args.affine,
        similarity=args.similarity,
        fast=args.fast,
        tta=args.tta,
        network_spacing=args.network_spacing,
        refine=args.refine,
        refine_weight=args.refine_weight,
        refine_levels=tuple(args.refine_levels),
        diffeomorphic=args.diffeomorphic,
        precision=args.precision,
        channels_last=args.channels_last,
        progress=progress,
        initial_affine=getattr(args, "initial_affine", None),  # ranreg register only
    )


def add_precision_options(p: Any) -> None:
    """``--precision`` and ``--channels-last`` for the commands that run a network."""
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="network arithmetic: auto (default: bf16 autocast where the CPU has "
        "AVX512-BF16/AMX or the GPU has bf16, else fp32), fp32 or bf16",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory layout for the network (default: on for the CPU and for bf16)",
    )


def add_device_option(p: Any) -> None:
    """``--device`` of the commands that register."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")


def add_label_options(p: Any) -> None:
    """``--labels`` and ``--label-names``: which label values are scored, and their names."""
    p.add_argument(
        "--labels",
        type=int,
        nargs="+",
        metavar="L",
        help="label values to score (default the paper's 9 organs)",
    )
    p.add_argument(
        "--label-names",
        metavar="NAME|FILE",
        help="names of label values in reports: abdomen (default), totalseg, totalseg-mr, "
        "or a JSON/CSV file of id,name; with a table other than abdomen, every label of the "
        "fixed map is scored unless --labels says otherwise",
    )


def add_landmark_coordinates_option(p: Any) -> None:
    """``--landmark-coordinates``: the axes of landmark CSVs (Slicer files say theirs)."""
    p.add_argument(
        "--landmark-coordinates",
        choices=("lps", "ras", "voxel"),
        default=None,
        help="axes of landmark CSVs' x, y, z: world lps (ITK, ANTs; default) or ras (NIfTI), "
        "or voxel: 0-based indices of each image's array (Learn2Reg keypoints; no header "
        "needed)",
    )
