"""Registering NIfTI volumes with a trained network: ``ranreg register``.

Geometry (the convention of every output of this module)
--------------------------------------------------------
Let ``A_f`` and ``A_m`` be the voxel-to-world affines of the fixed and moving images
(NIfTI sform/qform, world = RAS+ mm). The initial transform is the identity *in world
space*: a world point ``p`` of the fixed image is compared with the same world point of
the moving image, whatever the two grids are.

1. The network input grid covers the fixed image's field of view. If the model config has
   ``spacing`` (mm per fixed array axis) the grid has ``round(n_i * s_i / spacing_i)``
   voxels per axis, laid out as cells exactly like :func:`ranreg.data.preprocess.resample`
   (network voxel ``j`` = fixed voxel ``step * (j + 0.5) - 0.5``, ``step = n / n'``);
   otherwise it is the fixed grid itself. The fixed image is resampled onto it (linear);
   the moving image is resampled onto it through the world frame,
   ``moving(A_m^-1 A_f x)`` (linear, one interpolation).
2. Intensities are windowed/normalised per image (config key ``window``; see
   :func:`model_settings`) and the network predicts a DDF in network voxels.
3. The DDF is resized to the fixed image's ORIGINAL grid (:func:`ranreg.spatial.resize_ddf`,
   displacements rescaled by ``step``), giving ``v(x)`` in fixed voxels along the fixed
   array axes, and turned into a world displacement ``u = L_f v`` (``L_f`` = the 3x3 part
   of ``A_f``).

For the fixed voxel ``x`` at world point ``p = A_f x`` the corresponding moving point is
``p + u(p)``; the warped image is the ORIGINAL moving image sampled once at
``A_m^-1 (p + u(p))`` (linear; labels nearest; outside the moving image's field of view the
image gets its minimum value and labels get 0). ``ddf.nii.gz`` stores ``u`` in mm along
the world (RAS+) axes, shape ``(X, Y, Z, 1, 3)``, intent VECTOR, with the fixed affine.
The Jacobian determinant is that of the world map ``p -> p + u(p)``:
``det(I + du/dp) = det(L_f (I + dv/dx) L_f^-1) = det(I + dv/dx)``, so it is computed
exactly from ``v`` in fixed voxels (:func:`ranreg.spatial.jacobian_determinant`), whatever
rotation, flip, permutation or anisotropy the affine has.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ranreg.checkpoint import load_model
from ranreg.data.io import Volume, check_out_dir, load_label_volume, load_nifti, save_nifti
from ranreg.data.preprocess import DEFAULT_WINDOW
from ranreg.errors import RanregError
from ranreg.metrics import ORGAN_NAMES, PAPER_ORGANS, evaluate_pair
from ranreg.nn.blocks import channels_last_format
from ranreg.peers import PEER_NAMES, build_peer
from ranreg.refine import DEFAULT_STEPS, DEFAULT_WEIGHT, REFINE_SPACING, check_refine, refine_ddf
from ranreg.spatial import folding_fraction, identity_grid, jacobian_determinant, resize_ddf
from ranreg.spatial import std_log_jacobian as _std_log_jacobian

__all__ = [
    "IDENTITY",
    "IdentityModel",
    "RegistrationResult",
    "DDF_CONVENTION",
    "resolve_model",
    "resolve_device",
    "model_settings",
    "model_label",
    "register_volumes",
    "score_labels",
    "register_files",
    "add_parser",
]

#: Name of the reference "model" that does not move anything.
IDENTITY = "identity"
#: Image minimum below which an image is taken to be CT in Hounsfield units.
HU_THRESHOLD = -500.0
#: Output files of :func:`register_files`.
OUTPUT_FILES = (
    "warped.nii.gz",
    "ddf.nii.gz",
    "jacobian.nii.gz",
    "warped_labels.nii.gz",
    "overlay.png",
    "head_masks.png",
    "metrics.json",
)
DDF_CONVENTION = (
    "ddf.nii.gz holds u(p) in mm along the world (RAS+) axes on the fixed grid, shape "
    "(X, Y, Z, 1, 3), intent VECTOR: the fixed voxel x at world point p = A_fixed x "
    "corresponds to the moving point p + u(p), i.e. to the moving voxel "
    "A_moving^-1 (p + u(p)); warped(x) = moving(A_moving^-1 (A_fixed x + u(A_fixed x)))."
)


# --------------------------------------------------------------------------------- models
class IdentityModel(torch.nn.Module):
    """A 'network' that returns a zero DDF: the reference (no registration) row."""

    def __init__(self, ndim: int = 3) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"name": IDENTITY, "ndim": ndim}

    def forward(self, moving: Tensor, fixed: Tensor, return_levels: bool = False) -> Tensor:
        b, spatial = fixed.shape[0], fixed.shape[2:]
        return torch.zeros(b, len(spatial), *spatial, dtype=fixed.dtype, device=fixed.device)


def _pretrained() -> tuple[dict[str, str], str | None, Path | None]:
    """(name -> file, default name, folder) of the packaged models; empty if none."""
    try:
        module = importlib.import_module("ranreg.pretrained")
    except ImportError:
        return {}, None, None
    table = dict(getattr(module, "PRETRAINED", {}) or {})
    default = getattr(module, "DEFAULT_MODEL", None)
    file = getattr(module, "__file__", None)
    return table, default, (Path(file).parent if file else None)


def _known_names() -> list[str]:
    return [IDENTITY, *_pretrained()[0], *PEER_NAMES]


def resolve_model(spec: str | os.PathLike[str] | None) -> torch.nn.Module:
    """The model named by ``spec``, in eval mode on the CPU.

    ``spec`` is a model file or a directory holding one (``model.safetensors``, see
    :mod:`ranreg.checkpoint`), the name ``identity`` (zero DDF), the name of a classical
    method (:data:`ranreg.peers.PEER_NAMES`, e.g. ``ants-syn``) or the name of a packaged
    pretrained model (``ranreg.pretrained.PRETRAINED``); ``None`` means the packaged
    default (``ranreg.pretrained.DEFAULT_MODEL``). The model gets a ``source`` attribute
    (the spec as given) used in messages and reports.
    """
    table, default, folder = _pretrained()
    known = ", ".join(_known_names())
    if spec is None:
        if default is None or default not in table:
            raise RanregError(
                f"no packaged default model is installed; pass --model (known: {known}, "
                "or a model file)"
            )
        spec = default
    text = os.fspath(spec)
    if text == IDENTITY:
        model: torch.nn.Module = IdentityModel()
    elif text in PEER_NAMES and not Path(text).exists():
        model = build_peer(text)  # classical method; RanregError if its extra is missing
    elif text in table and not Path(text).exists():
        assert folder is not None
        file = folder / table[text]
        if not file.is_file():
            raise RanregError(f"{file}: packaged model {text!r} is missing from the installation")
        model = load_model(file)
    elif Path(text).exists() or os.sep in text or text.endswith(".safetensors"):
        model = load_model(text)  # RanregError names the file for anything but a model file
    else:
        raise RanregError(
            f"unknown model {text!r}: not a model file or folder, and not a packaged model "
            f"name (known: {known})"
        )
    model.source = text  # type: ignore[attr-defined]
    return model.eval()


def model_label(model: torch.nn.Module) -> str:
    """A short name for reports: the spec for names, ``NAME (file or folder)`` for files."""
    source = str(getattr(model, "source", "") or "")
    name = str(model.config.get("name", "model"))
    if not source or source in _known_names():
        return source or name
    p = Path(source)
    part = p.parent.name if p.name in ("model.safetensors", "model") and p.parent.name else p.name
    part = part.removesuffix(".safetensors")
    return f"{name} ({part})" if part else name


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available) as a torch device."""
    text = "auto" if device is None else str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise RanregError(
            f"--device {text!r}: not a device (use cpu, cuda, cuda:N or auto)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RanregError(f"--device {text}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise RanregError(f"--device {text}: only cpu and cuda are supported")
    return dev


def model_settings(
    config: dict[str, Any],
) -> tuple[tuple[float, float, float] | None, tuple[float, float] | None | str]:
    """``(spacing, window)`` of a model config.

    ``spacing``: the network's voxel size in mm per fixed array axis, or ``None`` (absent:
    run on the fixed image's own grid). ``window``: ``(low, high)`` HU, ``None`` (min-max
    normalisation per image) or ``"auto"`` (absent from the config: ``(-100, 300)`` for an
    image whose minimum is below -500, as CT in HU, else min-max).
    """
    name = config.get("name", "model")
    spacing = config.get("spacing")
    if spacing is not None:
        try:
            values = tuple(float(s) for s in spacing)
        except (TypeError, ValueError):
            values = ()
        if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
            raise RanregError(
                f"model {name}: config 'spacing' must be 3 positive mm, got {spacing}"
            )
        spacing = values
    if "window" not in config:
        return spacing, "auto"
    window = config["window"]
    if window is None:
        return spacing, None
    try:
        low, high = (float(w) for w in window)
    except (TypeError, ValueError):
        raise RanregError(f"model {name}: config 'window' must be [low, high] or null") from None
    if not high > low:
        raise RanregError(f"model {name}: config 'window' needs high > low, got {window}")
    return spacing, (low, high)


# --------------------------------------------------------------------------------- result
@dataclass
class RegistrationResult:
    """Everything :func:`register_volumes` produced, on the fixed image's original grid.

    ``warped`` (X, Y, Z) float32: the moving image warped onto the fixed grid.
    ``ddf_mm`` (X, Y, Z, 3): world (RAS+) displacement ``u`` in mm (see the module docs).
    ``jacobian`` (X, Y, Z): ``det(I + du/dp)``. ``warped_label``: moving labels warped
    (nearest), or None. ``runtime_s``: the whole call; ``network_s``: the forward pass.
    ``ddf_vox`` (X, Y, Z, 3): the same displacement in fixed voxels along the fixed array
    axes. ``moving_on_fixed`` / ``moving_label_on_fixed``: the moving image / labels
    resampled to the fixed grid with the identity world transform (the "before" state).
    """

    warped: np.ndarray
    ddf_mm: np.ndarray
    jacobian: np.ndarray
    warped_label: np.ndarray | None
    runtime_s: float
    network_s: float
    fixed_affine: np.ndarray
    ddf_vox: np.ndarray | None = None
    moving_on_fixed: np.ndarray | None = None
    moving_label_on_fixed: np.ndarray | None = None
    fixed_label: np.ndarray | None = None
    network_shape: tuple[int, ...] = ()
    network_spacing: tuple[float, ...] = ()
    network_fixed: np.ndarray | None = None
    refine_s: float = 0.0
    levels: Any = None

    @property
    def fixed_spacing(self) -> tuple[float, float, float]:
        norms = np.sqrt((np.asarray(self.fixed_affine)[:3, :3] ** 2).sum(axis=0))
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    def jacobian_stats(self) -> dict[str, float]:
        """Folding % and SD of log det J (:func:`ranreg.metrics.jacobian_stats` semantics)."""
        jac = torch.from_numpy(np.ascontiguousarray(self.jacobian))[None]
        return {
            "folding_percent": 100.0 * float(folding_fraction(jac)[0]),
            "sd_log_jacobian": float(_std_log_jacobian(jac)[0]),
        }


# --------------------------------------------------------------------------------- sampling
def _sample(src: Tensor, coords: Tensor, mode: str, fill: float | None) -> Tensor:
    """Sample ``src`` (1, 1, *S) at voxel coordinates ``coords`` (3, *T) (float64).

    Linear (``mode="bilinear"``) or nearest; points within half a voxel of the grid take the
    border value, points further out take ``fill`` (``None``: border value everywhere).
    """
    shape = src.shape[2:]
    n = torch.tensor(shape, dtype=coords.dtype, device=coords.device).view(3, 1, 1, 1)
    scale = torch.where(n > 1, 2.0 / (n - 1).clamp_min(1), torch.zeros_like(n))
    grid = (coords * scale - 1.0).flip(0).movedim(0, -1)[None].to(src.dtype)
    out = F.grid_sample(src, grid, mode=mode, padding_mode="border", align_corners=True)[0, 0]
    if fill is not None:
        outside = ((coords < -0.5) | (coords > n - 0.5)).any(dim=0)
        out = out.masked_fill(outside, fill)
    return out


def _cell_centres(shape: tuple[int, ...], step: np.ndarray, device: torch.device) -> Tensor:
    """(3, *shape) centres of a coarser grid's cells in fixed voxel coordinates (cells of
    ``step`` fixed voxels, laid out as :func:`ranreg.data.preprocess.resample` lays them)."""
    axes = [
        torch.arange(n, dtype=torch.float64, device=device) * float(s) + 0.5 * (float(s) - 1.0)
        for n, s in zip(shape, step, strict=True)
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _refine(
    v: Tensor,
    mov_t: Tensor,
    fix_t: Tensor,
    fixed: Volume,
    fixed_to_moving: np.ndarray,
    window: tuple[float, float] | None | str,
    raw_mins: tuple[float, float],
    steps: int,
    weight: float,
) -> Tensor:
    """Instance optimisation of ``v`` (1, 3, *fixed grid) on a grid no finer than
    REFINE_SPACING; the correction is resampled back and added, keeping ``v``'s detail."""
    shape_f = tuple(int(s) for s in fixed.shape)
    coarse = np.maximum(np.asarray(fixed.spacing, dtype=np.float64), REFINE_SPACING)
    shape_r, step = _network_grid(fixed, tuple(coarse))  # type: ignore[arg-type]
    centres = _cell_centres(shape_r, step, v.device)
    fixed_r = _sample(fix_t[None, None], centres, "bilinear", None)
    moving_r = _sample(mov_t, _apply(fixed_to_moving, centres), "bilinear", raw_mins[0])
    del centres
    fixed_r = _normalise(fixed_r, window, raw_mins[1])[None, None]
    moving_r = _normalise(moving_r, window, raw_mins[0])[None, None]
    start = v if shape_r == shape_f else resize_ddf(v, shape_r)
    fitted = refine_ddf(start, moving_r, fixed_r, steps, weight=weight)
    if shape_r == shape_f:
        return fitted
    return v + resize_ddf(fitted - start, shape_f)


def _apply(matrix: np.ndarray, points: Tensor) -> Tensor:
    """Affine ``matrix`` (4x4) applied to points (3, *T)."""
    m = torch.as_tensor(matrix, dtype=points.dtype, device=points.device)
    return torch.einsum("ij,j...->i...", m[:3, :3], points) + m[:3, 3].view(3, 1, 1, 1)


def _network_grid(
    fixed: Volume, spacing: tuple[float, float, float] | None
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape of the network grid and its cell size in fixed voxels (``step`` per axis)."""
    shape = np.array(fixed.shape, dtype=np.float64)
    if spacing is None:
        return tuple(int(s) for s in shape), np.ones(3)  # type: ignore[return-value]
    out = np.maximum(np.round(shape * np.asarray(fixed.spacing) / np.asarray(spacing)), 2)
    return tuple(int(s) for s in out), shape / out  # type: ignore[return-value]


def _normalise(image: Tensor, window: tuple[float, float] | None | str, raw_min: float) -> Tensor:
    if window == "auto":
        window = DEFAULT_WINDOW if raw_min < HU_THRESHOLD else None
    if window is None:
        lo, hi = float(image.min()), float(image.max())
        if hi <= lo:
            return torch.zeros_like(image)
        return (image - lo) / (hi - lo)
    low, high = window  # type: ignore[misc]
    return (image.clamp(low, high) - low) / (high - low)


def _volume_name(v: Volume, default: str) -> str:
    return str(v.path) if v.path is not None else default


def _check_inputs(
    model: torch.nn.Module,
    moving: Volume,
    fixed: Volume,
    moving_label: Volume | None,
    fixed_label: Volume | None,
) -> None:
    ndim = int(getattr(model, "config", {}).get("ndim", 3))
    if ndim != 3:
        raise RanregError(
            f"model {getattr(model, 'source', model.config.get('name'))}: a {ndim}D model "
            "cannot register 3D volumes"
        )
    for vol, name in ((moving, "moving image"), (fixed, "fixed image")):
        if len(vol.shape) != 3 or min(vol.shape) < 2:
            raise RanregError(
                f"{_volume_name(vol, name)}: need a 3D volume with at least 2 voxels per axis, "
                f"got shape {vol.shape}"
            )
    for lab, img, name in ((moving_label, moving, "moving"), (fixed_label, fixed, "fixed")):
        if lab is not None and lab.shape != img.shape:
            raise RanregError(
                f"{_volume_name(lab, name + ' labels')} has shape {lab.shape} but its image "
                f"{_volume_name(img, name + ' image')} has shape {img.shape}"
            )


def _labels_tensor(label: Volume, device: torch.device) -> tuple[Tensor, np.dtype]:
    arr = np.asarray(label.array)
    dtype = torch.float64 if arr.size and int(arr.max()) >= 2**24 else torch.float32
    return torch.from_numpy(arr.astype(np.float64 if dtype == torch.float64 else np.float32)).to(
        device, dtype
    )[None, None], arr.dtype


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def register_volumes(
    model: torch.nn.Module,
    moving: Volume,
    fixed: Volume,
    moving_label: Volume | None = None,
    fixed_label: Volume | None = None,
    device: str | torch.device = "cpu",
    *,
    return_levels: bool = False,
    precision: str = "fp32",
    channels_last: bool | None = None,
    refine: int = 0,
    refine_weight: float = DEFAULT_WEIGHT,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (both in world space) with ``model``.

    ``precision`` and ``channels_last`` choose how the network runs (:func:`run_network`);
    everything outside the network (resampling, warping, Jacobians) stays float32/64.
    ``refine`` > 0 then fits the field to this pair with that many instance-optimisation
    steps (:mod:`ranreg.refine`, regulariser weight ``refine_weight``), on the fixed grid or,
    for inputs finer than :data:`~ranreg.refine.REFINE_SPACING`, on a grid of that spacing.

    See the module docstring for the geometry. ``return_levels`` also keeps the network's
    per-level output (``result.levels``, RAN models only) and the normalised fixed image on
    the network grid (``result.network_fixed``), for :func:`ranreg.figures.head_mask_figure`.
    """
    start = time.perf_counter()
    dev = resolve_device(device)
    check_refine(refine, refine_weight)
    _check_inputs(model, moving, fixed, moving_label, fixed_label)
    spacing, window = model_settings(model.config)
    model = model.to(dev).eval()

    a_f = np.asarray(fixed.affine, dtype=np.float64)
    a_m = np.asarray(moving.affine, dtype=np.float64)
    fixed_to_moving = np.linalg.inv(a_m) @ a_f  # fixed voxel -> moving voxel
    shape_f = tuple(int(s) for s in fixed.shape)
    shape_g, step = _network_grid(fixed, spacing)
    same_grid = shape_g == shape_f

    mov_t = torch.from_numpy(np.ascontiguousarray(moving.array, dtype=np.float32)).to(dev)
    mov_t = mov_t[None, None]
    fix_t = torch.from_numpy(np.ascontiguousarray(fixed.array, dtype=np.float32)).to(dev)
    mov_min, fix_min = float(mov_t.min()), float(fix_t.min())

    # Same grid and world position: the resamplings with the identity map are skipped.
    aligned = tuple(moving.shape) == shape_f and np.allclose(fixed_to_moving, np.eye(4), atol=1e-6)
    if same_grid:
        fixed_g = fix_t
        moving_g = mov_t[0, 0] if aligned else None
        grid_in_fixed = None
    else:
        grid_in_fixed = _cell_centres(shape_g, step, dev)
        fixed_g = _sample(fix_t[None, None], grid_in_fixed, "bilinear", None)
        moving_g = None
    if moving_g is None:
        if grid_in_fixed is None:
            grid_in_fixed = identity_grid(shape_g, device=dev, dtype=torch.float64)
        moving_g = _sample(mov_t, _apply(fixed_to_moving, grid_in_fixed), "bilinear", mov_min)
    del grid_in_fixed
    fixed_n = _normalise(fixed_g, window, fix_min)[None, None].contiguous()
    moving_n = _normalise(moving_g, window, mov_min)[None, None].contiguous()

    _synchronize(dev)
    t_net = time.perf_counter()
    ddf_g, levels = run_network(
        model,
        moving_n,
        fixed_n,
        precision=precision,
        channels_last=channels_last,
        return_levels=return_levels,
    )
    _synchronize(dev)
    network_s = time.perf_counter() - t_net
    if tuple(ddf_g.shape) != (1, 3, *shape_g):
        raise RanregError(
            f"model {getattr(model, 'source', model.config.get('name'))} returned a DDF of "
            f"shape {tuple(ddf_g.shape)}, expected {(1, 3, *shape_g)}"
        )
    ddf_g = ddf_g.float()

    # v: displacement in fixed voxels along the fixed array axes, on the fixed grid
    v = ddf_g if same_grid else resize_ddf(ddf_g, shape_f)
    refine_s = 0.0
    if refine > 0:
        t_refine = time.perf_counter()
        v = _refine(
            v,
            mov_t,
            fix_t,
            fixed,
            fixed_to_moving,
            window,
            (mov_min, fix_min),
            refine,
            refine_weight,
        )
        _synchronize(dev)
        refine_s = time.perf_counter() - t_refine
    moved = bool(v.any())
    ident = identity_grid(shape_f, device=dev, dtype=torch.float64)
    where = _apply(fixed_to_moving, ident + v[0].double()) if moved else None
    before = None if aligned else _apply(fixed_to_moving, ident)
    del ident
    moving_on_fixed = mov_t[0, 0] if before is None else _sample(mov_t, before, "bilinear", mov_min)
    warped = moving_on_fixed if where is None else _sample(mov_t, where, "bilinear", mov_min)
    warped_label = moving_label_on_fixed = None
    if moving_label is not None:
        lab_t, lab_dtype = _labels_tensor(moving_label, dev)

        def labels_at(coords: Tensor | None) -> np.ndarray:
            if coords is None:
                return np.array(moving_label.array, copy=True)
            return _sample(lab_t, coords, "nearest", 0.0).round().cpu().numpy().astype(lab_dtype)

        moving_label_on_fixed = labels_at(before)
        warped_label = moving_label_on_fixed.copy() if where is None else labels_at(where)
    del where, before
    jac = jacobian_determinant(v)[0]
    lin = torch.as_tensor(a_f[:3, :3], dtype=torch.float32, device=dev)
    ddf_mm = torch.einsum("ij,j...->...i", lin, v[0])
    ddf_vox = v[0].movedim(0, -1)
    _synchronize(dev)
    runtime_s = time.perf_counter() - start

    return RegistrationResult(
        warped=warped.cpu().numpy().astype(np.float32),
        ddf_mm=ddf_mm.cpu().numpy().astype(np.float32),
        jacobian=jac.cpu().numpy().astype(np.float32),
        warped_label=warped_label,
        runtime_s=runtime_s,
        network_s=network_s,
        refine_s=refine_s,
        fixed_affine=a_f.copy(),
        ddf_vox=ddf_vox.cpu().numpy().astype(np.float32),
        moving_on_fixed=moving_on_fixed.cpu().numpy().astype(np.float32),
        moving_label_on_fixed=moving_label_on_fixed,
        fixed_label=None if fixed_label is None else np.asarray(fixed_label.array),
        network_shape=shape_g,
        network_spacing=tuple(float(s * st) for s, st in zip(fixed.spacing, step, strict=True)),
        network_fixed=fixed_n[0, 0].cpu().numpy() if return_levels else None,
        levels=levels,
    )


# --------------------------------------------------------------------- network precision
#: Inference precisions of :func:`run_network`.
PRECISIONS = ("fp32", "bf16")


def is_neural(model: torch.nn.Module) -> bool:
    """True for a network with weights (not the identity or a classical peer)."""
    return any(True for _ in model.parameters())


def default_channels_last(device: torch.device, precision: str) -> bool:
    """Channels-last by default on the CPU (oneDNN's fast layout, fp32 and bf16 alike) and
    for bf16 on GPUs; plain layout for fp32 on GPUs, where cuDNN prefers it for 3D."""
    return device.type == "cpu" or precision == "bf16"


def run_network(
    model: torch.nn.Module,
    moving: Tensor,
    fixed: Tensor,
    *,
    precision: str = "fp32",
    channels_last: bool | None = None,
    return_levels: bool = False,
) -> tuple[Tensor, Any]:
    """One forward pass: ``(float32 contiguous DDF, per-level output or None)``.

    ``precision="bf16"`` runs the network under ``torch.autocast`` with bfloat16
    (convolutions in bf16, reductions and resampling as autocast keeps them); it is fast
    where the hardware has bf16 units (CPUs with AVX512-BF16 or AMX, recent GPUs). With
    ``channels_last`` (default :func:`default_channels_last`) the weights and inputs use the
    channels-last memory layout; the model is converted in place. Models without weights
    (identity, classical peers) always run as they are.
    """
    if precision not in PRECISIONS:
        raise RanregError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    neural = is_neural(model)
    if channels_last is None:
        channels_last = default_channels_last(fixed.device, precision)
    if neural and channels_last:
        fmt = channels_last_format(fixed.dim())
        model.to(memory_format=fmt)
        moving, fixed = moving.to(memory_format=fmt), fixed.to(memory_format=fmt)
    autocast = torch.autocast(
        fixed.device.type, dtype=torch.bfloat16, enabled=neural and precision == "bf16"
    )
    levels = None
    with torch.no_grad(), autocast:
        if return_levels and "return_levels" in inspect.signature(model.forward).parameters:
            out = model(moving, fixed, return_levels=True)
            ddf, levels = (out.ddf, out) if hasattr(out, "ddf") else (out, None)
        else:
            ddf = model(moving, fixed)
    return ddf.float().contiguous(), levels


def add_precision_options(p: Any) -> None:
    """``--precision`` and ``--channels-last`` for the commands that run a network."""
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="network arithmetic: fp32 (default) or bf16 (autocast; fast on CPUs with "
        "AVX512-BF16/AMX and on recent GPUs)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory layout for the network (default: on for the CPU and for bf16)",
    )


def add_refine_options(p: Any) -> None:
    """``--refine`` and ``--refine-weight``: instance optimisation after the network."""
    p.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="N",
        help="fit the field to this pair with N instance-optimisation steps after the "
        f"network (local NCC + smoothness; {DEFAULT_STEPS} is the validated setting, about "
        "35 s at 96x80x128 on 2 CPU cores; default 0: the network alone)",
    )
    p.add_argument(
        "--refine-weight",
        type=float,
        default=DEFAULT_WEIGHT,
        metavar="W",
        help=f"smoothness weight of the refinement (default {DEFAULT_WEIGHT:g}; higher: "
        "smoother fields, less folding, lower Dice)",
    )


# --------------------------------------------------------------------------------- metrics
def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def score_labels(
    warped_label: np.ndarray,
    fixed_label: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float],
) -> dict[int, dict[str, float]]:
    """``{label: {"dice", "asd_mm", "hd95_mm"}}`` on the fixed grid (NaN where undefined)."""
    scores = evaluate_pair(warped_label, fixed_label, list(labels), list(spacing))
    return {
        lab: {"dice": s["dice"], "asd_mm": s["asd"], "hd95_mm": s["hd95"]}
        for lab, s in scores["labels"].items()
    }


