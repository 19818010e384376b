"""How far the network's field is from the right size behind `--fast`: its field scaled.

    python benchmarks/network_gain.py [--model NAME_OR_DIR] [--alphas 0,0.6,0.8,1,1.2]

Registers every known-motion validation case (made by ``benchmarks/real_scans.py --split
validation``) with ``fast=True``, the network's field multiplied by each ``alpha`` (0: the
affine stage alone, 1: ``--fast`` as shipped), and prints the mean end-point error per scan
as a Markdown table with the command, date and machine. An error that falls below
``alpha = 1`` means the network overshoots, above it that it stops short; a flat curve
means the field's size is right and its error lies in its direction and shape. No file is
written.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import provenance
from real_scans import ROOT, SCANS, epe_scores

WORK = ROOT / "work-data" / "real-scans" / "cases"
VALIDATION = [scan for scan in SCANS if scan.split == "validation"]


class Scaled(torch.nn.Module):
    """``model`` with its field multiplied by ``alpha`` (config kept: same grid, window)."""

    def __init__(self, model: torch.nn.Module, alpha: float) -> None:
        super().__init__()
        self.model, self.alpha, self.config = model, alpha, model.config

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.model(moving, fixed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the packaged default")
    p.add_argument("--alphas", default="0,0.6,0.8,1,1.2")
    args = p.parse_args()
    from ranreg.api import register
    from ranreg.models import resolve_model

    alphas = [float(a) for a in args.alphas.split(",")]
    model = resolve_model(args.model)
    if not WORK.is_dir():
        raise SystemExit(f"error: {WORK} not found; run benchmarks/real_scans.py first")
    rows = {}
    for scan in VALIDATION:
        for folder in sorted((WORK / scan.name).iterdir()):
            for alpha in alphas:
                reg = register(folder / "fixed.nii.gz", scan.image,
                               model=Scaled(model, alpha), fast=True)  # fmt: skip
                epe = epe_scores(np.asarray(reg.result.ddf_mm), folder)["epe_mm"]
                rows.setdefault((scan.name, alpha), []).append(epe)
    print("\n".join(provenance()))
    print("\n| alpha | " + " | ".join(f"{s.name} EPE (mm)" for s in VALIDATION) + " |")
    print("|---:|" + "---:|" * len(VALIDATION))
    for alpha in alphas:
        means = [f"{np.mean(rows[(s.name, alpha)]):.3f}" for s in VALIDATION]
        print(f"| {alpha:g} | " + " | ".join(means) + " |")


if __name__ == "__main__":
    main()
