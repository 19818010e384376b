"""Instance optimisation: refine one pair's displacement field by gradient descent.

A network predicts a field in one forward pass; instance optimisation then fits that field
to the pair at hand, minimising ``-local NCC(fixed, moving o u) + weight * |grad u|^2``
with Adam, starting from the network's field (as many Learn2Reg entries do). It needs no
labels and no training, costs a fraction of a second per step on a 96x80x128 grid, and is
used by ``ranreg register|evaluate|demo --refine N``.

The defaults (100 steps, weight 1, window 5, Adam step 0.1 voxel) were chosen on the two
validation pairs (subjects 0025 <-> 0026) at 4 mm, never on the test subjects
(docs/benchmarks.md). ``weight`` trades Dice for smoothness: 3 gave fields without folding
but lower Dice there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ranreg.errors import RanregError
from ranreg.losses import gradient_l2, local_ncc_loss
from ranreg.spatial import warp

#: Refinement settings chosen on the validation pairs (see the module docstring).
DEFAULT_STEPS = 100
DEFAULT_WEIGHT = 1.0
DEFAULT_WINDOW = 5
DEFAULT_LR = 0.1
#: the finest grid spacing (mm) refinement runs on; finer inputs are refined on a coarser
#: grid and the correction is resampled back (cost grows with the number of voxels)
REFINE_SPACING = 4.0


def check_refine(steps: int, weight: float) -> None:
    """One-line errors for settings that cannot work."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise RanregError(f"refine steps must be an integer >= 0, got {steps!r}")
    if not (weight >= 0 and weight < float("inf")):
        raise RanregError(f"refine weight must be a finite number >= 0, got {weight!r}")


def refine_ddf(
    ddf: Tensor,
    moving: Tensor,
    fixed: Tensor,
    steps: int = DEFAULT_STEPS,
    *,
    weight: float = DEFAULT_WEIGHT,
    window: int = DEFAULT_WINDOW,
    lr: float = DEFAULT_LR,
    mask_threshold: float | None = 0.1,
) -> Tensor:
    """Fit ``ddf`` to one pair and return the refined field (detached, float32).

    Args:
        ddf: ``(1, d, *S)`` starting field in voxels of the fixed grid (:func:`warp`'s
            convention: the moving image is sampled at ``x + ddf(x)``).
        moving: ``(1, C, *S)`` moving image on the same grid, intensities in ``[0, 1]``.
        fixed: ``(1, C, *S)`` fixed image, intensities in ``[0, 1]``.
        steps: Adam steps (0 returns ``ddf`` unchanged).
        weight: weight of the diffusion regulariser (mean squared forward differences).
        window: local NCC window (voxels per axis).
        lr: Adam step size, in voxels.
        mask_threshold: NCC is averaged where ``fixed > mask_threshold`` (body, not air).
    """
    check_refine(steps, weight)
    if steps == 0:
        return ddf.detach().float().clone()
    # callers may be inside no_grad/inference_mode (inference); the fit needs gradients, and
    # clones made here are ordinary tensors autograd may save
    with torch.inference_mode(False), torch.enable_grad():
        moving, fixed = moving.detach().float().clone(), fixed.detach().float().clone()
        u = ddf.detach().float().clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr)
        for _ in range(steps):
            loss = local_ncc_loss(
                fixed, warp(moving, u), window=window, mask_threshold=mask_threshold
            )
            loss = loss + weight * gradient_l2(u)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return u.detach()
