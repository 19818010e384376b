"""The loss of each training stage (supplement section 3 and the paper's Eq. 11).

``synthetic``: w_ddf MSE to the known field (0 where a turned-round pair's field is not
defined) + w_smooth |grad u|^2 + w_image MSE(warped, fixed) + w_inverse inverse
consistency (batches of swapped pairs). ``unsupervised``: w_similarity (-local NCC or MSE)
+ w_smooth edge-aware smoothness + w_dice Dice of warped organ labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ranreg import losses
from ranreg.config import StageConfig
from ranreg.spatial import compose_ddf, one_hot, warp

__all__ = ["image_term", "inverse_consistency", "organ_classes", "stage_loss"]


def organ_classes(present: Sequence[int], organs: Sequence[int]) -> torch.Tensor:
    """Label value -> Dice class (0 background, 1..K the organs in order)."""
    classes = torch.zeros(max([0, *present, *organs]) + 1, dtype=torch.long)
    for k, organ in enumerate(organs, start=1):
        classes[organ] = k
    return classes


def stage_loss(
    stage: StageConfig,
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: dict[str, torch.Tensor],
    classes: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss of one batch and its terms (as floats, for the logs).

    ``classes`` maps label values to Dice classes (0 = background, 1..K = the organs).
    """
    w = stage.weights
    moving = batch["moving"]
    terms: dict[str, torch.Tensor] = {}
    if stage.kind == "synthetic":
        ddf_true = batch["ddf_true"]
        fixed = batch.get("fixed")
        if fixed is None:  # the paper's stage 1: the moving image under the known field
            with torch.no_grad():
                fixed = warp(moving, ddf_true, padding_mode="zeros")
        ddf = model(moving, fixed).float()
        terms["ddf"] = losses.mse_loss(ddf, ddf_true, batch.get("ddf_weight"))
        terms["smooth"] = losses.gradient_l2(ddf)
        if w["image"] > 0:
            warped = warp(moving, ddf, padding_mode="zeros")
            terms["image"] = image_term(warped, fixed, batch.get("image_weight"))
        if stage.swap and w["inverse"] > 0:
            terms["inverse"] = inverse_consistency(ddf)
    else:
        fixed = batch["fixed"]
        ddf = model(moving, fixed)
        warped = warp(moving, ddf)
        if stage.similarity == "ncc":
            terms["similarity"] = losses.local_ncc_loss(
                fixed, warped, window=stage.ncc_window, mask_threshold=stage.mask_threshold
            )
        else:
            mask = None if stage.mask_threshold is None else fixed > stage.mask_threshold
            terms["similarity"] = losses.mse_loss(warped, fixed, mask)
        terms["smooth"] = losses.edge_aware_smoothness(ddf, fixed, alpha=stage.edge_alpha)
        if w["dice"] > 0 and "moving_label" in batch:
            k = int(classes.max()) + 1
            moved = warp(one_hot(classes[batch["moving_label"]], k), ddf)
            terms["dice"] = losses.dice_loss(moved, one_hot(classes[batch["fixed_label"]], k))
    total = sum(w[k] * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}


def image_term(
    warped: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE of the warped moving and the fixed image; with ``weight`` (B,), the weighted
    mean of the pairs' MSEs (pairs of different contrasts weigh 0; all 0 gives 0)."""
    mask = None if weight is None else weight.reshape(-1, *[1] * (warped.dim() - 1))
    return losses.mse_loss(warped, fixed, mask)


def inverse_consistency(ddf: torch.Tensor) -> torch.Tensor:
    """Mean squared round trip ``|u_ab(x) + u_ba(x + u_ab(x))|^2`` (voxels^2) over the
    batch's pairs of slots ``(a, b), (b, a)``, both ways: zero when the two fields are
    each other's inverse."""
    ab, ba = ddf[0::2], ddf[1::2]
    there = compose_ddf(ba, ab).square().sum(1).mean()
    back = compose_ddf(ab, ba).square().sum(1).mean()
    return 0.5 * (there + back)
