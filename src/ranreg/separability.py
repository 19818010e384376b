"""Motion separability: the Theorem-1 bound and a sliding-boundary probe of a network.

The *motion separability* ``Delta_inf(p)`` of a network is the largest difference
``||phi(x) - phi(y)||_inf`` (voxels) that its DDF ``phi`` can show between two points
``x, y`` at L-inf distance ``||x - y||_inf = p`` (voxels of the input grid). A
coarse-to-fine network predicts level k's DDF on a grid pooled by ``p_k`` (Eq. 1,
``P(x; p_k) = floor(x / p_k)``) and two points in one pooling cell get the same level-k
displacement (Eq. 4). Level k can add at most ``2 a_k`` to the difference of two points
it separates, ``a_k = p_k (1 + 2 ||r_k||_1) / 2`` being its capturable motion range
(:func:`ranreg.nn.variants.capturable_range`), and Eq. (9)-(10) sum these over levels.

Theorem 1 as implemented here (:func:`theoretical_separability`)::

    Delta_inf(p) <= B(p) = sum_k [level k separates points at distance p] * 2 a_k

with two readings of "separates":

``mode="all"`` (default, Eq. 3/5, "for all" placements): level k counts when
    ``p >= p_k``. Points closer than ``p_k`` can share a level-k cell (Eq. 2), so only
    from ``p >= p_k`` on is level k *guaranteed* to give the two points their own
    displacements, wherever the pair sits on the grid. This is the worst case over
    placements and the reading behind the paper's claim that more motion-separable
    layers (small ``p_k``) raise ``Delta_inf`` at small ``p``.
``mode="best"`` (Eq. 2 negated, "there exists" a placement): level k counts when
    ``p >= 1``: two distinct voxels (integer L-inf distance >= 1) may straddle a cell
    border of any level, so every level can separate them for a lucky placement.

``B(0) = 0`` in both readings (one point). The bound is evaluated at the distance of the
two points on the input grid; the drift of the points' distance through the levels
(the ``sum Delta psi`` terms in the distance conditions of Eq. 10) is not modelled.

:func:`empirical_separability` measures what a network actually produces across a
sliding boundary (see its docstring for the probe), :func:`plot_separability` draws both,
and ``ranreg separability`` prints and saves them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ranreg.nn import MODEL_NAMES
from ranreg.nn.ran import RegistrationOutput
from ranreg.nn.variants import NO_RA_SUFFIX, VARIANTS, Variant, capturable_range
from ranreg.sliding import shapes_regions, sliding_ddf

__all__ = [
    "DEFAULT_DISTANCES",
    "DEFAULT_SHIFTS",
    "MODES",
    "boundary_jumps",
    "empirical_separability",
    "resolve_variant",
    "separating_levels",
    "sliding_pair",
    "theoretical_separability",
]

#: Reading of "level k separates two points at distance p" (see the module docstring).
MODES: tuple[str, ...] = ("all", "best")

#: Distances (voxels) the CLI reports by default.
DEFAULT_DISTANCES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)

#: Half-jumps s (voxels) of the sliding probes: the halves move by -s and +s.
DEFAULT_SHIFTS: tuple[float, ...] = (2.0, 4.0, 8.0)


# --------------------------------------------------------------------------------------------
# Theorem 1
# --------------------------------------------------------------------------------------------


def resolve_variant(variant_or_name: str | Variant | nn.Module) -> Variant:
    """The :class:`Variant` (pooling sizes and dilations) of a name, variant or RAN model.

    Names match case-insensitively; ``-noRA`` ablations share their variant's scales and
    dilations. ``VoxelMorph`` (name or model) raises ``ValueError``: a single-level U-Net
    regressing one full-resolution DDF has no pooling-level structure for Theorem 1.
    """
    if isinstance(variant_or_name, Variant):
        return variant_or_name
    if isinstance(variant_or_name, nn.Module):
        variant = getattr(variant_or_name, "variant", None)
        if isinstance(variant, Variant):
            return variant
        name = getattr(variant_or_name, "config", {}).get("name", type(variant_or_name).__name__)
        raise ValueError(
            f"{name}: Theorem 1 needs a coarse-to-fine RAN variant with pooling levels; "
            "this model has no level structure"
        )
    if not isinstance(variant_or_name, str):
        raise ValueError(f"expected a variant name, Variant or RAN model, got {variant_or_name!r}")
    lookup = {n.lower(): n for n in MODEL_NAMES}
    canonical = lookup.get(variant_or_name.lower())
    if canonical is None:
        raise ValueError(f"unknown model {variant_or_name!r}; known: {', '.join(MODEL_NAMES)}")
    if canonical.endswith(NO_RA_SUFFIX):
        canonical = canonical[: -len(NO_RA_SUFFIX)]
    if canonical not in VARIANTS:
        raise ValueError(
            f"{canonical}: Theorem 1 needs a coarse-to-fine RAN variant with pooling levels; "
            f"{canonical} regresses one full-resolution DDF (no level structure)"
        )
    return VARIANTS[canonical]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def separating_levels(
    variant_or_name: str | Variant | nn.Module, distance: float, mode: str = "all"
) -> tuple[int, ...]:
    """Levels k that separate two points at L-inf distance ``distance`` (voxels).

    ``mode="all"``: ``distance >= p_k``; ``mode="best"``: ``distance >= 1``.
    """
    _check_mode(mode)
    variant = resolve_variant(variant_or_name)
    p = float(distance)
    if not math.isfinite(p) or p < 0:
        raise ValueError(f"distances must be finite and >= 0, got {distance!r}")
    threshold = (lambda k: variant.scales[k]) if mode == "all" else (lambda k: 1)
    return tuple(k for k in range(len(variant.scales)) if p >= threshold(k))


def theoretical_separability(
    variant_or_name: str | Variant | nn.Module,
    distances: Sequence[float] | np.ndarray,
    mode: str = "all",
) -> np.ndarray:
    """Theorem-1 upper bound of ``Delta_inf(p)`` for each distance p (voxels, L-inf).

    ``B(p) = sum over the levels k that separate distance p of 2 a_k`` with
    ``a_k = p_k (1 + 2 ||r_k||_1) / 2``; which levels separate p depends on ``mode``
    (module docstring): ``"all"`` (default, Eq. 5) counts level k when ``p >= p_k``,
    ``"best"`` when ``p >= 1``. For example RAN0 (p_k = 16, 8, 4, 2, 1) gives
    ``B(1) = 2 a_4 = 5`` and ``B(16) = 2 (40 + 20 + 10 + 5 + 2.5) = 155``; RAN4
    (p_k = 1) gives ``B(1) = 2 (32.5 + 16.5 + 8.5 + 4.5 + 2.5) = 129``.

    Args:
        variant_or_name: ``RAN0``, ``RAN3``, ``RAN4``, ``RAN4+`` (also ``-noRA``), a
            :class:`Variant` or a built RAN model.
        distances: non-negative distances p in input voxels.
        mode: ``"all"`` or ``"best"``.

    Returns:
        float64 array of the bound, one value per distance, in voxels.

    Raises:
        ValueError: for ``VoxelMorph`` (no level structure), unknown names, bad
            distances or mode.
    """
    _check_mode(mode)
    variant = resolve_variant(variant_or_name)
    ranges = np.array([capturable_range(variant, k) for k in range(len(variant.scales))])
    distances = np.atleast_1d(np.asarray(distances, dtype=np.float64))
    if distances.ndim != 1:
        raise ValueError(f"distances must be a sequence of numbers, got shape {distances.shape}")
    out = np.empty(len(distances), dtype=np.float64)
    for i, p in enumerate(distances):
        levels = separating_levels(variant, p, mode)
        out[i] = float(np.sum(2.0 * ranges[list(levels)])) if levels else 0.0
    return out


# --------------------------------------------------------------------------------------------
# the sliding probe
# --------------------------------------------------------------------------------------------


def _texture(
    coords: np.ndarray, rng: np.random.Generator, base: float, n_waves: int = 4
) -> np.ndarray:
    """``base + 0.2 * mean of n_waves random plane cosines`` at ``coords`` (d, *S)."""
    d = coords.shape[0]
    value = np.full(coords.shape[1:], base, dtype=np.float64)
    for _ in range(n_waves):
        direction = rng.standard_normal(d)
        direction /= max(np.linalg.norm(direction), 1e-12)
        wavelength = rng.uniform(6.0, 16.0)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        arg = np.tensordot(direction, coords, axes=(0, 0)) * (2.0 * math.pi / wavelength)
        value += (0.2 / n_waves) * np.cos(arg + phase)
    return value


def _axes(ndim: int, axis: int, slide_axis: int | None) -> tuple[int, int]:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for {ndim}D")
    axis %= ndim
    slide = (axis + 1) % ndim if slide_axis is None else slide_axis
    if not -ndim <= slide < ndim:
        raise ValueError(f"slide_axis {slide_axis} out of range for {ndim}D")
    slide %= ndim
    if slide == axis:
        raise ValueError("slide_axis must differ from axis (the motion runs along the boundary)")
    return axis, slide


def _check_shape(shape: Sequence[int], ndim: int | None) -> tuple[int, ...]:
    shp = tuple(int(n) for n in shape)
    if len(shp) not in (2, 3) or any(n < 2 for n in shp):
        raise ValueError(f"shape must have 2 or 3 sizes >= 2, got {tuple(shape)}")
    if ndim is not None and len(shp) != ndim:
        raise ValueError(f"shape {shp} has {len(shp)} sizes, ndim is {ndim}")
    return shp


def sliding_pair(
    shape: Sequence[int],
    shift: float,
    axis: int = 0,
    ndim: int | None = None,
    *,
    slide_axis: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (moving, fixed) pair whose two halves slide past each other, and its true DDF.

    The fixed grid is split in two halves across ``axis`` (``shapes_regions(shape,
    "halves", axis)``: region 0 below index ``S_axis // 2``, region 1 from it on). Each
    region r has its own smooth texture ``T_r`` (a different mean intensity, 0.3 and 0.7,
    plus four random plane cosines of wavelength 6-16 voxels, amplitude 0.2) and moves
    rigidly by ``t_r`` along ``slide_axis`` (parallel to the boundary; default the next
    axis): ``t_0 = -shift``, ``t_1 = +shift``. The images are evaluated analytically,
    ``fixed(x) = T_r(x)`` and ``moving(y) = T_r(y - t_r)``, so ``moving(x + t_r) = fixed(x)``
    holds exactly for any (also fractional) shift, and the true DDF (``warped(x) =
    moving(x + ddf(x))``) is :func:`ranreg.sliding.sliding_ddf` of the two translations:
    it jumps by ``2 |shift|`` across the boundary.

    Args:
        shape: spatial size S (2 or 3 sizes, each >= 2).
        shift: half of the sliding jump, voxels.
        axis: axis normal to the boundary.
        ndim: optional check that ``len(shape) == ndim``.
        slide_axis: direction of the motion (must differ from ``axis``).
        rng: generator or seed of the textures (default seed 0).

    Returns:
        ``(moving, fixed, true_ddf)``: float32 tensors (1, 1, *S), (1, 1, *S), (1, d, *S).
    """
    shp = _check_shape(shape, ndim)
    d = len(shp)
    axis, slide = _axes(d, axis, slide_axis)
    if not math.isfinite(float(shift)):
        raise ValueError(f"shift must be finite, got {shift!r}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)
    regions = shapes_regions(shp, "halves", axis)
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shp), indexing="ij"))
    translations = {0: -float(shift), 1: float(shift)}
    fixed = np.zeros(shp, dtype=np.float64)
    moving = np.zeros(shp, dtype=np.float64)
    motions = {}
    for region, base in ((0, 0.3), (1, 0.7)):
        state = gen.bit_generator.state  # the same texture for fixed and moving
        inside = regions == region
        fixed[inside] = _texture(grid, gen, base)[inside]
        gen.bit_generator.state = state
        t = np.zeros(d)
        t[slide] = translations[region]
        moved = grid - t.reshape(-1, *([1] * d))
        moving[inside] = _texture(moved, gen, base)[inside]
        motions[region] = (np.eye(d), t)
    true_ddf = sliding_ddf(regions, motions)

    def image(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32))[None, None]

    return image(moving), image(fixed), torch.from_numpy(true_ddf)[None]


