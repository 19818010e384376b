"""``ranreg register``: register two image files and write the results.

This module resolves models (packaged names, files, ``identity``, classical peers), runs
:func:`ranreg.pipeline.register_volumes` (affine -> network -> instance optimisation;
geometry and conventions are documented there) and writes the output folder atomically.
``ddf.nii.gz`` holds the whole mapping (affine included) as world displacements in mm
(:data:`DDF_CONVENTION`); ``affine.txt`` holds the affine stage alone as an ITK transform
(LPS), for tools that want it separately.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ranreg.affine import AFFINE_MODES, SIMILARITIES
from ranreg.data.formats import OUTPUT_FORMATS
from ranreg.data.formats import output_format as _output_format
from ranreg.data.io import check_out_dir, load_label_volume, load_nifti
from ranreg.errors import RanregError
from ranreg.labelnames import load_label_names
from ranreg.models import IDENTITY, IdentityModel, model_label, resolve_model
from ranreg.options import PRECISIONS, RegistrationOptions
from ranreg.outputs import (
    DDF_CONVENTION,
    OUTPUT_FILES,
    abandon_output_dir,
    atomic_output_dir,
    choose_labels,
    finish_output_dir,
    jsonable,
    result_metrics,
    save_ddf,
    score_labels,
    write_json,
    write_outputs,
)
from ranreg.pipeline import (
    HU_THRESHOLD,
    RegistrationResult,
    _check_inputs,
    align_labels,
    model_settings,
    register_volumes,
)
from ranreg.refine import DEFAULT_STEPS, DEFAULT_WEIGHT, RefineSettings
from ranreg.runtime import (
    default_channels_last,
    is_neural,
    resolve_device,
    run_network,
)

# names re-exported for the modules and tests that import them from here
__all__ = [
    "OUTPUT_FILES",
    "abandon_output_dir",
    "atomic_output_dir",
    "finish_output_dir",
    "save_ddf",
    "write_json",
    "IDENTITY",
    "IdentityModel",
    "RegistrationResult",
    "RegistrationOptions",
    "DDF_CONVENTION",
    "HU_THRESHOLD",
    "resolve_model",
    "resolve_device",
    "model_settings",
    "model_label",
    "register_volumes",
    "score_labels",
    "register_files",
    "add_parser",
    "is_neural",
    "run_network",
    "default_channels_last",
]


#: Name of the reference "model" that does not move anything.
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
        help="skip the instance optimisation: affine + network alone (about 1 s)",
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
        refine=args.refine,
        refine_weight=args.refine_weight,
        refine_levels=tuple(args.refine_levels),
        diffeomorphic=args.diffeomorphic,
        precision=args.precision,
        channels_last=args.channels_last,
        progress=progress,
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


def register_files(
    fixed: str | os.PathLike[str],
    moving: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    model: torch.nn.Module | str | None = None,
    moving_labels: str | os.PathLike[str] | None = None,
    fixed_labels: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    labels_to_score: Sequence[int] | None = None,
    *,
    head_masks: bool = False,
    label_names: str | os.PathLike[str] | dict[int, str] | None = None,
    output_format: str | None = None,
    options: RegistrationOptions | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """Register two NIfTI files and write the results into the new folder ``out_dir``.

    Files (volumes in the fixed image's format, or ``output_format``: ``nii.gz``, ``nii``,
    ``nrrd``, ``mha``): ``warped.nii.gz``, ``ddf.nii.gz`` (:data:`DDF_CONVENTION`, the
    whole mapping, always NIfTI),
    ``affine.txt`` (the affine stage as an ITK transform, LPS; when it ran),
    ``jacobian.nii.gz``, ``warped_labels.nii.gz`` (with moving labels), ``overlay.png``,
    ``metrics.json`` (and ``head_masks.png`` with ``head_masks`` for RAN models).
    Everything is checked before anything is written, the folder is written as a temporary
    sibling and renamed into place, and a failure leaves nothing behind. ``out_dir`` must
    not exist or be empty. ``model`` is a model or a spec for :func:`resolve_model`;
    ``options`` and ``changes`` as for :func:`register_volumes`. Returns the metrics dict
    (as in ``metrics.json``).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    check_out_dir(out)
    opts = (options or RegistrationOptions()).with_(**changes)
    net = model if isinstance(model, torch.nn.Module) else resolve_model(model)
    resolve_device(device)
    fix = load_nifti(fixed)
    mov = load_nifti(moving)
    mov_lab = None if moving_labels is None else load_label_volume(moving_labels)
    fix_lab = None if fixed_labels is None else load_label_volume(fixed_labels)
    _check_inputs(net, mov, fix)
    mov_lab = align_labels(mov_lab, mov, "moving")
    fix_lab = align_labels(fix_lab, fix, "fixed")
    model_settings(net.config)
    names = label_names if isinstance(label_names, dict) else load_label_names(label_names)
    labels = choose_labels(labels_to_score, label_names, fix_lab)

    result = register_volumes(
        net, mov, fix, mov_lab, fix_lab, device, options=opts, return_levels=head_masks
    )
    metrics = result_metrics(result, net, opts, fix, mov, fix_lab, mov_lab, device, labels, names)
    tmp, created = atomic_output_dir(out)
    try:
        fmt = _output_format(fixed, output_format).lstrip(".")
        args = (tmp, result, metrics, net, opts, fix, mov, fix_lab, labels, head_masks)
        write_outputs(*args, fmt=fmt)
        metrics["total_s"] = time.perf_counter() - t0
        write_json(tmp / "metrics.json", metrics)
        finish_output_dir(tmp, out)
    except BaseException:
        abandon_output_dir(tmp, created)
        raise
    return jsonable(metrics)


