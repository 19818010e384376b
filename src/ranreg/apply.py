"""``ranreg apply``: bring another image through a registration result (or its inverse).

``ranreg apply --transform RESULT --image IMG --out OUT`` resamples an image that lives in
the moving space of ``ranreg register --out RESULT`` onto the fixed grid (or onto
``--reference``), through the whole mapping in ``RESULT/ddf.nii.gz``. With ``--inverse``
the image lives in the fixed space and goes to the moving grid (or ``--reference``)
through the inverse mapping (:meth:`ranreg.transform.Transform.inverse`), whose round-trip
error is printed. ``--labels`` resamples a label map with nearest neighbour and keeps its
integer type; images are linear (or ``--interp nearest|bspline``) and stay float.
``OUT`` (NIfTI, NRRD or MetaImage, by its name) is never overwritten, and is written
through a temporary file.
"""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path
from typing import Any

from ranreg.errors import RanregError

__all__ = ["add_parser", "write_new_image"]

#: Output file endings (``ranreg.data.formats.OUTPUT_FORMATS``; kept here so that the
#: parser does not import the image modules).
OUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def _check_out(out: Path) -> str:
    """The format ending of a new output file, as spelled in its name; refuses an
    existing file and other endings."""
    if out.exists() or out.is_symlink():
        raise RanregError(f"{out}: exists; refusing to overwrite it")
    for ext in OUT_SUFFIXES:
        if out.name.lower().endswith(ext) and len(out.name) > len(ext):
            return out.name[-len(ext) :]
    raise RanregError(f"{out}: output file name must end with {', '.join(OUT_SUFFIXES)}")


def write_new_image(out: str | os.PathLike[str], volume: Any) -> Path:
    """Write ``volume`` to the new file ``out`` in the format its name says
    (:func:`ranreg.data.io.save_image`): to a temporary file in the same folder first, then
    linked into place, which fails rather than replace a file that appeared meanwhile."""
    from ranreg.data.io import save_image

    path = Path(out)
    ext = _check_out(path)
    tmp = path.with_name(f".{path.name[: -len(ext)]}.{os.getpid()}.{uuid.uuid4().hex[:8]}{ext}")
    try:
        save_image(tmp, volume.array, volume.affine)
        try:
            os.link(tmp, path)  # atomic and never overwrites
        except FileExistsError:
            raise RanregError(f"{path}: exists; refusing to overwrite it") from None
        except OSError:  # a file system without hard links
            _check_out(path)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _run(args: argparse.Namespace) -> int:
    from ranreg.transform import Transform, as_volume, interpolation, read_grid

    out = Path(args.out)
    _check_out(out)
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
