"""Build the registration pair shipped inside the package for `ranreg demo`.

Two of the shared real abdomen label maps that no shipped model trains on (0027 as
moving, 0028 as fixed), CT-like images painted from them exactly as `ranreg data synth
--seed 0` does, resampled by 0.5 to 4 mm (96x80x128), with the 9 evaluated organs kept.

    python benchmarks/make_demo_data.py [--labels ../shared/data/abdomen-ct-labels]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ranreg.data.io import load_label_volume, save_nifti
from ranreg.data.preprocess import resample, select_labels
from ranreg.data.synth_images import labels_to_image, sample_organ_hu, subject_rng

OUT = Path(__file__).resolve().parents[1] / "src" / "ranreg" / "demo_data"
PAIR = {"moving": "0027", "fixed": "0028"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "abdomen-ct-labels"
    p.add_argument("--labels", type=Path, default=default)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for role, name in PAIR.items():
        vol = load_label_volume(args.labels / f"{name}.nii.gz")
        rng = subject_rng(0, name)  # the same draw as `ranreg data synth --seed 0`
        n_labels = max(int(vol.array.max(initial=0)) + 1, 14)
        organ_hu = sample_organ_hu(rng, n_labels, 1.0)
        image = labels_to_image(vol.array, rng, spacing=vol.spacing, organ_hu=organ_hu)
        img = resample(image, 0.5, order=1, affine=vol.affine)
        lab = resample(vol.array, 0.5, order=0, affine=vol.affine)
        save_nifti(OUT / f"{role}_image.nii.gz", np.rint(img.array).astype(np.int16), img.affine)
        save_nifti(
            OUT / f"{role}_labels.nii.gz", select_labels(lab.array).astype(np.uint8), lab.affine
        )
        print(role, name, img.array.shape, img.spacing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