def _check_distances(distances: Sequence[int] | np.ndarray) -> list[int]:
    out = []
    for p in distances:
        if not math.isfinite(float(p)) or float(p) != int(p) or int(p) < 0:
            raise ValueError(f"distances must be integers >= 0 (voxels), got {p!r}")
        out.append(int(p))
    return out


def boundary_jumps(ddf: torch.Tensor, axis: int, distances: Sequence[int]) -> np.ndarray:
    """Per distance p, max over pairs straddling the halves boundary of ``||ddf(x) - ddf(y)||_inf``.

    ``ddf`` is (B, d, *S); the boundary lies between indices ``b - 1`` and ``b = S_axis // 2``
    along ``axis``; the pairs are ``x`` with ``b - p <= x_axis <= b - 1`` and ``y = x + p
    e_axis`` with ``y_axis < S_axis`` (every position along the other axes, every batch
    item). NaN where no such pair exists (``p >= S_axis``, or ``p = 0`` gives 0).
    """
    size = ddf.shape[2 + axis]
    b = size // 2
    out = np.full(len(distances), np.nan)
    for i, p in enumerate(distances):
        if p == 0:
            out[i] = 0.0
            continue
        lo, hi = max(0, b - p), min(b - 1, size - 1 - p)
        if hi < lo:
            continue
        n = hi - lo + 1
        first = ddf.narrow(2 + axis, lo, n)
        second = ddf.narrow(2 + axis, lo + p, n)
        out[i] = float((first - second).abs().amax().item())
    return out


