"""Registration figures: overlays of one registered pair, box plots of an evaluation and
the RA modules' multi-head masks. Files only (matplotlib's Agg backend). Training curves
are in :mod:`ranreg.figures_training`.

Slices are drawn from the arrays' own axes: a panel of the plane normal to array axis
``k`` shows the two other axes ``a < b`` with ``a`` horizontal and ``b`` vertical (origin at
the bottom left), with the aspect ratio of the voxel spacing when it is given.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ranreg.metrics import ORGAN_NAMES  # noqa: E402

__all__ = [
    "overlay_figure",
    "boxplot_figure",
    "landmark_boxplot",
    "head_mask_figure",
    "save_figure",
]

_PLANE_BY_CODE = {"R": "sagittal", "L": "sagittal", "A": "coronal", "P": "coronal"}
_PLANE_BY_CODE.update({"S": "axial", "I": "axial"})
_METRIC_LABELS = {
    "dice": "Dice",
    "asd_mm": "ASD (mm)",
    "hd95_mm": "HD95 (mm)",
    "asd": "ASD (mm)",
    "hd95": "HD95 (mm)",
    "landmark_error_mm": "landmark error (mm)",
}


def _organ(label: int, names: Mapping[int, str] | None = None) -> str:
    """The label's name in ``names`` (default: the abdomen organs), or ``label N``."""
    return (ORGAN_NAMES if names is None else names).get(int(label), f"label {int(label)}")


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and release it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


#: Soft-tissue display window for CT in HU (the paper's preprocessing window).
CT_WINDOW = (-100.0, 300.0)


def _display_range(image: np.ndarray) -> tuple[float, float]:
    if float(image.min()) < -500.0:  # CT in HU: show abdominal soft tissue, not air to bone
        return CT_WINDOW
    lo, hi = np.percentile(image, [1.0, 99.0])
    if not hi > lo:
        lo, hi = float(image.min()), float(image.max())
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _scaled(image: np.ndarray, rng: tuple[float, float]) -> np.ndarray:
    return np.clip((image - rng[0]) / (rng[1] - rng[0]), 0.0, 1.0)


