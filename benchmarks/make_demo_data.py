"""Build the registration pair shipped inside the package for `ranreg demo`.

Two of the shared real abdomen label maps that no shipped model trains on (0027 as
moving, 0028 as fixed) at 4 mm (96x80x128), images painted as `ranreg data synth --seed 0`
does (see abdomen_4mm.py):

    python benchmarks/make_demo_data.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from abdomen_4mm import subject_4mm
from common import SHARED_LABELS

from ranreg.data.io import save_nifti

OUT = Path(__file__).resolve().parents[1] / "src" / "ranreg" / "demo_data"
PAIR = {"moving": "0027", "fixed": "0028"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=Path, default=SHARED_LABELS)
    args = p.parse_args()
    for role, name in PAIR.items():
        image, labels, affine = subject_4mm(args.labels, name)
        save_nifti(OUT / f"{role}_image.nii.gz", image, affine)
        save_nifti(OUT / f"{role}_labels.nii.gz", labels, affine)
        print(role, name, image.shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
