"""Training pairs with a known field: one subject's anatomy under a random deformation.

The paper's stage 1 (supplement section 3) registers an image to a copy of itself warped
by a known synthetic field and supervises the network with that field (Eq. 11). Here the
copy can also differ in contrast (:mod:`ranreg.data.contrast`), the field can be a sliding
motion of organ groups, or nothing at all (an identity pair: the same anatomy with
independent noise, target 0), and a pair can be turned round so that a batch holds both
directions of one pair (inverse consistency, see :func:`swapped`).

Conventions are those of :mod:`ranreg.synth`: the field lives on the fixed grid, in voxels,
and ``fixed(x) = moving(x + ddf(x))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ranreg.data.contrast import random_contrast_image, tissue_map
from ranreg.sliding import random_sliding_ddf
from ranreg.spatial import compose_ddf, warp, warp_labels
from ranreg.synth import random_ddf

__all__ = [
    "STYLES",
    "PairRecipe",
    "augment_batch",
    "invert_ddf",
    "make_pair",
    "swapped",
    "warp_array",
]

#: image styles: the subject's own image (painted CT look or a real scan) or random contrast
STYLES = ("image", "random")


@dataclass
class PairRecipe:
    """How :func:`make_pair` draws a pair; probabilities are per pair.

    ``styles``: relative weights of :data:`STYLES`. ``identity``: share of identity pairs.
    ``sliding``: share of the other pairs whose field is a sliding motion of organ groups
    (:func:`ranreg.sliding.random_sliding_ddf`, needs labels); the rest get
    :func:`ranreg.synth.random_ddf` with ``deformation`` as keyword arguments.
    ``same_contrast``: chance that a random-contrast pair shares one contrast draw.
    ``noise``: sd of the independent gaussian noise added to each image of an
    image-style pair. ``stage1``: share of the non-identity fields drawn with the paper's
    stage-1 ranges (:func:`ranreg.synth.random_ddf` defaults: rotations up to 45 degrees
    about a random axis, shifts of 10 % of the grid) instead of ``deformation``.
    ``field_scale``: ``(lo, hi)``, every non-identity field multiplied by a factor drawn
    log-uniformly from it, so that small motions (what an affine pre-alignment leaves)
    are as common as large ones; None draws nothing (random streams unchanged).
    """

    styles: dict[str, float] = field(default_factory=lambda: {"image": 1.0})
    identity: float = 0.0
    sliding: float = 0.0
    same_contrast: float = 0.5
    noise: float = 0.02
    deformation: dict[str, Any] = field(default_factory=dict)
    sliding_deformation: dict[str, Any] = field(default_factory=dict)
    stage1: float = 0.0
    field_scale: Sequence[float] | None = None


def _draw_field(
    shape: tuple[int, ...], labels: np.ndarray | None, rng: np.random.Generator, r: PairRecipe
) -> np.ndarray:
    if rng.random() < r.identity:
        return np.zeros((len(shape), *shape), dtype=np.float32)
    if labels is not None and rng.random() < r.sliding:
        ddf = random_sliding_ddf(labels, rng, **r.sliding_deformation)[0]
    elif r.stage1 > 0 and rng.random() < r.stage1:
        ddf = random_ddf(shape, rng)[0]
    else:
        ddf = random_ddf(shape, rng, **r.deformation)[0]
    if r.field_scale is None:
        return ddf
    lo, hi = np.log(r.field_scale)
    return (ddf * np.exp(rng.uniform(lo, hi))).astype(np.float32)


def _style(rng: np.random.Generator, r: PairRecipe, has_labels: bool) -> str:
    names = [s for s in STYLES if r.styles.get(s, 0) > 0 and (s == "image" or has_labels)]
    if not names:
        return "image"
    weights = np.array([r.styles[s] for s in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def warp_array(array: np.ndarray, ddf: np.ndarray, labels: bool) -> np.ndarray:
    """One image or label map (*S) warped by one field (d, *S) in voxels: linear, or
    nearest neighbour for ``labels`` (:func:`ranreg.spatial.warp`, ``warp_labels``)."""
    t = torch.from_numpy(np.ascontiguousarray(array))[None, None]
    d = torch.from_numpy(np.ascontiguousarray(ddf))[None]
    if labels:
        return warp_labels(t, d)[0, 0].numpy()
    return warp(t.float(), d)[0, 0].numpy()


def make_pair(
    image: np.ndarray,
    labels: np.ndarray | None,
    spacing: tuple[float, ...],
    rng: np.random.Generator,
    recipe: PairRecipe,
    tissues: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One pair: ``moving``, ``fixed`` (float32 (*S), [0, 1]), ``ddf_true`` (d, *S),
    ``image_weight`` (1, or 0 for random-contrast images of two contrast draws) and,
    with labels, ``moving_label``/``fixed_label`` (int64, the fixed one warped exactly as
    the image: nearest neighbour). ``tissues``: the tissue map that random-contrast pairs
    are painted from (default: a fresh :func:`~ranreg.data.contrast.tissue_map` of the
    labels, which needs 3D; 2D slices pass a slice of a 3D map)."""
    shape = tuple(image.shape)
    ddf_np = _draw_field(shape, labels, rng, recipe)
    style = _style(rng, recipe, labels is not None)
    # the image term (MSE of warped moving and fixed) means something only where the two
    # images share one contrast: 0 for random-contrast pairs painted with two draws
    out: dict[str, np.ndarray] = {"ddf_true": ddf_np, "image_weight": np.float32(1.0)}
    if style == "random":
        assert labels is not None
        if tissues is None:
            tissues = tissue_map(labels, spacing, rng)
        seeds = rng.integers(2**62, size=2)
        if rng.random() < recipe.same_contrast:
            seeds[1] = seeds[0]
        out["image_weight"] = np.float32(seeds[1] == seeds[0])
        paint = [np.random.default_rng(int(s)) for s in seeds]
        out["moving"] = random_contrast_image(tissues, paint[0], spacing=spacing)
        fixed_tissues = warp_array(tissues.astype(np.int64), ddf_np, labels=True)
        out["fixed"] = random_contrast_image(fixed_tissues, paint[1], spacing=spacing)
    else:
        moving = np.asarray(image, dtype=np.float32)
        fixed = warp_array(moving, ddf_np, labels=False)
        noise = [recipe.noise * rng.standard_normal(shape, dtype=np.float32) for _ in range(2)]
        out["moving"] = np.clip(moving + noise[0], 0.0, 1.0)
        out["fixed"] = np.clip(fixed + noise[1], 0.0, 1.0)
    if labels is not None:
        out["moving_label"] = labels.astype(np.int64)
        out["fixed_label"] = warp_array(out["moving_label"], ddf_np, labels=True)
    return out


