"""What ``ranreg evaluate`` writes: per-model statistics, ``summary.md``, ``summary.json``
and paired Wilcoxon tests (of the per-pair mean Dice, first model vs each other one).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import stats

from ranreg.options import RegistrationOptions
from ranreg.runtime import is_neural, resolve_precision

__all__ = [
    "ModelRun",
    "has_landmarks",
    "mean_sd",
    "pair_rows",
    "summarise",
    "wilcoxon_table",
]

_SCORES = (("dice", "Dice"), ("asd_mm", "ASD (mm)"), ("hd95_mm", "HD95 (mm)"))
#: what each Wilcoxon table tests, by its key
_TESTED = {"dice": "Dice", "landmark_error_mm": "landmark error"}


class ModelRun(NamedTuple):
    """One row of the comparison: a model and how it runs."""

    name: str
    net: torch.nn.Module
    options: RegistrationOptions


def _mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.array([x for x in values if math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return math.nan, math.nan, 0
    sd = float(v.std(ddof=1)) if v.size > 1 else math.nan
    return float(v.mean()), sd, int(v.size)


def mean_sd(mean: float, sd: float, digits: int) -> str:
    """``mean ± sd`` with ``digits`` decimals (``n/a`` for a missing mean)."""
    if not math.isfinite(mean):
        return "n/a"
    if not math.isfinite(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _pair_means(rows: list[dict[str, Any]], model: str, key: str) -> dict[tuple[str, str], float]:
    """Per pair: the mean of ``key`` over organs (NaN entries skipped)."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["model"] == model:
            acc.setdefault((r["moving"], r["fixed"]), []).append(r[key])
    out = {}
    for pair, vals in acc.items():
        finite = [v for v in vals if math.isfinite(v)]
        out[pair] = float(np.mean(finite)) if finite else math.nan
    return out


def wilcoxon_table(
    rows: list[dict[str, Any]], models: Sequence[str], key: str = "dice"
) -> list[dict[str, Any]]:
    """Paired Wilcoxon signed-rank tests of the per-pair mean of ``key`` over organs (Dice,
    or ``landmark_error_mm``, the same on every row of a pair): ``models[0]`` vs each
    other."""
    if len(models) < 2:
        return []
    first = _pair_means(rows, models[0], key)
    out = []
    for other in models[1:]:
        second = _pair_means(rows, other, key)
        pairs = [p for p in first if p in second]
        a = np.array([first[p] for p in pairs])
        b = np.array([second[p] for p in pairs])
        keep = np.isfinite(a) & np.isfinite(b)
        a, b = a[keep], b[keep]
        entry: dict[str, Any] = {
            "first": models[0],
            "second": other,
            "n": int(a.size),
            "median_difference": float(np.median(a - b)) if a.size else math.nan,
            "statistic": math.nan,
            "p_value": math.nan,
            "note": "",
        }
        if a.size == 0:
            entry["note"] = f"no pairs with {_TESTED.get(key, key)} for both"
        elif np.all(a == b):
            entry["note"] = "all differences are zero"
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = stats.wilcoxon(a, b)
                entry["statistic"] = float(res.statistic)
                entry["p_value"] = float(res.pvalue)
            except ValueError as exc:
                entry["note"] = str(exc)
        out.append(entry)
    return out


def _name(info: dict[str, Any], label: int) -> str:
    return info["label_names"].get(str(label), f"label {label}")


#: per-pair quantities of the regularity table (they repeat over a pair's organ rows)
#: and the digits shown for each
_PER_PAIR = (
    ("folding_percent", 3, "folding %"),
    ("sd_log_jacobian", 4, "SD log det J"),
    ("runtime_s", 2, "runtime (s)"),
    ("network_s", 2, "network (s)"),
    ("landmark_error_mm", 2, "landmark error (mm)"),  # shown when the subjects have them
)


