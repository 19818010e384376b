"""The separability report: run the probe over models, the figure, the JSON and the text.

:mod:`ranreg.separability` holds the theory (Theorem 1's bound) and the probe; this module
turns them into what ``ranreg separability`` and ``benchmarks/separability.py`` write.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ranreg.atomic import atomic_file
from ranreg.errors import RanregError
from ranreg.nn import build_model
from ranreg.nn.variants import capturable_range
from ranreg.separability import (
    DEFAULT_SHIFTS,
    empirical_separability,
    resolve_variant,
    theoretical_separability,
)

__all__ = ["format_separability", "plot_separability", "run_separability"]


# --------------------------------------------------------------------------------------------
# figure
# --------------------------------------------------------------------------------------------


def plot_separability(
    results: Mapping[str, tuple[Sequence[float], Sequence[float] | None, Sequence[float] | None]],
    path: str | os.PathLike[str],
    title: str | None = None,
    reference: float | None = None,
) -> Path:
    """Empirical separability (solid, markers) against the Theorem-1 bound (dashed steps).

    ``results`` maps a network's name to ``(distances, empirical, bound)``; either series
    may be ``None`` (no model measured / no level structure) and NaN values are skipped.
    The bound is drawn as steps between the given distances (it is a step function of p).
    ``reference`` (optional) draws a horizontal line, e.g. the probes' true jump 2 max(s).
    The x axis is logarithmic (base 2) when every distance is positive; the y axis is
    logarithmic when every plotted value is positive (bounds and untrained networks differ
    by orders of magnitude), symmetric-log otherwise. The file is written to a temporary
    sibling and renamed into place; its format follows the suffix (default png).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(path)
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    dashes = [(6, 2), (3, 2), (1, 1.5), (8, 2, 1, 2), (4, 1, 1, 1, 1, 1)]
    all_positive_x, plotted = True, []
    for i, (name, (distances, empirical, bound)) in enumerate(results.items()):
        x = np.asarray(distances, dtype=np.float64)
        all_positive_x &= bool(np.all(x > 0))
        color = f"C{i % 10}"
        if bound is not None:
            y = np.asarray(bound, dtype=np.float64)
            style = {"lw": 2.6 - 0.4 * (i % 4), "dashes": dashes[i % len(dashes)]}
            ax.step(x, y, where="post", color=color, label=f"{name} bound (Thm 1)", **style)
            plotted.append(y)
        if empirical is not None:
            y = np.asarray(empirical, dtype=np.float64)
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], "o-", color=color, label=f"{name} empirical")
            plotted.append(y[ok])
    if reference is not None:
        ax.axhline(
            reference, color="0.4", lw=1, ls=":", label=f"true jump of the probes ({reference:g})"
        )
        plotted.append(np.array([reference]))
    values = np.concatenate(plotted) if plotted else np.array([])
    values = values[np.isfinite(values)]
    if all_positive_x and results:
        ax.set_xscale("log", base=2)
    if values.size and np.all(values > 0):
        ax.set_yscale("log")
    elif values.size and np.any(values > 0):
        ax.set_yscale("symlog", linthresh=float(np.min(values[values > 0])))
    ax.set_xlabel("distance p between the two points (voxels, L-inf)")
    ax.set_ylabel("max ||phi(x) - phi(y)||_inf (voxels)")
    ax.set_title(title or "Motion separability Delta_inf(p)")
    ax.grid(alpha=0.3, which="both")
    if results or reference is not None:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        with atomic_file(target) as tmp:
            fig.savefig(tmp, format=target.suffix.lstrip(".") or "png", dpi=120)
    finally:
        plt.close(fig)
    return target


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

_NOTE = (
    "bound: Theorem 1, sum of 2 a_k over levels k with p >= p_k (mode 'all'; 'best': p >= 1). "
    "empirical: max ||phi(x)-phi(y)||_inf across a sliding boundary (halves moved by -s/+s); "
    "it depends on the weights: untrained networks show only what random weights produce."
)


def _json_list(values: np.ndarray | None) -> list[float | None] | None:
    if values is None:
        return None
    return [float(v) if math.isfinite(v) else None for v in values]


