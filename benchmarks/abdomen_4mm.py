"""Abdomen subjects at the paper's working grid (4 mm, 96x80x128), images painted from the
shared real label maps exactly as `ranreg data synth --seed 0` paints them.

    python benchmarks/abdomen_4mm.py --out runs/abdomen-test-4mm --subjects 0027 0028 0029 0030

writes a DeepReg-layout folder (images/ + labels/, the 9 evaluated organs kept) that
`ranreg evaluate --data` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ranreg.data.io import check_out_dir, load_label_volume, save_nifti
from ranreg.data.preprocess import resample, select_labels
from ranreg.data.synth_images import labels_to_image, sample_organ_hu, subject_rng

SHARED_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "abdomen-ct-labels"
#: Subjects no shipped model trains on (file order: 14 train, 2 validation, these 4 test).
TEST_SUBJECTS = ("0027", "0028", "0029", "0030")


def subject_4mm(labels_dir: Path, name: str, seed: int = 0) -> tuple:
    """(image int16 HU, labels uint8, affine) of one subject at 4 mm."""
    vol = load_label_volume(labels_dir / f"{name}.nii.gz")
    rng = subject_rng(seed, name)  # the same draw as `ranreg data synth --seed 0`
    organ_hu = sample_organ_hu(rng, max(int(vol.array.max(initial=0)) + 1, 14), 1.0)
    image = labels_to_image(vol.array, rng, spacing=vol.spacing, organ_hu=organ_hu)
    img = resample(image, 0.5, order=1, affine=vol.affine)
    lab = resample(vol.array, 0.5, order=0, affine=vol.affine)
    return (
        np.rint(img.array).astype(np.int16),
        select_labels(lab.array).astype(np.uint8),
        img.affine,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=Path, default=SHARED_LABELS)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--subjects", nargs="+", default=list(TEST_SUBJECTS))
    args = p.parse_args()
    check_out_dir(args.out)
    for name in args.subjects:
        image, labels, affine = subject_4mm(args.labels, name)
        save_nifti(args.out / "images" / f"{name}.nii.gz", image, affine)
        save_nifti(args.out / "labels" / f"{name}.nii.gz", labels, affine)
        print(name, image.shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
