"""How far the network's field is from the right size and shape behind `--fast`.

    python benchmarks/network_gain.py [--model NAME_OR_DIR] [--alphas 0,0.6,0.8,1,1.2]
                                      [--sigmas 0]

Registers every known-motion validation case (made by ``benchmarks/real_scans.py --split
validation``) with ``fast=True``, the network's field on its grid smoothed by a gaussian of
each ``sigma`` (in network voxels; 0: not smoothed) and multiplied by each ``alpha`` (0:
the affine stage alone, 1: ``--fast`` as shipped), and prints the mean end-point error per
scan as a Markdown table with the command, date and machine. An error that falls below
``alpha = 1`` means the network overshoots, above it that it stops short; a flat curve
means the field's size is right and its error lies in its direction and shape. An error
that falls with ``sigma`` means that part of that shape error is rougher than the motion.
No file is written.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import provenance
from monai.networks.layers import GaussianFilter
from real_scans import ROOT, SCANS, epe_scores

WORK = ROOT / "work-data" / "real-scans" / "cases"
VALIDATION = [scan for scan in SCANS if scan.split == "validation"]


class Scaled(torch.nn.Module):
    """``model`` with its field smoothed by a gaussian of ``sigma`` network voxels, then
    multiplied by ``alpha`` (config kept: same grid, window)."""

    def __init__(self, model: torch.nn.Module, alpha: float, sigma: float = 0.0) -> None:
        super().__init__()
        self.model, self.alpha, self.sigma, self.config = model, alpha, sigma, model.config

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        ddf = self.model(moving, fixed)
        return self.alpha * (blurred(ddf, self.sigma) if self.sigma > 0 else ddf)


def blurred(ddf: torch.Tensor, sigma: float) -> torch.Tensor:
    """``ddf`` smoothed by a gaussian of ``sigma`` voxels, per component, in float32
    outside autocast (bf16 convolutions with long 1D kernels crawl on CPUs), as a
    normalised convolution so that the zero padding does not pull the edges to zero."""
    blur = GaussianFilter(ddf.dim() - 2, sigma=sigma).to(ddf.device)
    with torch.autocast(ddf.device.type, enabled=False):
        ones = torch.ones_like(ddf[:, :1], dtype=torch.float32)
        return blur(ddf.float()) / blur(ones)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the packaged default")
    p.add_argument("--alphas", default="0,0.6,0.8,1,1.2")
    p.add_argument("--sigmas", default="0", help="gaussian widths, network voxels")
    args = p.parse_args()
    from ranreg.api import register
    from ranreg.models import resolve_model

    settings = [
        (float(a), float(s)) for s in args.sigmas.split(",") for a in args.alphas.split(",")
    ]
    model = resolve_model(args.model)
    if not WORK.is_dir():
        raise SystemExit(f"error: {WORK} not found; run benchmarks/real_scans.py first")
    rows = {}
    for scan in VALIDATION:
        for folder in sorted((WORK / scan.name).iterdir()):
            start: dict = {}  # the affine stage runs once per case, then is reused as it is
            for alpha, sigma in settings:
                reg = register(folder / "fixed.nii.gz", scan.image,
                               model=Scaled(model, alpha, sigma), fast=True, **start)  # fmt: skip
                start = {"affine": "none", "initial_affine": reg.result.world_map}
                epe = epe_scores(np.asarray(reg.result.ddf_mm), folder)["epe_mm"]
                rows.setdefault((scan.name, alpha, sigma), []).append(epe)
    print("\n".join(provenance()))
    heads = " | ".join(f"{s.name} EPE (mm)" for s in VALIDATION)
    print(f"\n| sigma (network voxels) | alpha | {heads} |")
    print("|---:|---:|" + "---:|" * len(VALIDATION))
    for alpha, sigma in settings:
        means = [f"{np.mean(rows[(s.name, alpha, sigma)]):.3f}" for s in VALIDATION]
        print(f"| {sigma:g} | {alpha:g} | " + " | ".join(means) + " |")


if __name__ == "__main__":
    main()