def empirical_separability(
    model: nn.Module,
    ndim: int,
    shape: Sequence[int],
    distances: Sequence[int] | np.ndarray = DEFAULT_DISTANCES,
    n_pairs: int = 2,
    seed: int = 0,
    *,
    shifts: Sequence[float] = DEFAULT_SHIFTS,
    axis: int = 0,
    slide_axis: int | None = None,
    batch_size: int = 4,
) -> np.ndarray:
    """Largest displacement difference a model produces across a sliding boundary.

    Probe: for each of ``n_pairs`` random textures (generator ``default_rng([seed, j])``)
    and each half-jump s in ``shifts``, :func:`sliding_pair` gives a fixed image of two
    halves and a moving image in which the halves moved by -s and +s along the boundary
    (true DDF jump 2s). The model registers each pair (``model(moving, fixed)``, eval mode,
    no gradients) and, for each distance p, every pair of voxels straddling the boundary
    (``x`` in the lower half within p of it, ``y = x + p e_axis`` in the upper half, both on
    the grid) is scored by ``||ddf(x) - ddf(y)||_inf``; the result is the maximum over all
    these point pairs and all probes.

    The number measures what the network *does*, not what it can do: an untrained network
    gives whatever its random weights produce, a trained one how far it separates real
    sliding motion (at most ``2 max(shifts)`` for a perfect registration of these probes,
    and at most the Theorem-1 bound of its architecture).

    Args:
        model: any module called as ``model(moving, fixed)`` returning a (B, ndim, *S) DDF
            in voxels (or a :class:`RegistrationOutput`); its ``in_channels`` (default 1)
            decides how often the probe image is repeated along channels.
        ndim: 2 or 3.
        shape: probe size S (ndim sizes).
        distances: integer distances p >= 0 (voxels).
        n_pairs: random textures per shift.
        seed: seed of the textures.
        shifts: half-jumps s (voxels) of the probes.
        axis: boundary normal (the direction of the point pairs).
        slide_axis: direction of the sliding motion (default the next axis).
        batch_size: probes per forward pass.

    Returns:
        float64 array, one value per distance (voxels); NaN where the grid holds no pair
        at that distance (``p >= S_axis``).
    """
    shp, axis, slide, dist = _check_probe(
        ndim, shape, axis, slide_axis, distances, n_pairs, shifts, batch_size
    )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    channels = int(getattr(model, "in_channels", 1))
    probes = _probe_pairs(shp, ndim, shifts, axis, slide, n_pairs, seed)

    best = np.full(len(dist), np.nan)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(probes), batch_size):
                chunk = probes[start : start + batch_size]
                ddf = _probe_ddf(model, chunk, channels, device, ndim, shp)
                best = np.fmax(best, boundary_jumps(ddf.float(), axis, dist))
    finally:
        model.train(was_training)
    return best