def _mean_scores(per_label: dict[int, dict[str, float]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("dice", "asd_mm", "hd95_mm"):
        vals = [s[key] for s in per_label.values() if math.isfinite(s[key])]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def organ_name(label: int) -> str:
    return ORGAN_NAMES.get(int(label), f"label {int(label)}")


# --------------------------------------------------------------------------------- files
def save_ddf(path: Path, ddf_mm: np.ndarray, affine: np.ndarray) -> Path:
    """Write a world-mm DDF (X, Y, Z, 3) as a 5D NIfTI (X, Y, Z, 1, 3), intent VECTOR."""
    data = np.ascontiguousarray(ddf_mm, dtype=np.float32)[:, :, :, None, :]
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_intent("vector", (), name="ddf_mm_world")
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _first_missing(path: Path) -> Path | None:
    missing = None
    p = path.absolute()
    while not p.exists():
        missing = p
        p = p.parent
    return missing


def atomic_output_dir(out_dir: Path) -> tuple[Path, Path | None]:
    """A temporary sibling of ``out_dir`` to write into (parents created) and the first
    folder this created (to remove on failure)."""
    check_out_dir(out_dir)
    created = _first_missing(out_dir.parent)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    return tmp, created


def finish_output_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished temporary folder onto ``out_dir`` (which may be an empty folder)."""
    check_out_dir(out_dir)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)


def abandon_output_dir(tmp: Path, created: Path | None) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return _finite_or_none(x)
    if isinstance(x, Path):
        return str(x)
    return x


def register_files(
    fixed: str | os.PathLike[str],
    moving: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    model: torch.nn.Module | str | None = None,
    moving_labels: str | os.PathLike[str] | None = None,
    fixed_labels: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    labels_to_score: Sequence[int] = PAPER_ORGANS,
    *,
    head_masks: bool = False,
    precision: str = "fp32",
    channels_last: bool | None = None,
    refine: int = 0,
    refine_weight: float = DEFAULT_WEIGHT,
) -> dict[str, Any]:
    """Register two NIfTI files and write the results into the new folder ``out_dir``.

    Files: ``warped.nii.gz``, ``ddf.nii.gz`` (:data:`DDF_CONVENTION`), ``jacobian.nii.gz``,
    ``warped_labels.nii.gz`` (with moving labels), ``overlay.png``, ``metrics.json`` (and
    ``head_masks.png`` with ``head_masks`` for RAN models). Everything is checked before
    anything is written, the folder is written as a temporary sibling and renamed into
    place, and a failure leaves nothing behind. ``out_dir`` must not exist or be empty.
    ``model`` is a model or a spec for :func:`resolve_model`. Returns the metrics dict
    (as in ``metrics.json``).
    """
    from ranreg import figures

    t0 = time.perf_counter()
    out = Path(out_dir)
    check_out_dir(out)
    net = model if isinstance(model, torch.nn.Module) else resolve_model(model)
    resolve_device(device)
    fix = load_nifti(fixed)
    mov = load_nifti(moving)
    mov_lab = None if moving_labels is None else load_label_volume(moving_labels)
    fix_lab = None if fixed_labels is None else load_label_volume(fixed_labels)
    _check_inputs(net, mov, fix, mov_lab, fix_lab)
    model_settings(net.config)
    labels = [int(v) for v in labels_to_score]

    result = register_volumes(
        net,
        mov,
        fix,
        mov_lab,
        fix_lab,
        device,
        return_levels=head_masks,
        precision=precision,
        channels_last=channels_last,
        refine=refine,
        refine_weight=refine_weight,
    )
    metrics: dict[str, Any] = {
        "fixed": str(fix.path),
        "moving": str(mov.path),
        "fixed_labels": None if fix_lab is None else str(fix_lab.path),
        "moving_labels": None if mov_lab is None else str(mov_lab.path),
        "model": {
            "label": model_label(net),
            "source": getattr(net, "source", None),
            "config": dict(net.config),
        },
        "device": str(resolve_device(device)),
        "precision": precision if is_neural(net) else "n/a",
        "runtime_s": result.runtime_s,
        "network_s": result.network_s,
        "refine": {"steps": refine, "weight": refine_weight, "seconds": result.refine_s},
        **result.jacobian_stats(),
        "fixed_shape": list(fix.shape),
        "fixed_spacing_mm": list(fix.spacing),
        "network_shape": list(result.network_shape),
        "network_spacing_mm": list(result.network_spacing),
        "ddf_convention": DDF_CONVENTION,
    }
    if mov_lab is not None and fix_lab is not None:
        assert result.moving_label_on_fixed is not None and result.warped_label is not None
        before = score_labels(result.moving_label_on_fixed, fix_lab.array, labels, fix.spacing)
        after = score_labels(result.warped_label, fix_lab.array, labels, fix.spacing)
        metrics["labels"] = {
            str(lab): {"organ": organ_name(lab), "before": before[lab], "after": after[lab]}
            for lab in labels
        }
        metrics["mean_before"] = _mean_scores(before)
        metrics["mean_after"] = _mean_scores(after)

    tmp, created = atomic_output_dir(out)
    try:
        save_nifti(tmp / "warped.nii.gz", result.warped, result.fixed_affine)
        save_ddf(tmp / "ddf.nii.gz", result.ddf_mm, result.fixed_affine)
        save_nifti(tmp / "jacobian.nii.gz", result.jacobian, result.fixed_affine)
        if result.warped_label is not None:
            save_nifti(tmp / "warped_labels.nii.gz", result.warped_label, result.fixed_affine)
        assert result.moving_on_fixed is not None and result.ddf_vox is not None
        figures.overlay_figure(
            fix.array,
            result.moving_on_fixed,
            result.warped,
            result.ddf_vox,
            None if fix_lab is None else fix_lab.array,
            result.warped_label,
            tmp / "overlay.png",
            spacing=fix.spacing,
            affine=fix.affine,
            labels=labels,
            title=f"{Path(str(mov.path)).name} -> {Path(str(fix.path)).name} ({model_label(net)}"
            + (f" + {refine} refinement steps)" if refine else ")"),
        )
        if head_masks:
            if result.levels is not None and any(
                lv.head_masks is not None for lv in result.levels.levels
            ):
                assert result.network_fixed is not None
                figures.head_mask_figure(
                    result.levels, result.network_fixed, tmp / "head_masks.png"
                )
                metrics["head_masks"] = "head_masks.png"
            else:
                metrics["head_masks"] = "not available: the model has no multi-head masks"
        metrics["total_s"] = time.perf_counter() - t0
        write_json(tmp / "metrics.json", metrics)
        finish_output_dir(tmp, out)
    except BaseException:
        abandon_output_dir(tmp, created)
        raise
    return _jsonable(metrics)


# --------------------------------------------------------------------------------- CLI
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _run(args: Any) -> int:
    labels = args.labels if args.labels else PAPER_ORGANS
    metrics = register_files(
        args.fixed,
        args.moving,
        args.out,
        args.model,
        moving_labels=args.moving_labels,
        fixed_labels=args.fixed_labels,
        device=args.device,
        labels_to_score=labels,
        head_masks=args.head_masks,
        precision=args.precision,
        channels_last=args.channels_last,
        refine=args.refine,
        refine_weight=args.refine_weight,
    )
    print_report(metrics, Path(args.out), args.moving, args.fixed)
    return 0


def print_report(metrics: dict[str, Any], out: Path, moving: Any, fixed: Any) -> None:
    """Print what :func:`register_files` did: runtime, files, folding, Dice before/after."""
    files = sorted(p.name for p in out.iterdir())
    print(
        f"registered {moving} to {fixed} with {metrics['model']['label']} in "
        f"{metrics['runtime_s']:.2f} s (network {metrics['network_s']:.2f} s"
        + (
            f", {metrics['refine']['steps']} refinement steps {metrics['refine']['seconds']:.2f} s"
            if metrics["refine"]["steps"]
            else ""
        )
        + ")"
    )
    print(f"outputs in {out}/: {', '.join(files)}")
    print(
        f"folding {_fmt(metrics['folding_percent'], '.3f')} %, "
        f"SD log|J| {_fmt(metrics['sd_log_jacobian'], '.4f')}"
    )
    if "labels" in metrics:
        mb, ma = metrics["mean_before"]["dice"], metrics["mean_after"]["dice"]
        print(f"Dice before -> after (mean over labels present): {_fmt(mb)} -> {_fmt(ma)}")
        for lab, s in metrics["labels"].items():
            b, a = s["before"]["dice"], s["after"]["dice"]
            if b is None and a is None:
                continue
            print(f"  {lab:>3} {s['organ']:<24} {_fmt(b)} -> {_fmt(a)}")
    sys.stdout.flush()


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "register",
        help="register a moving NIfTI image to a fixed one",
        description="Register MOVING to FIXED (world space, identity start) and write the "
        "warped image, the DDF (mm, world axes), the Jacobian, an overlay figure and metrics "
        "into a new folder. " + DDF_CONVENTION,
    )
    p.add_argument("--fixed", required=True, help="fixed image (.nii/.nii.gz)")
    p.add_argument("--moving", required=True, help="moving image (.nii/.nii.gz)")
    p.add_argument(
        "--model",
        default=None,
        help="model file or folder, 'identity', or a packaged model name (default: the "
        "packaged default)",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--moving-labels", help="moving label map (warped with nearest neighbour)")
    p.add_argument("--fixed-labels", help="fixed label map (Dice/ASD/HD95 before and after)")
    p.add_argument(
        "--labels",
        type=int,
        nargs="+",
        metavar="L",
        help="label values to score (default the paper's 9 organs)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    add_precision_options(p)
    add_refine_options(p)
    p.add_argument(
        "--head-masks", action="store_true", help="also draw the RA head masks (RAN models)"
    )
    p.set_defaults(func=_run)
