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

import os
from pathlib import Path
from typing import Any

from ranreg.errors import RanregError

__all__ = ["check_new_image_path", "write_new_image"]

#: Output file endings (``ranreg.data.formats.OUTPUT_FORMATS``; kept here so that the
#: parser does not import the image modules).
OUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def check_new_image_path(out: Path) -> str:
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
    from ranreg.atomic import new_file
    from ranreg.data.io import save_image

    path = Path(out)
    ext = check_new_image_path(path)
    with new_file(path, ext) as tmp:
        save_image(tmp, volume.array, volume.affine)
    return path