# --------------------------------------------------------------------------------- CLI
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _run(args: Any) -> int:
    if args.pairs:
        return _run_pairs(args)
    if not args.fixed or not args.moving:
        raise RanregError("register: give --fixed and --moving, or --pairs CSV")
    metrics = register_files(
        args.fixed,
        args.moving,
        args.out,
        args.model,
        moving_labels=args.moving_labels,
        fixed_labels=args.fixed_labels,
        device=args.device,
        labels_to_score=args.labels,
        head_masks=args.head_masks,
        options=options_from_args(args),
        label_names=args.label_names,
        output_format=args.format,
    )
    print_report(metrics, Path(args.out), args.moving, args.fixed)
    return 0


def _run_pairs(args: Any) -> int:
    """``--pairs``: the model loaded once, one folder per pair, a summary (ranreg.batch)."""
    from ranreg.batch import read_pairs, run_batch

    if args.fixed or args.moving or args.moving_labels or args.fixed_labels:
        raise RanregError("register: --pairs takes the images from the CSV, not --fixed etc.")
    pairs = read_pairs(args.pairs)
    opts = options_from_args(args).with_(progress=False)
    net = resolve_model(args.model)
    resolve_device(args.device)
    names = load_label_names(args.label_names)

    def one(pair: Any, folder: Path) -> dict[str, Any]:
        return register_files(
            pair.fixed,
            pair.moving,
            folder,
            net,
            moving_labels=pair.moving_labels,
            fixed_labels=pair.fixed_labels,
            device=args.device,
            labels_to_score=args.labels,
            options=opts,
            label_names=names if args.label_names else None,
            output_format=args.format,
        )

    rows = run_batch(pairs, args.out, one, progress=sys.stderr.isatty())
    failed = [r for r in rows if r["status"] != "done"]
    print(f"{len(rows) - len(failed)} of {len(rows)} pairs registered; {args.out}/summary.csv")
    if failed:
        raise RanregError(
            f"{len(failed)} of {len(rows)} pairs failed (first: {failed[0]['name']}: "
            f"{failed[0]['error']}); see {args.out}/summary.csv"
        )
    return 0