def _ddf_last(ddf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A DDF as (*S, 3): accepts (*S, 3), (3, *S) and (1, 3, *S)."""
    d = _array(ddf)
    if d.ndim == len(shape) + 2 and d.shape[0] == 1:
        d = d[0]
    if d.shape == (*shape, len(shape)):
        return d
    if d.shape == (len(shape), *shape):
        return np.moveaxis(d, 0, -1)
    raise ValueError(f"ddf of shape {d.shape} does not fit images of shape {shape}")


def _plane_names(affine: np.ndarray | None) -> tuple[list[str], list[str]]:
    """Per array axis: the plane normal to it and the axis' direction code."""
    if affine is None:
        return [f"axis {k}" for k in range(3)], ["", "", ""]
    import nibabel as nib

    codes = [str(c) for c in nib.aff2axcodes(np.asarray(affine))]
    return [_PLANE_BY_CODE.get(c, f"axis {k}") for k, c in enumerate(codes)], codes


def _label_colors(values: Sequence[int]) -> dict[int, Any]:
    cmap = plt.get_cmap("tab10" if len(values) <= 10 else "tab20")
    return {v: cmap(i % cmap.N) for i, v in enumerate(values)}


def _contours(ax: Any, labels2d: np.ndarray, colors: Mapping[int, Any], style: str) -> None:
    for value, color in colors.items():
        mask = labels2d == value
        if mask.any() and not mask.all() and min(mask.shape) >= 2:
            ax.contour(
                mask.T.astype(np.float32),
                levels=[0.5],
                colors=[color],
                linewidths=1.0,
                linestyles=style,
            )


def _deformation_grid(ax: Any, da: np.ndarray, db: np.ndarray, step: int) -> None:
    na, nb = da.shape
    ia, ib = np.meshgrid(np.arange(na), np.arange(nb), indexing="ij")
    xa, xb = ia + da, ib + db
    for j in list(range(0, nb, step)) + ([nb - 1] if (nb - 1) % step else []):
        ax.plot(xa[:, j], xb[:, j], color="tab:red", linewidth=0.6)
    for i in list(range(0, na, step)) + ([na - 1] if (na - 1) % step else []):
        ax.plot(xa[i, :], xb[i, :], color="tab:red", linewidth=0.6)


_OVERLAY_COLUMNS = (
    "fixed",
    "moving (before)",
    "warped",
    "|fixed - moving|",
    "|fixed - warped|",
    "checkerboard fixed/warped",
    "deformation grid x + u(x)",
)


def _mid_slice(shape: Sequence[int], k: int) -> tuple[Any, ...]:
    """Index of the middle slice across array axis ``k`` of a 3D array of ``shape``."""
    return tuple(shape[k] // 2 if ax == k else slice(None) for ax in range(3))


def _image_panels(
    axes_row: Sequence[Any], first: bool, slices: Sequence[np.ndarray], dmax: float, aspect: float
) -> None:
    """One row's image panels from the scaled fixed, moving and warped slices (2D)."""
    f2, m2, w2 = slices
    tile = max(2, min(f2.shape) // 6)
    ia, ib = np.meshgrid(np.arange(f2.shape[0]), np.arange(f2.shape[1]), indexing="ij")
    checker = np.where(((ia // tile + ib // tile) % 2) == 0, f2, w2)
    images = [f2, m2, w2, np.abs(f2 - m2), np.abs(f2 - w2), checker, f2]
    for col, img in enumerate(images):
        ax = axes_row[col]
        is_diff = col in (3, 4)  # the differences share one scale up to ``dmax``
        cmap, vmax = ("magma", dmax) if is_diff else ("gray", 1.0)
        alpha = 0.35 if col == 6 else 1.0  # the deformation grid goes over a faint fixed image
        ax.imshow(img.T, cmap=cmap, vmin=0.0, vmax=vmax, origin="lower", aspect=aspect, alpha=alpha)
        head = _OVERLAY_COLUMNS[col]
        if is_diff:
            head += f"\nmean {float(img.mean()):.3f}"
        ax.set_title(head if first else head.split("\n")[0], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])


def _plane_labels(
    axes_row: Sequence[Any], k: int, idx: int, planes: list[str], codes: list[str]
) -> None:
    """The row's plane and slice on its first panel, the in-plane axes under every panel."""
    a, b = (ax for ax in range(3) if ax != k)
    axes_row[0].set_ylabel(
        f"{planes[k]} ({'axis ' + str(k)} = {idx})\n"
        f"{'axis ' + str(b)}{' ' + codes[b] if codes[b] else ''} ^",
        fontsize=8,
    )
    for ax in axes_row:
        ax.set_xlabel(f"axis {a}{' ' + codes[a] if codes[a] else ''} >", fontsize=7)


def _grid_panel(ax: Any, d2: np.ndarray, a: int, b: int) -> None:
    """The in-plane deformation grid of one plane's DDF slice ``d2`` (na, nb, 3)."""
    na, nb = d2.shape[:2]
    _deformation_grid(ax, d2[..., a], d2[..., b], max(1, min(na, nb) // 12))
    ax.set_xlim(-0.5, na - 0.5)
    ax.set_ylim(-0.5, nb - 0.5)
    maxu = float(np.sqrt((d2[..., a] ** 2 + d2[..., b] ** 2).max()))
    ax.set_title(f"{_OVERLAY_COLUMNS[6]}\nmax in-plane |u| {maxu:.2f}", fontsize=8)


def _overlay_legend(
    fig: Any, colors: Mapping[int, Any], names: Mapping[int, str] | None, dashed: bool
) -> None:
    """The organs' colours and the contour styles, below the panels (none without contours)."""
    if not colors:
        return
    handles: list[Any] = [
        Patch(facecolor=c, edgecolor=c, label=f"{v} {_organ(v, names)}") for v, c in colors.items()
    ]
    handles.append(Line2D([], [], color="black", label="solid: fixed labels"))
    if dashed:
        handles.append(
            Line2D([], [], color="black", linestyle="dashed", label="dashed: warped labels")
        )
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)


#: smallest colour scale of the difference panels, as a fraction of the display range:
#: without it a pair that starts aligned (self-registration) is shown on a scale set by
#: nothing, and interpolation noise after registration saturates the panel
DIFF_FLOOR = 0.05


def difference_scale(fixed_scaled: np.ndarray, moving_scaled: np.ndarray) -> float:
    """Top of the colour scale of the |difference| panels, both images scaled to [0, 1]:
    the 99.5th percentile of the difference before registration, at least
    :data:`DIFF_FLOOR`."""
    before = float(np.percentile(np.abs(fixed_scaled - moving_scaled), 99.5))
    return max(before, DIFF_FLOOR)


def overlay_figure(
    fixed: np.ndarray,
    moving_on_fixed: np.ndarray,
    warped: np.ndarray,
    ddf: np.ndarray,
    fixed_label: np.ndarray | None = None,
    warped_label: np.ndarray | None = None,
    path: str | os.PathLike[str] = "overlay.png",
    *,
    spacing: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    labels: Sequence[int] | None = None,
    title: str | None = None,
    names: Mapping[int, str] | None = None,
) -> Path:
    """Mid slices of one registered pair in the three planes, one row per plane.

    Columns: fixed, moving (resampled to the fixed grid, before registration), warped,
    |fixed - moving|, |fixed - warped|, a checkerboard of fixed and warped, and the
    deformation grid (grid lines of the fixed slice drawn at ``x + ddf(x)``, in-plane
    components) over the faint fixed image. Organ contours of ``fixed_label`` are drawn
    (solid) on the fixed and warped panels, those of ``warped_label`` (dashed) on the
    warped panel. ``ddf`` is (*S, 3) or (3, *S) with channel ``i`` along array axis ``i``
    (voxels or mm; the grid is drawn in voxel units, so pass voxels). ``spacing`` sets the
    pixel aspect ratio, ``affine`` names the planes, ``labels`` limits the contours.
    Intensities are shown between each image's 1st and 99th percentiles (CT in HU: the
    window [-100, 300]); the
    differences are between images scaled that way to [0, 1].
    """
    fix = _array(fixed).astype(np.float32)
    shape = fix.shape
    mov = _array(moving_on_fixed).astype(np.float32)
    wrp = _array(warped).astype(np.float32)
    for name, arr in (("moving_on_fixed", mov), ("warped", wrp)):
        if arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}, fixed has shape {shape}")
    disp = _ddf_last(ddf, shape)
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    planes, codes = _plane_names(affine)
    # the warped image is the moving one resampled, so it is shown in the moving one's range
    fix_rng, mov_rng = _display_range(fix), _display_range(mov)
    scaled = (_scaled(fix, fix_rng), _scaled(mov, mov_rng), _scaled(wrp, mov_rng))
    # one colour scale for both differences, so that before and after compare directly
    diff_max = difference_scale(scaled[0], scaled[1])
    flab: np.ndarray | None = None
    colors: dict[int, Any] = {}
    if fixed_label is not None:
        flab = _array(fixed_label)
        present = sorted(int(v) for v in np.unique(flab) if v != 0)
        if labels is not None:
            present = [v for v in present if v in {int(x) for x in labels}]
        colors = _label_colors(present)
    wlab = None if warped_label is None else _array(warped_label)

    ncol = len(_OVERLAY_COLUMNS)
    fig, axes = plt.subplots(3, ncol, figsize=(2.5 * ncol, 2.9 * 3 + 0.6))
    for row, k in enumerate((2, 1, 0)):
        a, b = (ax for ax in range(3) if ax != k)
        sl, aspect = _mid_slice(shape, k), spacing[b] / spacing[a]
        _image_panels(axes[row], row == 0, [v[sl] for v in scaled], diff_max, aspect)
        _plane_labels(axes[row], k, shape[k] // 2, planes, codes)
        if colors and flab is not None:
            _contours(axes[row, 0], flab[sl], colors, "solid")
            _contours(axes[row, 2], flab[sl], colors, "solid")
            if wlab is not None:
                _contours(axes[row, 2], wlab[sl], colors, "dashed")
        _grid_panel(axes[row, 6], disp[sl], a, b)
    _overlay_legend(fig, colors, names, wlab is not None)
    fig.suptitle(title or "registration overlay (mid slices)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if colors else 0, 1, 0.97))
    return save_figure(fig, path)


def _float(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _boxes(
    ax: Any,
    rows: Sequence[Mapping[str, Any]],
    label: int | None,
    models: Sequence[str],
    metric: str,
    colors: Sequence[Any],
) -> None:
    """One box per model of ``metric`` over the rows of ``label`` (None: every row)."""
    data = []
    for model in models:
        vals = [
            _float(r.get(metric))
            for r in rows
            if str(r.get("model")) == model
            and (label is None or int(_float(r.get("label"))) == int(label))
        ]
        data.append(np.array([v for v in vals if math.isfinite(v)], dtype=np.float64))
    positions = np.arange(1, len(models) + 1)
    filled = [i for i, d in enumerate(data) if d.size]
    if filled:
        parts = ax.boxplot(
            [data[i] for i in filled],
            positions=positions[filled],
            widths=0.6,
            patch_artist=True,
            showfliers=False,
            medianprops={"color": "black"},
        )
        for box, i in zip(parts["boxes"], filled, strict=True):
            box.set_facecolor(colors[i])
            box.set_alpha(0.75)
        rng = np.random.default_rng(0)
        for i in filled:
            jitter = rng.uniform(-0.12, 0.12, size=data[i].size)
            ax.scatter(positions[i] + jitter, data[i], s=6, color="black", zorder=3)
    for i, d in enumerate(data):
        if not d.size:
            ax.text(positions[i], 0.5, "n/a", transform=ax.get_xaxis_transform(), ha="center")
    ax.set_xticks(positions)
    ax.set_xticklabels(models, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(0.4, len(models) + 0.6)
    ax.set_ylabel(_METRIC_LABELS.get(metric, metric), fontsize=9)
    if metric == "dice":
        ax.set_ylim(-0.02, 1.02)
    ax.grid(axis="y", alpha=0.3)


def boxplot_figure(
    results: Iterable[Mapping[str, Any]],
    organs: Sequence[int],
    models: Sequence[str],
    path_per_organ_dir: str | os.PathLike[str] | None,
    combined_path: str | os.PathLike[str] | None,
    *,
    metrics: Sequence[str] = ("dice", "hd95_mm"),
    names: Mapping[int, str] | None = None,
) -> list[Path]:
    """Box plots of per-pair scores, one panel per organ with the models side by side.

    ``results`` are rows with keys ``model``, ``label`` and the ``metrics`` (default Dice
    and HD95 in mm, one row of panels each), e.g. the rows of ``results.csv`` (strings are
    converted; NaN and empty values are left out, a model without values shows "n/a").
    Writes one figure per organ into ``path_per_organ_dir`` (``NN_<organ>.png``) and all
    organs side by side into ``combined_path`` (either may be None). Returns the paths.
    """
    rows = list(results)
    models = [str(m) for m in models]
    cmap = plt.get_cmap("tab10")
    colors = [cmap(i % 10) for i in range(len(models))]
    legend = [Patch(facecolor=c, alpha=0.75, label=m) for m, c in zip(models, colors, strict=True)]
    written: list[Path] = []
    if path_per_organ_dir is not None:
        folder = Path(path_per_organ_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for label in organs:
            fig, axes = plt.subplots(
                len(metrics), 1, figsize=(1.1 * len(models) + 2.4, 2.6 * len(metrics) + 0.8)
            )
            axes = np.atleast_1d(axes)
            for ax, metric in zip(axes, metrics, strict=True):
                _boxes(ax, rows, label, models, metric, colors)
            fig.suptitle(f"Results on {_organ(label, names)} (label {label})", fontsize=10)
            fig.legend(handles=legend, loc="lower center", ncol=min(len(models), 4), fontsize=8)
            fig.tight_layout(rect=(0, 0.07, 1, 0.96))
            written.append(
                save_figure(fig, folder / f"{int(label):02d}_{_slug(_organ(label, names))}.png")
            )
    if combined_path is not None:
        n = len(organs)
        width = max(2.0, 0.55 * len(models) + 1.2)
        fig, axes = plt.subplots(
            len(metrics), n, figsize=(width * n + 0.5, 2.7 * len(metrics) + 1.0), squeeze=False
        )
        for col, label in enumerate(organs):
            for row, metric in enumerate(metrics):
                ax = axes[row, col]
                _boxes(ax, rows, label, models, metric, colors)
                if row == 0:
                    ax.set_title(_organ(label, names), fontsize=9)
                if col > 0:
                    ax.set_ylabel("")
        fig.legend(handles=legend, loc="lower center", ncol=min(len(models), 6), fontsize=9)
        fig.suptitle("Per-organ results over all ordered pairs", fontsize=11)
        fig.tight_layout(rect=(0, 0.06, 1, 0.96))
        written.append(save_figure(fig, combined_path, dpi=100))
    return written


def landmark_boxplot(
    pair_rows: Iterable[Mapping[str, Any]], models: Sequence[str], path: str | os.PathLike[str]
) -> Path:
    """Box plot of the mean landmark error of each pair (one row per model and pair, with
    the key ``landmark_error_mm``), the models side by side; written to ``path``."""
    models = [str(m) for m in models]
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(models))]
    fig, ax = plt.subplots(figsize=(0.9 * len(models) + 2.4, 3.4))
    _boxes(ax, list(pair_rows), None, models, "landmark_error_mm", colors)
    ax.set_title("Mean landmark error per pair", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _volume(image: Any) -> np.ndarray:
    """``image`` as a float32 3D array, leading singleton axes dropped."""
    img = _array(image).astype(np.float32)
    while img.ndim > 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 3:
        raise ValueError(f"image must be 3D (optionally with leading 1s), got shape {img.shape}")
    return img


def _cell_size(k: int, scales: Sequence[Any], size: int, cells: int) -> int:
    """Level ``k``'s cell size in voxels: the model's scale, else ``size`` voxels over ``cells``."""
    return int(scales[k]) if k < len(scales) else max(1, round(size / cells))


def _level_panels(
    axes_col: Sequence[Any],
    k: int,
    masks: np.ndarray,
    p: int,
    shape: tuple[int, ...],
    axis: int,
    head_cmap: Any,
) -> tuple[Any, Any]:
    """Level ``k``'s winning head and its weight (``masks`` (m, *grid), cells of ``p`` voxels).

    Returns the two images (for the colour bars).
    """
    heads = head_cmap.N  # the map has one colour per head
    a, b = (ax for ax in range(3) if ax != axis)
    grid = masks.shape[1:]
    idx = min((shape[axis] // 2) // p, grid[axis] - 1)  # the cell holding the image's mid slice
    m2 = masks[(slice(None), *(idx if ax == axis else slice(None) for ax in range(3)))]
    # stretch the cells over the voxels they cover, so the panels line up with the image
    extent = (-0.5, grid[a] * p - 0.5, -0.5, grid[b] * p - 0.5)
    ax, ax2 = axes_col
    kw = {"origin": "lower", "extent": extent, "interpolation": "nearest"}
    im = ax.imshow(m2.argmax(axis=0).T, cmap=head_cmap, vmin=-0.5, vmax=heads - 0.5, **kw)
    ax.set_title(f"level {k} (cell {p} vox)\nargmax head", fontsize=8)
    im2 = ax2.imshow(m2.max(axis=0).T, cmap="viridis", vmin=1.0 / heads, vmax=1.0, **kw)
    ax2.set_title(f"level {k}: softmax weight\nof the winning head", fontsize=8)
    for axx in (ax, ax2):
        axx.set_xlim(-0.5, shape[a] - 0.5)
        axx.set_ylim(-0.5, shape[b] - 0.5)
        axx.set_xticks([])
        axx.set_yticks([])
    return im, im2


def head_mask_figure(
    levels_output: Any,
    image: Any,
    path: str | os.PathLike[str],
    *,
    axis: int = 2,
) -> Path:
    """The RA modules' multi-head masks, coarse (level 0) to fine, on a mid slice.

    ``levels_output`` is ``model(m, f, return_levels=True)`` (a
    :class:`ranreg.nn.RegistrationOutput`) or its ``levels`` list; ``image`` is the fixed
    image on the network grid, (*S), (1, *S) or (1, 1, *S). Top row: the winning head
    (argmax of ``head_masks``, shape (1, m, *grid_k)); bottom row: its softmax weight. Each
    level's cells are drawn over the image's extent (cell size ``p_k``), so the panels line
    up with the image on the left. The slice is the middle one across array ``axis``.
    """
    levels = list(getattr(levels_output, "levels", levels_output))
    scales = list(getattr(levels_output, "scales", ()) or [])
    img = _volume(image)
    shape = img.shape
    used = [(k, lv) for k, lv in enumerate(levels) if getattr(lv, "head_masks", None) is not None]
    if not used:
        raise ValueError("no level has head masks (a model without RA modules?)")
    mid = shape[axis] // 2
    sl = _mid_slice(shape, axis)
    heads = int(_array(used[0][1].head_masks).shape[1])
    head_cmap = plt.get_cmap("tab10", heads) if heads <= 10 else plt.get_cmap("tab20", heads)

    fig, axes = plt.subplots(2, len(used) + 1, figsize=(2.6 * (len(used) + 1), 5.8), squeeze=False)
    for row in range(2):
        ax = axes[row, 0]
        ax.imshow(_scaled(img[sl], _display_range(img)).T, cmap="gray", origin="lower")
        ax.set_title(f"fixed (network grid)\naxis {axis} = {mid}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for col, (k, lv) in enumerate(used, start=1):
        masks = _array(lv.head_masks)[0].astype(np.float32)  # (m, *grid)
        p = _cell_size(k, scales, shape[axis], masks.shape[1 + axis])
        im, im2 = _level_panels(axes[:, col], k, masks, p, shape, axis, head_cmap)
        if col == len(used):
            cb = fig.colorbar(im, ax=axes[0, col], ticks=range(heads), fraction=0.046)
            cb.set_label("head", fontsize=8)
            fig.colorbar(im2, ax=axes[1, col], fraction=0.046)
    fig.suptitle("RA multi-head masks, coarse to fine", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return save_figure(fig, path)