def _check_probe(
    ndim: int,
    shape: Sequence[int],
    axis: int,
    slide_axis: int | None,
    distances: Sequence[int] | np.ndarray,
    n_pairs: int,
    shifts: Sequence[float],
    batch_size: int,
) -> tuple[tuple[int, ...], int, int, list[int]]:
    """The checked arguments of :func:`empirical_separability`: ``(shape, axis, slide, dist)``."""
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    shp = _check_shape(shape, ndim)
    axis, slide = _axes(ndim, axis, slide_axis)
    dist = _check_distances(distances)
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    if len(shifts) < 1:
        raise ValueError("shifts must hold at least one value")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return shp, axis, slide, dist


def _probe_pairs(
    shp: tuple[int, ...],
    ndim: int,
    shifts: Sequence[float],
    axis: int,
    slide: int,
    n_pairs: int,
    seed: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (moving, fixed) probes: texture j (``default_rng([seed, j])``) at every shift."""
    probes = []
    for j in range(n_pairs):
        for s in shifts:
            moving, fixed, _ = sliding_pair(
                shp, s, axis, ndim, slide_axis=slide, rng=np.random.default_rng([seed, j])
            )
            probes.append((moving, fixed))
    return probes


def _probe_ddf(
    model: nn.Module,
    chunk: list[tuple[torch.Tensor, torch.Tensor]],
    channels: int,
    device: torch.device,
    ndim: int,
    shp: tuple[int, ...],
) -> torch.Tensor:
    """The model's (B, ndim, *S) DDF for one batch of probes (shape checked)."""
    moving = torch.cat([m for m, _ in chunk]).repeat_interleave(channels, 1)
    fixed = torch.cat([f for _, f in chunk]).repeat_interleave(channels, 1)
    out = model(moving.to(device), fixed.to(device))
    ddf = out.ddf if isinstance(out, RegistrationOutput) else out
    if ddf.shape[1:] != (ndim, *shp):
        raise ValueError(
            f"model returned a DDF of shape {tuple(ddf.shape)}, "
            f"expected (B, {ndim}, {', '.join(map(str, shp))})"
        )
    return ddf