def _parse_checkpoints(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise RanregError(f"--checkpoint {item!r}: expected NAME=PATH")
        out.append((name, path))
    return out


def run_separability(
    models: Sequence[str],
    checkpoints: Sequence[tuple[str, str]],
    ndim: int,
    shape: Sequence[int],
    distances: Sequence[int],
    *,
    mode: str = "all",
    empirical: bool = True,
    shifts: Sequence[float] = DEFAULT_SHIFTS,
    n_pairs: int = 2,
    seed: int = 0,
    axis: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Bound (and, unless ``empirical=False``, measurement) per network, as a JSON-able dict.

    ``models`` are built untrained (seeded with ``seed``); ``checkpoints`` are
    ``(label, path)`` pairs of trained model files, which replace a same-named entry of
    ``models`` or are added after them.
    """
    entries, loaded = _networks(models, checkpoints, ndim, device)
    rows = []
    for label, entry in entries.items():
        bound, levels = _bound(entry["architecture"], distances, mode)
        measured = None
        if empirical:
            model = loaded.get(label)
            if model is None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model = build_model(entry["architecture"], ndim=ndim).to(device)
            measured = empirical_separability(
                model, ndim, shape, distances, n_pairs, seed, shifts=shifts, axis=axis
            )
        rows.append({**entry, "levels": levels, "bound": bound, "empirical": measured})
    return {
        "ndim": ndim,
        "shape": list(shape),
        "distances": list(distances),
        "mode": mode,
        "shifts": list(shifts),
        "n_pairs": n_pairs,
        "seed": seed,
        "axis": axis,
        "true_jump": 2.0 * max(abs(s) for s in shifts),
        "note": _NOTE,
        "models": rows,
    }


def _networks(
    models: Sequence[str], checkpoints: Sequence[tuple[str, str]], ndim: int, device: str
) -> tuple[dict[str, dict[str, Any]], dict[str, nn.Module]]:
    """The report's entries by label (architectures, then checkpoints, which replace an
    architecture of the same label) and the loaded checkpoints' models."""
    from ranreg.checkpoint import load_model

    entries: dict[str, dict[str, Any]] = {}
    for name in models:
        entries[name] = {"name": name, "architecture": name, "source": "untrained", "path": None}
    loaded: dict[str, nn.Module] = {}
    for label, path in checkpoints:
        model = load_model(path, device=device)
        if int(model.config.get("ndim", ndim)) != ndim:
            got = model.config["ndim"]
            raise RanregError(f"--checkpoint {label}={path}: a {got}D model, --ndim is {ndim}")
        loaded[label] = model
        entries[label] = {
            "name": label,
            "architecture": model.config["name"],
            "source": "checkpoint",
            "path": str(path),
        }
    return entries, loaded


def _bound(
    architecture: str, distances: Sequence[int], mode: str
) -> tuple[np.ndarray | None, list[dict[str, Any]]]:
    """Theorem 1's bound at ``distances`` and each level's capturable range; none for an
    architecture without RA levels (a U-Net)."""
    try:
        bound = theoretical_separability(architecture, distances, mode)
        variant = resolve_variant(architecture)
    except ValueError:
        return None, []
    levels = [
        {"level": k, "scale": variant.scales[k], "range": capturable_range(variant, k)}
        for k in range(len(variant.scales))
    ]
    return bound, levels


def _to_json(result: dict[str, Any]) -> dict[str, Any]:
    out = dict(result)
    out["models"] = [
        {**row, "bound": _json_list(row["bound"]), "empirical": _json_list(row["empirical"])}
        for row in result["models"]
    ]
    return out


def format_separability(result: dict[str, Any]) -> str:
    """A text table: one ``bound`` and one ``empirical`` row per network, one column per p."""
    distances = result["distances"]
    width = max([7, *(len(str(p)) + 1 for p in distances)])
    label_width = max([18, *(len(r["name"]) + 11 for r in result["models"])])

    def fmt(v: float | None) -> str:
        return f"{'-':>{width}}" if v is None or not math.isfinite(v) else f"{v:>{width}.2f}"

    shape = "x".join(map(str, result["shape"]))
    lines = [
        f"motion separability Delta_inf(p), voxels ({result['ndim']}D probe {shape}, "
        f"mode '{result['mode']}')",
        f"{'p (voxels)':<{label_width}}" + "".join(f"{p:>{width}}" for p in distances),
    ]
    untrained = False
    for row in result["models"]:
        bound = row["bound"]
        lines.append(
            f"{row['name'] + ' bound':<{label_width}}"
            + ("".join(fmt(v) for v in bound) if bound is not None else "  n/a (no levels)")
        )
        if row["empirical"] is not None:
            tag = " empirical" + ("*" if row["source"] == "untrained" else "")
            untrained |= row["source"] == "untrained"
            lines.append(
                f"{row['name'] + tag:<{label_width}}" + "".join(fmt(v) for v in row["empirical"])
            )
    rule = "p >= p_k" if result["mode"] == "all" else "p >= 1"
    lines.append(f"bound: Theorem 1, sum of 2 a_k over the levels k with {rule}")
    if any(r["empirical"] is not None for r in result["models"]):
        lines.append(
            "empirical: max ||phi(x) - phi(y)||_inf over voxel pairs across a sliding boundary "
            f"(probe halves moved by -s/+s; true jump up to {result['true_jump']:g})"
        )
    if untrained:
        lines.append(
            "* untrained network (random weights): the empirical number depends on training; "
            "pass --checkpoint NAME=PATH for a trained model"
        )
    if any(r["empirical"] is not None and np.isnan(r["empirical"]).any() for r in result["models"]):
        lines.append("-: no voxel pair at that distance across the boundary of this probe size")
    return "\n".join(lines)
