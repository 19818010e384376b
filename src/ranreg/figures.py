"""Registration figures: overlays of one registered pair, box plots of an evaluation,
the RA modules' multi-head masks and training curves. Files only (matplotlib's Agg backend).

Slices are drawn from the arrays' own axes: a panel of the plane normal to array axis
``k`` shows the two other axes ``a < b`` with ``a`` horizontal and ``b`` vertical (origin at
the bottom left), with the aspect ratio of the voxel spacing when it is given.
"""

from __future__ import annotations

import csv
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

__all__ = ["overlay_figure", "boxplot_figure", "head_mask_figure"]

_PLANE_BY_CODE = {"R": "sagittal", "L": "sagittal", "A": "coronal", "P": "coronal"}
_PLANE_BY_CODE.update({"S": "axial", "I": "axial"})
_METRIC_LABELS = {
    "dice": "Dice",
    "asd_mm": "ASD (mm)",
    "hd95_mm": "HD95 (mm)",
    "asd": "ASD (mm)",
    "hd95": "HD95 (mm)",
}


def _organ(label: int, names: Mapping[int, str] | None = None) -> str:
    """The label's name in ``names`` (default: the abdomen organs), or ``label N``."""
    return (ORGAN_NAMES if names is None else names).get(int(label), f"label {int(label)}")


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def _save(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
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

    fix_rng, mov_rng = _display_range(fix), _display_range(mov)
    fix_s, mov_s, wrp_s = _scaled(fix, fix_rng), _scaled(mov, mov_rng), _scaled(wrp, mov_rng)
    diff_before, diff_after = np.abs(fix_s - mov_s), np.abs(fix_s - wrp_s)
    diff_max = max(float(np.percentile(diff_before, 99.5)), 1e-3)

    colors: dict[int, Any] = {}
    if fixed_label is not None:
        flab = _array(fixed_label)
        present = sorted(int(v) for v in np.unique(flab) if v != 0)
        if labels is not None:
            present = [v for v in present if v in {int(x) for x in labels}]
        colors = _label_colors(present)
    wlab = None if warped_label is None else _array(warped_label)

    columns = [
        "fixed",
        "moving (before)",
        "warped",
        "|fixed - moving|",
        "|fixed - warped|",
        "checkerboard fixed/warped",
        "deformation grid x + u(x)",
    ]
    fig, axes = plt.subplots(3, len(columns), figsize=(2.5 * len(columns), 2.9 * 3 + 0.6))
    for row, k in enumerate((2, 1, 0)):
        a, b = (ax for ax in range(3) if ax != k)
        idx = shape[k] // 2
        sl = tuple(idx if ax == k else slice(None) for ax in range(3))
        aspect = spacing[b] / spacing[a]
        f2, m2, w2 = fix_s[sl], mov_s[sl], wrp_s[sl]
        tile = max(2, min(f2.shape) // 6)
        ia, ib = np.meshgrid(np.arange(f2.shape[0]), np.arange(f2.shape[1]), indexing="ij")
        checker = np.where(((ia // tile + ib // tile) % 2) == 0, f2, w2)
        panels = [
            (f2, "gray", 1.0),
            (m2, "gray", 1.0),
            (w2, "gray", 1.0),
            (diff_before[sl], "magma", diff_max),
            (diff_after[sl], "magma", diff_max),
            (checker, "gray", 1.0),
            (f2, "gray", 1.0),
        ]
        for col, (img, cmap, vmax) in enumerate(panels):
            ax = axes[row, col]
            alpha = 0.35 if col == 6 else 1.0
            ax.imshow(
                img.T, cmap=cmap, vmin=0.0, vmax=vmax, origin="lower", aspect=aspect, alpha=alpha
            )
            head = columns[col]
            if col in (3, 4):
                head += f"\nmean {float(img.mean()):.3f}"
            ax.set_title(head if row == 0 else head.split("\n")[0], fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(
                    f"{planes[k]} ({'axis ' + str(k)} = {idx})\n"
                    f"{'axis ' + str(b)}{' ' + codes[b] if codes[b] else ''} ^",
                    fontsize=8,
                )
            ax.set_xlabel(f"axis {a}{' ' + codes[a] if codes[a] else ''} >", fontsize=7)
        if colors:
            _contours(axes[row, 0], flab[sl], colors, "solid")
            _contours(axes[row, 2], flab[sl], colors, "solid")
        if colors and wlab is not None:
            _contours(axes[row, 2], wlab[sl], colors, "dashed")
        step = max(1, min(f2.shape) // 12)
        ax = axes[row, 6]
        _deformation_grid(ax, disp[sl][..., a], disp[sl][..., b], step)
        ax.set_xlim(-0.5, f2.shape[0] - 0.5)
        ax.set_ylim(-0.5, f2.shape[1] - 0.5)
        maxu = float(np.sqrt((disp[sl][..., a] ** 2 + disp[sl][..., b] ** 2).max()))
        ax.set_title(f"{columns[6]}\nmax in-plane |u| {maxu:.2f}", fontsize=8)
    handles: list[Any] = [
        Patch(facecolor=c, edgecolor=c, label=f"{v} {_organ(v, names)}") for v, c in colors.items()
    ]
    if colors:
        handles.append(Line2D([], [], color="black", label="solid: fixed labels"))
        if wlab is not None:
            handles.append(
                Line2D([], [], color="black", linestyle="dashed", label="dashed: warped labels")
            )
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle(title or "registration overlay (mid slices)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if colors else 0, 1, 0.97))
    return _save(fig, path)


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
    label: int,
    models: Sequence[str],
    metric: str,
    colors: Sequence[Any],
) -> None:
    data = []
    for model in models:
        vals = [
            _float(r.get(metric))
            for r in rows
            if str(r.get("model")) == model and int(_float(r.get("label"))) == int(label)
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
                _save(fig, folder / f"{int(label):02d}_{_slug(_organ(label, names))}.png")
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
        written.append(_save(fig, combined_path, dpi=100))
    return written


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
    img = _array(image).astype(np.float32)
    while img.ndim > 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 3:
        raise ValueError(f"image must be 3D (optionally with leading 1s), got shape {img.shape}")
    shape = img.shape
    used = [(k, lv) for k, lv in enumerate(levels) if getattr(lv, "head_masks", None) is not None]
    if not used:
        raise ValueError("no level has head masks (a model without RA modules?)")
    a, b = (ax for ax in range(3) if ax != axis)
    mid = shape[axis] // 2
    sl = tuple(mid if ax == axis else slice(None) for ax in range(3))
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
        grid = masks.shape[1:]
        p = int(scales[k]) if k < len(scales) else max(1, round(shape[axis] / grid[axis]))
        idx = min(mid // p, grid[axis] - 1)
        msl = (slice(None), *(idx if ax == axis else slice(None) for ax in range(3)))
        m2 = masks[msl]  # (m, ga, gb)
        extent = (-0.5, grid[a] * p - 0.5, -0.5, grid[b] * p - 0.5)
        winner = m2.argmax(axis=0)
        weight = m2.max(axis=0)
        ax = axes[0, col]
        im = ax.imshow(
            winner.T,
            cmap=head_cmap,
            vmin=-0.5,
            vmax=heads - 0.5,
            origin="lower",
            extent=extent,
            interpolation="nearest",
        )
        ax.set_title(f"level {k} (cell {p} vox)\nargmax head", fontsize=8)
        ax2 = axes[1, col]
        im2 = ax2.imshow(
            weight.T,
            cmap="viridis",
            vmin=1.0 / heads,
            vmax=1.0,
            origin="lower",
            extent=extent,
            interpolation="nearest",
        )
        ax2.set_title(f"level {k}: softmax weight\nof the winning head", fontsize=8)
        for axx in (ax, ax2):
            axx.set_xlim(-0.5, shape[a] - 0.5)
            axx.set_ylim(-0.5, shape[b] - 0.5)
            axx.set_xticks([])
            axx.set_yticks([])
        if col == len(used):
            cb = fig.colorbar(im, ax=ax, ticks=range(heads), fraction=0.046)
            cb.set_label("head", fontsize=8)
            fig.colorbar(im2, ax=ax2, fraction=0.046)
    fig.suptitle("RA multi-head masks, coarse to fine", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, path)


# --------------------------------------------------------------------------------- training
def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    pad = np.pad(values, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(pad, kernel, mode="valid")


def plot_training(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Loss per stage (raw and running mean) and validation Dice of a training run."""
    run = Path(run_dir)
    rows = _read_csv(run / "train_log.csv")
    val = _read_csv(run / "val_log.csv") if (run / "val_log.csv").exists() else []
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(4.2 * (len(stages) + 1), 3.6))
    for ax, stage in zip(axes, stages, strict=False):
        sel = [r for r in rows if r["stage"] == stage]
        steps = np.array([int(r["step"]) for r in sel])
        loss = np.array([float(r["loss"]) for r in sel])
        ax.plot(steps, loss, color="0.75", lw=0.8, label="loss per step")
        ax.plot(
            steps, _smooth(loss, max(5, len(loss) // 20)), color="C0", lw=1.8, label="running mean"
        )
        ax.set_title(f"stage '{stage}'")
        ax.set_xlabel("step")
        ax.set_ylabel("weighted loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    if val:
        vsteps = [int(r["step"]) for r in val]
        vdice = [float(r["dice"]) for r in val]
        ax.plot(vsteps, vdice, "o-", color="C2", label="after registration")
        ident = [float(r["dice_identity"]) for r in val if r.get("dice_identity")]
        if ident:
            ax.axhline(ident[0], color="C3", ls="--", label="no registration")
        for s in stages[1:]:
            first = min(int(r["step"]) for r in rows if r["stage"] == s)
            ax.axvline(first - 0.5, color="0.5", ls=":", lw=1)
        ax.legend(fontsize=8)
    ax.set_title("validation: mean Dice over organs")
    ax.set_xlabel("step")
    ax.set_ylabel("Dice")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out, dpi=120)