@torch.no_grad()
def invert_ddf(ddf: torch.Tensor, iterations: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, residual)``: the field of the inverse mapping by the fixed-point iteration
    ``v(y) = -u(y + v(y))``, and ``|v(y) + u(y + v(y))|`` (voxels) where it stopped;
    where the mapping folds or leaves the grid the residual stays large."""
    v = -ddf
    for _ in range(iterations):
        v = -warp(ddf, v)
    residual = compose_ddf(ddf, v).norm(dim=1)
    return v, residual


def swapped(pair: dict[str, np.ndarray], tolerance: float = 0.25) -> dict[str, np.ndarray]:
    """The pair turned round: fixed becomes moving, the target is the inverse field, and
    ``ddf_weight`` is 0 where that inverse is not defined (residual above ``tolerance``)."""
    v, residual = invert_ddf(torch.from_numpy(pair["ddf_true"])[None])
    out = {"moving": pair["fixed"], "fixed": pair["moving"], "ddf_true": v[0].numpy()}
    out["ddf_weight"] = (residual[0] <= tolerance).numpy().astype(np.float32)
    if "image_weight" in pair:
        out["image_weight"] = pair["image_weight"]
    if "moving_label" in pair:
        out["moving_label"], out["fixed_label"] = pair["fixed_label"], pair["moving_label"]
    return out


def augment_batch(
    sample: dict[str, np.ndarray], rng: np.random.Generator, permute: bool = True
) -> dict[str, np.ndarray]:
    """A random axis permutation and flips applied to every array of a pair (images and
    labels (*S), fields (d, *S) with their components moved and signed to match), so that
    a network cannot memorise the orientation. Draw ``rng`` once per batch: the shapes of
    a batch must agree."""
    d = sample["moving"].ndim
    perm = rng.permutation(d) if permute else np.arange(d)
    flips = [a for a in range(d) if rng.random() < 0.5]
    out = {}
    for key, value in sample.items():
        if np.ndim(value) == 0:  # per-pair numbers (image_weight) have no axes
            out[key] = value
            continue
        if key == "ddf_true":
            arr = np.transpose(value[perm], (0, *(1 + perm)))
            for a in flips:
                arr = np.flip(arr, axis=1 + a)
                arr[a] = -arr[a]
        else:
            arr = np.transpose(value, perm)
            for a in flips:
                arr = np.flip(arr, axis=a)
        out[key] = np.ascontiguousarray(arr)
    return out