def _steps_text(metrics: dict[str, Any]) -> str:
    parts = []
    aff = metrics.get("affine", {})
    if aff.get("mode", "none") != "none":
        parts.append(f"{aff['mode']} {aff['seconds']:.2f} s")
    parts.append(f"network {metrics['network_s']:.2f} s")
    ref = metrics["refine"]
    if ref["steps"]:
        ncc = ref["local_ncc"] or {}
        parts.append(
            f"optimisation {ref['steps']} steps x {len(ref['levels_mm'] or [])} levels "
            f"{ref['seconds']:.2f} s, network start {ref['network_start']}, local NCC "
            f"{_fmt(ncc.get('start'))} -> {_fmt(ncc.get('end'))}"
        )
    return ", ".join(parts)


def print_report(metrics: dict[str, Any], out: Path, moving: Any, fixed: Any) -> None:
    """Print what :func:`register_files` did: runtime, files, folding, Dice before/after."""
    files = sorted(p.name for p in out.iterdir())
    print(
        f"registered {moving} to {fixed} with {metrics['model']['label']} in "
        f"{metrics['runtime_s']:.2f} s ({_steps_text(metrics)})"
    )
    print(f"outputs in {out}/: {', '.join(files)}")
    print(
        f"folding {_fmt(metrics['folding_percent'], '.3f')} %, "
        f"SD log|J| {_fmt(metrics['sd_log_jacobian'], '.4f')}"
    )
    if "labels" in metrics:
        mb, ma = metrics["mean_before"]["dice"], metrics["mean_after"]["dice"]
        print(f"Dice before -> after (mean over labels present): {_fmt(mb)} -> {_fmt(ma)}")
        for lab, s in metrics["labels"].items():
            b, a = s["before"]["dice"], s["after"]["dice"]
            if b is None and a is None:
                continue
            print(f"  {lab:>3} {s['organ']:<24} {_fmt(b)} -> {_fmt(a)}")
    sys.stdout.flush()


def add_parser(sub: Any) -> None:
    from ranreg.cli import command_help

    p = sub.add_parser(
        "register",
        help=command_help("register"),
        description="Register MOVING to FIXED: affine pre-alignment in world space, the "
        "network, then instance optimisation (--fast: without it). Writes the warped image, "
        "the DDF of the whole mapping (mm, world axes), affine.txt (ITK), the Jacobian, an "
        "overlay figure and metrics into a new folder. " + DDF_CONVENTION,
    )
    p.add_argument("--fixed", help="fixed image (NIfTI, NRRD, MHA/MHD or a DICOM folder)")
    p.add_argument("--moving", help="moving image (same formats)")
    p.add_argument(
        "--pairs",
        metavar="CSV",
        help="register a cohort instead: a CSV with columns fixed, moving [, moving_labels, "
        "fixed_labels, name]; one folder per pair in --out and a summary.csv; finished "
        "pairs are skipped when run again",
    )
    p.add_argument(
        "--label-names",
        metavar="NAME|FILE",
        help="names of label values in reports: abdomen (default), totalseg, totalseg-mr, "
        "or a JSON/CSV file of id,name; with a table other than abdomen, every label of the "
        "fixed map is scored unless --labels says otherwise",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model file or folder, 'identity', or a packaged model name (default: the "
        "packaged default)",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default=None,
        help="format of the output volumes (default: the fixed image's; NIfTI for DICOM); "
        "the field is always ddf.nii.gz",
    )
    p.add_argument("--moving-labels", help="moving label map (warped with nearest neighbour)")
    p.add_argument("--fixed-labels", help="fixed label map (Dice/ASD/HD95 before and after)")
    p.add_argument(
        "--labels",
        type=int,
        nargs="+",
        metavar="L",
        help="label values to score (default the paper's 9 organs)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    add_registration_options(p)
    p.add_argument(
        "--head-masks", action="store_true", help="also draw the RA head masks (RAN models)"
    )
    p.set_defaults(func=_run)
