"""Abdomen subjects at the paper's working grid (4 mm, 96x80x128), images painted from the
shared real label maps exactly as `ranreg data synth --seed 0` paints them.

    python benchmarks/abdomen_4mm.py --out runs/abdomen-test-4mm --subjects 0027 0028 0029 0030

writes a DeepReg-layout folder (images/ + labels/, the 9 evaluated organs kept) that
`ranreg evaluate --data` reads. ``--factor 1`` keeps the 2 mm source grid (192x160x256).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import SHARED_LABELS, TEST_SUBJECTS, painted_subject

from ranreg.atomic import check_out_dir
from ranreg.data.io import save_nifti


def subject_4mm(labels_dir: Path, name: str, seed: int = 0) -> tuple:
    """(image int16 HU, labels uint8, affine) of one subject at 4 mm."""
    return painted_subject(labels_dir, name, 0.5, seed)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=Path, default=SHARED_LABELS)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--subjects", nargs="+", default=list(TEST_SUBJECTS))
    p.add_argument("--factor", type=float, default=0.5, help="resampling factor (0.5: 4 mm)")
    args = p.parse_args()
    check_out_dir(args.out)
    for name in args.subjects:
        image, labels, affine = painted_subject(args.labels, name, args.factor)
        save_nifti(args.out / "images" / f"{name}.nii.gz", image, affine)
        save_nifti(args.out / "labels" / f"{name}.nii.gz", labels, affine)
        print(name, image.shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