def _stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample sd and count of the finite ``values``, as in ``summary.json``."""
    m, s, n = _mean_sd(values)
    return {"mean": m, "sd": s, "n": n}


def _fmt_stat(stat: dict[str, Any], digits: int) -> str:
    return mean_sd(stat["mean"], stat["sd"], digits)


def pair_rows(rows: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """One row per pair of ``model``: the first organ's, since the regularity and the runtime
    are the same on every organ row of a pair."""
    per_pair: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r["model"] == model:
            per_pair.setdefault((r["moving"], r["fixed"]), r)
    return list(per_pair.values())


def _model_stats(rows: list[dict[str, Any]], model: str, labels: Sequence[int]) -> dict[str, Any]:
    """The statistics of one model, in the layout of ``summary.json``: each score per organ
    (keyed by the label as text), over pairs of the mean over organs (``mean_over_organs``),
    and the regularity and runtime over pairs (``per_pair``)."""
    keys = [key for key, _ in _SCORES]
    stats: dict[str, Any] = {}
    for lab in labels:
        mine = [r for r in rows if r["model"] == model and r["label"] == lab]
        stats[str(lab)] = {key: _stat([r[key] for r in mine]) for key in keys}
    stats["mean_over_organs"] = {
        key: _stat(list(_pair_means(rows, model, key).values())) for key in keys
    }
    pairs = pair_rows(rows, model)
    stats["per_pair"] = {key: _stat([r.get(key, math.nan) for r in pairs]) for key, *_ in _PER_PAIR}
    return stats


def _md_header(models: list[ModelRun], labels: Sequence[int], info: dict[str, Any]) -> list[str]:
    """The title, the data set and one row per model: its network, precision and pipeline."""
    lines = [
        "# Evaluation",
        "",
        f"- data: `{info['data']}` (split: {info['split'] or 'none'}), "
        f"{info['subjects']} subjects: {', '.join(info['subject_names'])}",
        f"- ordered pairs (moving, fixed): {info['pairs']}"
        + (f" ({info['pairs_from']})" if info.get("pairs_from") else "")
        + "; organs: "
        + (", ".join(f"{lab} {_name(info, lab)}" for lab in labels) or "none (no label maps)"),
        f"- device: {info['device']}; scores on each fixed image's original grid; "
        "mean ± sd (sample sd) over pairs; NaN (organ absent) left out",
        "",
        "| model | source | network | precision | pipeline |",
        "|---|---|---|---|---|",
    ]
    for name, net, opts in models:
        neural = is_neural(net)
        prec = resolve_precision(opts.precision, torch.device(info["device"]))
        lines.append(
            f"| {name} | `{getattr(net, 'source', '')}` | {net.config.get('name')} | "
            f"{prec if neural else 'n/a'} | "
            f"{opts.describe(neural)} |"
        )
    return lines


def _md_scores(
    stats: dict[str, dict[str, Any]],
    names: Sequence[str],
    labels: Sequence[int],
    info: dict[str, Any],
) -> list[str]:
    """One table per score: a row per organ and one for the mean over organs."""
    lines: list[str] = []
    for key, title in _SCORES:
        digits = 3 if key == "dice" else 2
        lines += ["", f"## {title} per organ", "", "| organ | " + " | ".join(names) + " |"]
        lines.append("|---" * (len(names) + 1) + "|")
        for lab in labels:
            cells = [_fmt_stat(stats[name][str(lab)][key], digits) for name in names]
            lines.append(f"| {lab} {_name(info, lab)} | " + " | ".join(cells) + " |")
        cells = [_fmt_stat(stats[name]["mean_over_organs"][key], digits) for name in names]
        lines.append("| **mean over organs** | " + " | ".join(cells) + " |")
    return lines


def _md_regularity(stats: dict[str, dict[str, Any]], names: Sequence[str]) -> list[str]:
    """The folding, SD log det J, runtimes (and landmark error, where measured) over pairs,
    a row per model."""
    shown = [
        (key, digits, title)
        for key, digits, title in _PER_PAIR
        if any(stats[name]["per_pair"][key]["n"] for name in names)
    ]
    lines = [
        "",
        "## Regularity and runtime per pair",
        "",
        "| model | " + " | ".join(title for *_, title in shown) + " |",
        "|---" * (len(shown) + 1) + "|",
    ]
    for name in names:
        per_pair = stats[name]["per_pair"]
        cells = [_fmt_stat(per_pair[key], digits) for key, digits, _ in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _md_wilcoxon(tests: list[dict[str, Any]], key: str) -> list[str]:
    """The table of :func:`wilcoxon_table` for ``key`` (or why there is none)."""
    what = "per-pair mean Dice over organs" if key == "dice" else "per-pair mean landmark error"
    lines = ["", f"## Paired Wilcoxon signed-rank tests ({what})", ""]
    if not tests:
        return [*lines, "Only one model: no test."]
    lines += [
        "| comparison | pairs | median difference | W | p |",
        "|---|---|---|---|---|",
    ]
    for t in tests:
        w = "n/a" if not math.isfinite(t["statistic"]) else f"{t['statistic']:g}"
        p = "n/a" if not math.isfinite(t["p_value"]) else f"{t['p_value']:.4g}"
        med = (
            "n/a" if not math.isfinite(t["median_difference"]) else f"{t['median_difference']:+.4f}"
        )
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['first']} vs {t['second']} | {t['n']} | {med} | {w} | {p}{note} |")
    lines += [
        "",
        "scipy.stats.wilcoxon, two-sided; the difference is first minus second model.",
    ]
    return lines


def _markdown(
    models: list[ModelRun],
    labels: Sequence[int],
    info: dict[str, Any],
    stats: dict[str, dict[str, Any]],
    tests: dict[str, list[dict[str, Any]]],
) -> str:
    """The text of ``summary.md``: score tables and Dice tests where there are labels,
    landmark tests where there are landmarks."""
    names = [r.name for r in models]
    lines = [*_md_header(models, labels, info)]
    if labels:
        lines += _md_scores(stats, names, labels, info)
    lines += _md_regularity(stats, names)
    for key, table in tests.items():
        lines += _md_wilcoxon(table, key)
    figures = []
    if labels:
        figures.append("`boxplots.png` (all organs) and `boxplots/` (one figure per organ)")
    if "landmark_error_mm" in tests:
        figures.append("`landmarks.png` (landmark error per pair)")
    lines += ["", f"Box plots: {'; '.join(figures)}.", ""]
    return "\n".join(lines)


def _summary_json(
    info: dict[str, Any], stats: dict[str, dict[str, Any]], tests: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """The content of ``summary.json`` (also what :func:`evaluate` returns): ``wilcoxon``
    tests Dice, ``wilcoxon_landmarks`` the landmark error (each where measured)."""
    out: dict[str, Any] = {"info": info, "models": stats}
    if "dice" in tests:
        out["wilcoxon"] = tests["dice"]
    if "landmark_error_mm" in tests:
        out["wilcoxon_landmarks"] = tests["landmark_error_mm"]
    return out


def has_landmarks(rows: list[dict[str, Any]]) -> bool:
    """Whether any pair of ``rows`` has a landmark error."""
    return any(math.isfinite(r.get("landmark_error_mm", math.nan)) for r in rows)


def summarise(
    rows: list[dict[str, Any]],
    models: list[ModelRun],
    labels: Sequence[int],
    info: dict[str, Any],
) -> tuple[str, dict[str, Any]]:
    """``summary.md`` and ``summary.json``, from statistics computed once for both."""
    names = [r.name for r in models]
    stats = {name: _model_stats(rows, name, labels) for name in names}
    keys = (["dice"] if labels else []) + (["landmark_error_mm"] if has_landmarks(rows) else [])
    tests = {key: wilcoxon_table(rows, names, key) for key in keys}
    return _markdown(models, labels, info, stats, tests), _summary_json(info, stats, tests)
