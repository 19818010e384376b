"""``ranreg apply``: resample another image, or map points, through a registration result."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ranreg.apply import check_new_image_path, write_new_image
from ranreg.errors import RanregError


def _run(args: argparse.Namespace) -> int:
    if args.points is not None:
        return _run_points(args)
    if args.coordinates is not None:
        raise RanregError("--coordinates is for --points (an image carries its own geometry)")
    from ranreg.transform import Transform, as_volume, interpolation, read_grid

    out = Path(args.out)
    check_new_image_path(out)
    mode = interpolation(args.labels, args.interp)
    transform = Transform.load(args.transform)
    reference = None if args.reference is None else read_grid(args.reference)
    image = as_volume(args.image, "image", labels=args.labels)
    note = ""
    if args.inverse:
        saved = None if reference is not None else Transform.load_inverse(args.transform)
        # the inverse saved by `register --save-inverse`, or computed on REF (or the
        # moving grid)
        transform = saved or transform.inverse(reference)
        reference = None
        note = "; " + _round_trip_text(transform)
        if saved is not None:
            note += f" (saved {saved.origin})"
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


def _run_points(args: argparse.Namespace) -> int:
    from ranreg.points import check_points_out, map_points_file
    from ranreg.transform import Transform

    for flag, value in (("--labels", args.labels), ("--interp", args.interp)):
        if value:
            raise RanregError(f"{flag} is for --image; points are mapped, not resampled")
    if args.reference is not None:
        raise RanregError("--reference is for --image; points keep no grid")
    check_points_out(args.out, args.points)
    transform = Transform.load(args.transform)
    done = map_points_file(
        transform, args.points, args.out, inverse=args.inverse, coordinates=args.coordinates
    )
    spaces, note = "fixed space to the moving space", ""
    if args.inverse:
        spaces = "moving space to the fixed space"
        note = f"; inverse solved at each point, residual at most {done['residual_max_mm']:.4f} mm"
    system = done["system"] if done["system"] == "voxel indices" else f"{done['system']}, mm"
    if done["outside"]:
        print(
            f"warning: {done['outside']} of {done['points']} points lie outside the field's "
            "grid, where its displacement is extrapolated",
            file=sys.stderr,
        )
    print(
        f"mapped {done['points']} points ({system}) of {args.points} from the "
        f"{spaces} through {args.transform}: wrote {args.out}{note}"
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
        "overwritten. With --points, landmarks of the fixed space go to the moving space (with "
        "--inverse: moving to fixed) into the new file OUT of the same format: a CSV (columns "
        "x, y, z in mm, LPS as ITK and ANTs write them, or --coordinates ras; other columns "
        "kept; or voxel indices with --coordinates voxel, header optional, as Learn2Reg's "
        "keypoints), or 3D Slicer's .fcsv or .mrk.json (in the system the file names).",
    )
    p.add_argument("--transform", required=True, help="result folder of `ranreg register`")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--image",
        help="image or label map to resample (NIfTI, NRRD, MetaImage or a DICOM folder)",
    )
    what.add_argument(
        "--points",
        help="points to map: a CSV with a header x, y, z (mm), a Slicer .fcsv or .mrk.json",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output file: .nii.gz, .nii, .nrrd or .mha (with --points: the points' format); "
        "must not exist",
    )
    p.add_argument(
        "--coordinates",
        choices=("lps", "ras", "voxel"),
        default=None,
        help="with --points: the axes of a CSV's x, y, z, world lps (ITK, ANTs; default) or "
        "ras (NIfTI), or voxel: 0-based indices of the fixed image's array (of the moving "
        "image's with --inverse; Learn2Reg keypoints), written as the other image's; files "
        "that name theirs (Slicer's) take none",
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
        help="through the inverse: IMAGE lives in fixed space, or the points in moving space",
    )
    p.add_argument(
        "--reference",
        help="image whose grid the output takes (default: the fixed grid, or with --inverse "
        "the moving grid of the registration)",
    )
    p.set_defaults(func=_run)
