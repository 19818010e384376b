"""``ranreg apply``: resample another image through a registration result."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ranreg.apply import check_new_image_path, write_new_image


def _run(args: argparse.Namespace) -> int:
    from ranreg.transform import Transform, as_volume, interpolation, read_grid

    out = Path(args.out)
    check_new_image_path(out)
    mode = interpolation(args.labels, args.interp)
    transform = Transform.load(args.transform)
    reference = None if args.reference is None else read_grid(args.reference)
    image = as_volume(args.image, "image", labels=args.labels)
    note = ""
    if args.inverse:
        transform = transform.inverse(reference)  # defined on REF (or the moving grid)
        reference = None
        note = "; " + _round_trip_text(transform)
    result = transform.apply(image, labels=args.labels, interp=args.interp, reference=reference)
    write_new_image(out, result)
    what = "the inverse of" if args.inverse else "the transform"
    kind = "label map, nearest" if args.labels else mode
    print(
        f"applied {what} {args.transform} to {args.image} ({kind}) on "
        f"{transform.grid.describe() if reference is None else reference.describe()}: "
        f"wrote {out}{note}"
    )
    return 0


def _round_trip_text(inverse: Any) -> str:
    rt, inv = inverse.round_trip_mm or {}, inverse.inversion or {}
    if rt.get("mean") is None:
        return "round-trip error not measured (no fixed point maps onto the moving grid)"
    text = (
        f"round-trip error |u(p) + w(p + u(p))| mean {rt['mean']:.3f} mm, 95th percentile "
        f"{rt['p95']:.3f} mm ({inv.get('iterations')} iterations"
    )
    if inv.get("converged", True):
        return text + ")"
    share = 100 * float(inv.get("unconverged_fraction", 0.0))
    return text + f"; {share:.3f} % of the points did not converge)"


def add_parser(sub: Any) -> None:
    from ranreg.cli import command_help

    p = sub.add_parser(
        "apply",
        help=command_help("apply"),
        description="Resample IMAGE, which lives in the moving space of a `ranreg register` "
        "result, onto the fixed grid (or --reference) through the result's whole mapping "
        "(ddf.nii.gz). With --inverse, IMAGE lives in the fixed space and goes to the moving "
        "grid (or --reference) through the inverse mapping, and the inverse's round-trip error "
        "is printed. OUT is a new .nii.gz, .nii, .nrrd or .mha file; an existing one is never "
        "overwritten.",
    )
    p.add_argument("--transform", required=True, help="result folder of `ranreg register`")
    p.add_argument(
        "--image",
        required=True,
        help="image or label map to resample (NIfTI, NRRD, MetaImage or a DICOM folder)",
    )
    p.add_argument(
        "--out", required=True, help="output file: .nii.gz, .nii, .nrrd or .mha (must not exist)"
    )
    p.add_argument(
        "--labels",
        action="store_true",
        help="IMAGE is a label map: nearest neighbour, integer type kept, 0 outside",
    )
    p.add_argument(
        "--interp",
        choices=("linear", "nearest", "bspline"),
        default=None,
        help="interpolation of images (default linear; bspline: cubic B-spline)",
    )
    p.add_argument(
        "--inverse",
        action="store_true",
        help="IMAGE is in fixed space: bring it to the moving grid through the inverse",
    )
    p.add_argument(
        "--reference",
        help="image whose grid the output takes (default: the fixed grid, or with --inverse "
        "the moving grid of the registration)",
    )
    p.set_defaults(func=_run)
