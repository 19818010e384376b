"""``ranreg register``: register a pair (or a cohort with ``--pairs``) and write the results."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ranreg.cli.options import (
    add_device_option,
    add_label_options,
    add_landmark_coordinates_option,
    add_registration_options,
    options_from_args,
)
from ranreg.data.formats import OUTPUT_FORMATS
from ranreg.errors import RanregError
from ranreg.infer import register_files
from ranreg.outputs import DDF_CONVENTION


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _shared(args: Any) -> dict[str, Any]:
    """The arguments a single pair and a cohort take alike."""
    return {
        "model": args.model,
        "device": args.device,
        "labels_to_score": args.labels,
        "label_names": args.label_names,
        "output_format": args.format,
        "landmark_coordinates": args.landmark_coordinates,
        "save_inverse": args.save_inverse,
    }


def _run(args: Any) -> int:
    if args.pairs:
        return _run_pairs(args)
    if not args.fixed or not args.moving:
        raise RanregError("register: give --fixed and --moving, or --pairs CSV")
    metrics = register_files(
        args.fixed,
        args.moving,
        args.out,
        moving_labels=args.moving_labels,
        fixed_labels=args.fixed_labels,
        head_masks=args.head_masks,
        options=options_from_args(args),
        fixed_landmarks=args.fixed_landmarks,
        moving_landmarks=args.moving_landmarks,
        fixed_mask=args.fixed_mask,
        moving_mask=args.moving_mask,
        **_shared(args),
    )
    print_report(metrics, Path(args.out), args.moving, args.fixed)
    return 0


def _check_cohort_args(args: Any) -> None:
    """``--pairs`` takes everything per pair from its list; ``--data`` goes with a key."""
    from ranreg.data.pair_lists import is_pairs_file

    per_pair = (args.fixed, args.moving, args.moving_labels, args.fixed_labels)
    if (
        any(per_pair)
        or args.fixed_mask
        or args.moving_mask
        or args.fixed_landmarks
        or args.moving_landmarks
    ):
        raise RanregError("register: --pairs takes the images from its list, not --fixed etc.")
    if args.initial_affine:
        raise RanregError(
            "register: with --pairs, give each pair's affine in an initial_affine column"
        )
    if is_pairs_file(args.pairs):
        if args.data:
            raise RanregError("register: --data goes with a Learn2Reg key in --pairs, not a CSV")
    elif not args.data:
        raise RanregError(
            f"register: --pairs {args.pairs} is not a CSV file; a Learn2Reg key needs --data, "
            "the Learn2Reg folder"
        )


def _run_pairs(args: Any) -> int:
    """``--pairs``: :func:`ranreg.cohort.register_cohort` (the model loaded once, one
    folder per pair, a summary; for a Learn2Reg key also the challenge's files)."""
    import dataclasses

    from ranreg.cohort import register_cohort
    from ranreg.learn2reg import FIELDS_FOLDER

    _check_cohort_args(args)
    settings = dataclasses.asdict(options_from_args(args))
    del settings["initial_affine"], settings["progress"]
    rows = register_cohort(
        args.pairs,
        args.out,
        data=args.data,
        progress=sys.stderr.isatty(),
        **_shared(args),
        **settings,
    )
    failed = [r for r in rows if r["status"] != "done"]
    print(f"{len(rows) - len(failed)} of {len(rows)} pairs registered; {args.out}/summary.csv")
    if args.data:
        done = len(rows) - len(failed)
        print(f"Learn2Reg displacement files: {args.out}/{FIELDS_FOLDER}/ ({done} pairs)")
    if failed:
        raise RanregError(
            f"{len(failed)} of {len(rows)} pairs failed (first: {failed[0]['name']}: "
            f"{failed[0]['error']}); see {args.out}/summary.csv"
        )
    return 0


def _steps_text(metrics: dict[str, Any]) -> str:
    aff = metrics.get("affine", {})
    parts = [f"from {aff['initial']['source']}"] if aff.get("initial") else []
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
    if "inverse" in metrics:
        rt = metrics["inverse"]["round_trip_mm"]
        mean, p95 = _fmt(rt.get("mean")), _fmt(rt.get("p95"))
        print(f"inverse_ddf.nii.gz: round-trip error mean {mean} mm, 95th percentile {p95} mm")
    if "landmarks" in metrics:
        lm = metrics["landmarks"]
        b, a = lm["before_mm"], lm["after_mm"]
        print(
            f"landmark error ({lm['count']} points) before -> after: mean {b['mean']:.2f} -> "
            f"{a['mean']:.2f} mm, max {b['max']:.2f} -> {a['max']:.2f} mm"
        )
        if lm["outside"]:
            print(
                f"warning: {lm['outside']} fixed landmarks lie outside the fixed image",
                file=sys.stderr,
            )
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
        metavar="CSV|KEY",
        help="register a cohort instead: a CSV with columns fixed, moving [, moving_labels, "
        "fixed_labels, fixed_mask, moving_mask, initial_affine, fixed_landmarks, "
        "moving_landmarks, name], or a list of a Learn2Reg folder's *_dataset.json "
        "(registration_test, registration_val, "
        "training_paired_images; with --data), which also writes the challenge's "
        "disp_FFFF_MMMM.nii.gz files into --out/learn2reg; one folder per pair in --out and a "
        "summary.csv; finished pairs are skipped when run again",
    )
    p.add_argument("--data", help="the Learn2Reg folder of --pairs KEY")
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
        "--fixed-mask",
        metavar="MASK",
        help="compare the images only inside this mask of the fixed image (non-zero: inside), "
        "in the affine stage and the optimisation, as ANTs' -x; the network sees the whole "
        "images and the field covers the whole fixed image",
    )
    p.add_argument(
        "--moving-mask",
        metavar="MASK",
        help="likewise on the moving image: compare only the fixed voxels that the transform "
        "sends inside it (e.g. to leave out an artefact only the moving image has)",
    )
    p.add_argument(
        "--fixed-landmarks",
        metavar="POINTS",
        help="landmarks of the fixed image (CSV x, y, z; Slicer .fcsv or .mrk.json); with "
        "--moving-landmarks, their error (TRE) before and after goes into metrics.json",
    )
    p.add_argument(
        "--moving-landmarks",
        metavar="POINTS",
        help="the corresponding landmarks of the moving image, in the same order",
    )
    p.add_argument(
        "--save-inverse",
        action="store_true",
        help="also write inverse_ddf.nii.gz: the inverse mapping on the moving grid (moving "
        "to fixed points, as ANTs' InverseWarp), with its round-trip error in metrics.json",
    )
    add_landmark_coordinates_option(p)
    add_label_options(p)
    add_device_option(p)
    add_registration_options(p)
    p.add_argument(
        "--initial-affine",
        metavar="FILE",
        help="start the affine stage from this fixed-to-moving ITK transform (ANTs' "
        "0GenericAffine.mat, ranreg's affine.txt, any linear .txt/.tfm/.mat/.h5) instead of "
        "the centres of mass; with --affine none it is used as it is",
    )
    p.add_argument(
        "--head-masks", action="store_true", help="also draw the RA head masks (RAN models)"
    )
    p.set_defaults(func=_run)
