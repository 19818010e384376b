"""Network time of `ranreg register --fast` at the trained and at the finer grid.

    python benchmarks/fast_grid.py [--image ../shared/data/real-scans/chest-ct-1p5mm.nii.gz]

Registers one scan to itself with the packaged default network and ``fast=True`` at its
trained 8 mm and at the 4 mm that ``--fast`` uses, with one pass and with the 8 flips of
``--tta``; the best of two calls after a warm-up. Prints a Markdown table with the command,
date and machine (the accuracy of the same settings: docs/registration.md); no file is
written.
"""

from __future__ import annotations

import argparse

from common import provenance

SETTINGS = (
    ("8 mm, one pass", {"network_spacing": 8.0}),
    ("8 mm, 8 flips", {"network_spacing": 8.0, "tta": True}),
    ("4 mm, one pass (`--fast`)", {}),
    ("4 mm, 8 flips (`--fast --tta`)", {"tta": True}),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default="../shared/data/real-scans/chest-ct-1p5mm.nii.gz")
    args = p.parse_args()
    from ranreg.data.io import load_nifti
    from ranreg.models import resolve_model
    from ranreg.pipeline import register_volumes

    image = load_nifti(args.image)
    model = resolve_model(None)
    register_volumes(model, image, image, fast=True)  # warm-up
    print("\n".join(provenance()))
    print("\n| network grid | cells | network s | whole registration s |\n|---|---|---:|---:|")
    for label, settings in SETTINGS:
        runs = [register_volumes(model, image, image, fast=True, **settings) for _ in range(2)]
        best = min(runs, key=lambda r: r.network_s)
        cells = "x".join(str(n) for n in best.network_shape)
        print(f"| {label} | {cells} | {best.network_s:.2f} | {best.runtime_s:.2f} |")


if __name__ == "__main__":
    main()
