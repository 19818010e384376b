"""Evaluation and report of the 2D study (benchmarks/study_2d.py): test scores of every
trained network, ANTs SyN and no registration; paired tests; separability; figures."""

from __future__ import annotations

import argparse
import csv
import json
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from common import provenance

#: metrics of the tables: (key, heading, lower is better)
METRICS = (
    ("dice", "mean Dice", False),
    ("epe_mm", "EPE (mm)", True),
    ("epe_boundary_mm", "EPE near sliding boundary (mm)", True),
    ("folding_percent", "folding %", True),
    ("sd_log_jacobian", "SD log J", True),
)
#: the paper's claims as paired comparisons: (better?, than, metric)
CLAIMS = (
    ("RAN4+", "RAN4+-noRA", "epe_boundary_mm"),
    ("RAN4+", "RAN4+-noRA", "dice"),
    ("RAN4+", "RAN4", "dice"),
    ("RAN4", "RAN3", "dice"),
    ("RAN3", "RAN0", "dice"),
    ("RAN4+", "RAN4", "epe_boundary_mm"),
    ("RAN4", "RAN3", "epe_boundary_mm"),
    ("RAN3", "RAN0", "epe_boundary_mm"),
    ("RAN4+", "VoxelMorph-pkg", "epe_boundary_mm"),
    ("RAN4+", "VoxelMorph-pkg", "dice"),
    ("RAN4+", "ants-syn", "epe_boundary_mm"),
    ("RAN4+", "ants-syn", "dice"),
)
#: validation points in the running mean of the learning-curve figure
CURVE_WINDOW = 5
#: the issue's question: the best network by validation against no registration and the peers
PEERS = ("identity", "VoxelMorph-pkg", "ants-syn")
ORGAN_NAMES = {
    1: "spleen",
    2: "r kidney",
    3: "l kidney",
    5: "esophagus",
    6: "liver",
    8: "aorta",
    9: "IVC",
    10: "portal/splenic v",
    11: "pancreas",
}


def _test_pairs(cache: Path, limit: int | None) -> list[dict[str, Any]]:
    from study_2d import TEST_SEED
    from study_2d_data import known_pairs, load_split

    pairs = known_pairs(load_split("test", cache), TEST_SEED)
    if limit is not None:  # spread over subjects; pairs alternate sliding, smooth
        step = max(len(pairs) // limit, 1) & ~1
        pairs = [pairs[i * step + i % 2] for i in range(min(limit, len(pairs) // max(step, 1)))]
    return pairs


def _syn_fields(pairs: list[dict[str, Any]], work: Path) -> list[np.ndarray]:
    """ANTs SyN's fields, computed once per pair and kept in ``work/syn``."""
    from ranreg.peers import AntsSyN

    folder = work / "syn"
    folder.mkdir(parents=True, exist_ok=True)
    syn, out = None, []
    for p in pairs:
        file = folder / f"{p['name']}.npy"
        if not file.is_file():
            syn = syn or AntsSyN()
            np.save(file, syn.register_arrays(p["moving"], p["fixed"]))
        out.append(np.load(file))
    return out


def evaluate(
    args: argparse.Namespace, runs: list[tuple[str, int]], cache: Path, limit: int | None
) -> dict[str, Any]:
    """Per-pair scores: ``{method: {seed: [row per pair]}}`` and the runs' progress."""
    from study_2d import predict, run_name, trained_steps
    from study_2d_data import score

    from ranreg.checkpoint import load_model

    pairs = _test_pairs(cache, limit)
    zero = [np.zeros_like(p["ddf"]) for p in pairs]
    scores: dict[str, dict[int, list[dict[str, float]]]] = {
        "identity": {0: [score(p, d) for p, d in zip(pairs, zero, strict=True)]},
        "ants-syn": {
            0: [score(p, d) for p, d in zip(pairs, _syn_fields(pairs, args.work), strict=True)]
        },
    }
    progress = []
    for model, seed in runs:
        run = args.state / run_name(model, seed)
        if trained_steps(run) == 0:  # not started (or no chunk finished yet)
            continue
        net = load_model(run / "model-best")
        fields = predict(net, pairs)
        scores.setdefault(model, {})[seed] = [
            score(p, d) for p, d in zip(pairs, fields, strict=True)
        ]
        val = list(csv.DictReader((run / "val_log.csv").open()))
        chunks = list(csv.DictReader((run / "chunks.csv").open()))
        progress.append(
            {
                "run": run_name(model, seed),
                "steps": trained_steps(run),
                "best_step": net.config["trained_steps"],
                "val": [
                    (int(r["step"]), float(r["epe_mm"]), float(r["epe_boundary_mm"])) for r in val
                ],
                "chunks": chunks,
            }
        )
    return {
        "pairs": [p["name"] for p in pairs],
        "kinds": [p["kind"] for p in pairs],
        "scores": scores,
        "progress": progress,
    }


def _per_pair(seeds: dict[int, list[dict[str, float]]], key: str) -> np.ndarray:
    """One value per test pair, the mean over seeds."""
    values = np.array([[r.get(key, math.nan) for r in rows] for rows in seeds.values()])
    if not values.size:
        return values
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # organs absent from a plane
        return np.nanmean(values, axis=0)


def _cell(seeds: dict[int, list[dict[str, float]]], key: str) -> str:
    values = [[r.get(key, math.nan) for r in rows] for rows in seeds.values()]
    if not np.isfinite(values).any():
        return "–"
    means = [np.nanmean(v) for v in values]
    if not np.isfinite(means).any():
        return "–"
    text = f"{np.nanmean(means):.3f}" if key != "folding_percent" else f"{np.nanmean(means):.2f}"
    return text + (f" ± {np.std(means):.3f}" if len(means) > 1 else "")


def results_table(scores: dict[str, Any]) -> list[str]:
    head = "| method | seeds | " + " | ".join(h for _, h, _ in METRICS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(METRICS)]
    for method, seeds in scores.items():
        cells = " | ".join(_cell(seeds, k) for k, _, _ in METRICS)
        lines.append(f"| {method} | {len(seeds)} | {cells} |")
    return lines


def claims_table(
    scores: dict[str, Any], claims: tuple[tuple[str, str, str], ...] = CLAIMS
) -> list[str]:
    """Paired Wilcoxon signed-rank tests over the test pairs (seed means per pair) of each
    (better?, than, metric) in ``claims``."""
    from scipy.stats import wilcoxon

    lines = [
        "| claim | metric | mean difference | pairs | Wilcoxon p | holds (p < 0.05) |",
        "|---|---|---:|---:|---:|---|",
    ]
    lower = {k: low for k, _, low in METRICS}
    for better, worse, key in claims:
        if better not in scores or worse not in scores:
            continue
        a, b = _per_pair(scores[better], key), _per_pair(scores[worse], key)
        ok = np.isfinite(a) & np.isfinite(b)
        diff = a[ok] - b[ok]
        p = wilcoxon(diff).pvalue if ok.sum() > 1 and np.any(diff != 0) else 1.0
        wins = diff.mean() < 0 if lower[key] else diff.mean() > 0
        verdict = "yes" if wins and p < 0.05 else ("no: the reverse" if p < 0.05 else "no: n.s.")
        lines.append(
            f"| {better} better than {worse} | {key} | {diff.mean():+.3f} | "
            f"{ok.sum()} | {p:.2g} | {verdict} |"
        )
    return lines


def organ_table(scores: dict[str, Any]) -> list[str]:
    organs = list(ORGAN_NAMES)
    lines = [
        "| method | " + " | ".join(ORGAN_NAMES.values()) + " |",
        "|---|" + "---:|" * len(organs),
    ]
    for method, seeds in scores.items():
        values = [_per_pair(seeds, f"dice_{o}") for o in organs]
        cells = [f"{np.nanmean(v):.3f}" if np.isfinite(v).any() else "–" for v in values]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _figures(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = result["scores"]
    methods = list(scores)
    fig, ax = plt.subplots(figsize=(14, 4.5))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        data = [
            v[np.isfinite(v)] for v in (_per_pair(scores[method], f"dice_{o}") for o in ORGAN_NAMES)
        ]
        pos = np.arange(len(ORGAN_NAMES)) + (j - (len(methods) - 1) / 2) * width
        box = ax.boxplot(
            data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False
        )
        for patch in box["boxes"]:
            patch.set_facecolor(plt.cm.tab10(j % 10))
        ax.plot([], [], "s", color=plt.cm.tab10(j % 10), label=method)
    ax.set_xticks(np.arange(len(ORGAN_NAMES)), list(ORGAN_NAMES.values()))
    ax.set_ylabel("Dice (test pairs)")
    ax.legend(ncol=len(methods), fontsize=8, loc="lower center")
    fig.tight_layout()
    dice_png = out.with_name(out.stem + "-dice.png")
    fig.savefig(dice_png, dpi=110)
    plt.close(fig)

    curve_png = _curve_figure(
        result["progress"], result["trends"], out.with_name(out.stem + "-curves.png")
    )
    return [f"![per-organ Dice]({dice_png.name})", "", f"![learning curves]({curve_png.name})"]


def _curve_figure(progress: list[dict[str, Any]], trend: dict[str, Any], png: Path) -> Path:
    """Validation EPE and EPE near sliding boundaries against steps, one line per network
    (the mean over its seeds) and its running mean; then the cycle ends in log-log with
    their fitted trend (:func:`trends`) carried on to twice the steps."""
    import matplotlib.pyplot as plt

    from ranreg.figures_training import running_mean

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    seeds = Counter(_network(r["run"]) for r in progress)
    for ax, column, title in (
        (axes[0], 1, "validation EPE (mm)"),
        (axes[1], 2, "validation EPE near sliding boundaries (mm)"),
    ):
        for j, (model, curve) in enumerate(_val_by_model(progress, None, column).items()):
            steps, values = np.array(list(curve)), np.array(list(curve.values()))
            colour = plt.cm.tab10(j % 10)
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            label = f"{model} ({seeds[model]} seeds)" if seeds[model] > 1 else model
            ax.plot(steps, running_mean(values, CURVE_WINDOW), color=colour, label=label)
        ax.set_xlabel("step")
        ax.set_title(title)
    _trend_panel(axes[2], progress, trend)
    axes[0].legend(fontsize=7)
    fig.text(
        0.5,
        0.01,
        f"faint: mean over seeds; bold: its centred mean over {CURVE_WINDOW} validation points",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _trend_panel(ax: Any, progress: list[dict[str, Any]], trend: dict[str, Any]) -> None:
    """Each network's validation EPE at its cycle ends (dots) and the power law fitted to
    the last of them (line), extrapolated to twice the steps (dashed)."""
    import matplotlib.pyplot as plt

    ax.set_title("validation EPE at cycle ends, trend (log-log)")
    if not trend["rows"]:
        return
    ends = trend["ends"]
    curves = _val_by_model(progress, ends[-1])
    for j, model in enumerate(_val_by_model(progress)):
        if model not in trend["rows"]:
            continue
        colour, row = plt.cm.tab10(j % 10), trend["rows"][model]
        cycle_ends = range(trend["cycle"], ends[-1] + 1, trend["cycle"])
        ax.plot(cycle_ends, [curves[model][k] for k in cycle_ends], "o", color=colour, ms=4)
        fitted = np.geomspace(ends[0], ends[-1])
        ahead = np.geomspace(ends[-1], 2 * ends[-1])
        ax.plot(fitted, row["scale"] * fitted ** row["slope"], "-", color=colour, label=model)
        ax.plot(ahead, row["scale"] * ahead ** row["slope"], "--", color=colour)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not powers of ten
        axis.set_major_formatter(plt.ScalarFormatter())
        axis.set_minor_formatter(plt.NullFormatter())
    ax.set_yticks([5, 6, 7, 8, 9, 10, 11])
    ax.set_xticks([2500, 5000, 10000, 20000])
    ax.set_xlabel("step (dashed: extrapolated)")
    ax.legend(fontsize=7)


def _separability(args: argparse.Namespace, result: dict[str, Any], out: Path) -> list[str]:
    from ranreg.separability_report import format_separability, plot_separability, run_separability

    checkpoints = [
        (r["run"], str(args.state / r["run"] / "model-best")) for r in result["progress"]
    ]
    if not checkpoints:
        return []
    distances = [1, 2, 4, 8, 16, 32]
    sep = run_separability([], checkpoints, 2, [96, 96], distances)
    png = out.with_name(out.stem + "-separability.png")
    plot_separability(
        {r["name"]: (distances, r["empirical"], r["bound"]) for r in sep["models"]},
        png,
        title="2D study: motion separability vs Theorem 1",
        reference=sep["true_jump"],
    )
    result["separability"] = sep
    return ["```text", format_separability(sep), "```", "", f"![separability]({png.name})"]


def _progress_table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| run | steps trained | model tested (step) | val EPE at the last three "
        "validations (mm) |",
        "|---|---:|---:|---|",
    ]
    for r in result["progress"]:
        last = ", ".join(f"{e:.2f}" for _, e, _ in r["val"][-3:])
        lines.append(f"| {r['run']} | {r['steps']} | {r['best_step']} | {last} |")
    lines += [
        "",
        "Chunks (each run continues from its kept state):",
        "",
        "| run | steps | s/step | date | machine | command |",
        "|---|---|---:|---|---|---|",
    ]
    for r in result["progress"]:
        for c in r["chunks"]:
            lines.append(
                f"| {r['run']} | {c['first_step']}-{c['last_step']} | {c['s_per_step']} | "
                f"{c['date']} | {c['machine']} | `{c.get('command') or '-'}` |"
            )
    return lines


#: a run has reached its plateau when the validation EPE fell by less than this fraction
#: over the last fifth of its last cycle (the low-rate phase) and, after a restart, from
#: one cycle's end to the next
PLATEAU = 0.02


def _network(run: str) -> str:
    """The network of a run's name: ``RAN4+-noRA-s1`` -> ``RAN4+-noRA``."""
    return run.rsplit("-s", 1)[0]


def _val_by_model(
    progress: list[dict[str, Any]], at: int | None = None, column: int = 1
) -> dict[str, dict[int, float]]:
    """Validation curve per network, the mean over its seeds at the steps every one of them
    was validated. ``at``: only seeds validated at that step (one set of seeds along the
    whole curve); ``column``: 1 for EPE, 2 for EPE near sliding boundaries."""
    seen: dict[str, list[dict[int, float]]] = {}
    for r in progress:
        if at is not None and at not in {row[0] for row in r["val"]}:
            continue
        seen.setdefault(_network(r["run"]), []).append({row[0]: row[column] for row in r["val"]})
    curves = {}
    for model, seeds in seen.items():
        steps = sorted(set.intersection(*(set(c) for c in seeds)))
        curves[model] = {k: float(np.mean([c[k] for c in seeds])) for k in steps}
    return curves


def _last_cycle_end(progress: list[dict[str, Any]], cycle: int) -> int:
    """The last cycle end any run has been validated at (0: none yet)."""
    return max((step for r in progress for step, _, _ in r["val"]), default=0) // cycle * cycle


def convergence(progress: list[dict[str, Any]], cycle: int) -> dict[str, Any]:
    """Has each network stopped improving, and does the ranking change late in training?

    Points: the end of every finished cycle, and 40 % and 20 % of a cycle before the last
    one's end; per network the relative fall of the validation EPE over the last cycle's
    low-rate phase (from :data:`study_2d.DECAY_AT`) and from the previous cycle's end, and
    the verdict against :data:`PLATEAU`."""
    from study_2d import DECAY_AT

    last = _last_cycle_end(progress, cycle)
    if last == 0:
        return {"points": [], "rows": {}, "ranking": {}}
    curves = _val_by_model(progress, last)
    decay = last - round((1 - DECAY_AT) * cycle)
    points = sorted({last - int(0.4 * cycle), decay} | set(range(cycle, last + 1, cycle)))
    rows, ranking = {}, {}
    for model, curve in curves.items():
        end, start = curve[last], curve.get(decay, math.nan)
        previous = curve.get(last - cycle, math.nan) if last > cycle else math.nan
        fifth, whole = (start - end) / start, (previous - end) / previous
        rows[model] = {
            "epe": [curve.get(k, math.nan) for k in points],
            "fall_last_fifth": fifth,
            "fall_last_cycle": whole,
            "plateau": bool(fifth < PLATEAU and not whole >= PLATEAU),  # NaN: no earlier cycle
        }
    for k in points:
        at = {m: curves[m][k] for m in rows if k in curves[m]}
        ranking[k] = sorted(at, key=at.get)
    return {"points": points, "rows": rows, "ranking": ranking}


#: cycle ends in the trend fit: the recent slope, not the warm-up of the first cycles
TREND_POINTS = 3


def trends(progress: list[dict[str, Any]], cycle: int) -> dict[str, Any]:
    """Where each network's validation EPE is heading: a power law E = k s^slope fitted
    (least squares in log-log) to its last :data:`TREND_POINTS` cycle ends, and the step at
    which it would meet the trend of the network first at the last cycle end.

    A floor cannot be fitted from a handful of points (a 3-parameter fit left it anywhere
    within +-5 mm here), so the trend has none: an extrapolation to read as "how far away",
    never as a result."""
    last = _last_cycle_end(progress, cycle)
    ends = list(range(cycle, last + 1, cycle))[-TREND_POINTS:]
    if len(ends) < 2:
        return {"ends": ends, "cycle": cycle, "rows": {}}
    fits = {}
    for model, curve in _val_by_model(progress, last).items():
        epe = np.log([curve[k] for k in ends])
        slope, log_k = np.polyfit(np.log(ends), epe, 1)
        fits[model] = (float(slope), float(log_k), float(math.exp(epe[-1])))
    best = min(fits, key=lambda m: fits[m][2])
    rows = {}
    for model, (slope, log_k, end) in fits.items():
        b_slope, b_log_k, _ = fits[best]
        # k s^slope = k_b s^slope_b; a meeting ahead needs the worse network to fall faster
        meet = math.exp((b_log_k - log_k) / (slope - b_slope)) if slope < b_slope else None
        rows[model] = {
            "epe": end,
            "slope": slope,
            "scale": math.exp(log_k),
            "fall_per_doubling": 1 - 2**slope,
            "at_double": math.exp(log_k) * (2 * last) ** slope,
            "meets_best_at": None if model == best else meet,  # None: never
        }
    return {"ends": ends, "cycle": cycle, "best": best, "rows": rows}


def trends_table(trend: dict[str, Any]) -> list[str]:
    if not trend["rows"]:
        return ["Fewer than two cycles have finished: no trend yet."]
    last = trend["ends"][-1]
    lines = [
        f"Trend of the validation EPE over the cycle ends {', '.join(map(str, trend['ends']))} "
        f"(a power law with no floor, least squares in log-log), projected to {2 * last} "
        f"steps, and where each network would meet {trend['best']}, the first at {last}. "
        "An extrapolation, not a measurement.",
        "",
        f"| network | val EPE at {last} | fall per doubling of steps | projected at "
        f"{2 * last} | meets {trend['best']} at step |",
        "|---|---:|---:|---:|---:|",
    ]
    for model, r in sorted(trend["rows"].items(), key=lambda kv: kv[1]["epe"]):
        meet = r["meets_best_at"]
        where = "–" if model == trend["best"] else "never" if meet is None else f"{meet:,.0f}"
        lines.append(
            f"| {model} | {r['epe']:.2f} | {r['fall_per_doubling']:.1%} | "
            f"{r['at_double']:.2f} | {where} |"
        )
    return lines


def best_against_peers(conv: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """Comparisons of the network first by validation EPE at the last point (never chosen
    on the test pairs) with :data:`PEERS`, near the sliding boundaries and in Dice."""
    if not conv["ranking"]:
        return ()
    best = conv["ranking"][max(conv["ranking"])][0]
    return tuple((best, peer, key) for peer in PEERS for key in ("epe_boundary_mm", "dice"))


def convergence_table(conv: dict[str, Any]) -> list[str]:
    if not conv["rows"]:
        return ["No network has finished a cycle yet."]
    points = conv["points"]
    lines = [
        "| network | "
        + " | ".join(f"val EPE at {k}" for k in points)
        + " | fall over the last fifth | fall over the last cycle | plateau |",
        "|---|" + "---:|" * (len(points) + 2) + "---|",
    ]
    for model, r in conv["rows"].items():
        cells = " | ".join(f"{e:.2f}" for e in r["epe"])
        cycle = "–" if math.isnan(r["fall_last_cycle"]) else f"{r['fall_last_cycle']:.1%}"
        verdict = "yes" if r["plateau"] else "no: still falling"
        lines.append(f"| {model} | {cells} | {r['fall_last_fifth']:.1%} | {cycle} | {verdict} |")
    lines += ["", "Ranking by validation EPE (best first):", ""]
    lines += [f"- step {k}: " + " < ".join(order) for k, order in conv["ranking"].items()]
    return lines


def report(
    args: argparse.Namespace, runs: list[tuple[str, int]], cache: Path, limit: int | None
) -> None:
    from study_2d import BATCH, DECAY_AT, LR, W_IMAGE, W_SMOOTH

    result = evaluate(args, runs, cache, limit)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    sliding = sum(k == "sliding" for k in result["kinds"])
    done = sum(r["steps"] >= args.steps for r in result["progress"])
    cycle = args.cycle
    result["convergence"] = convergence(result["progress"], cycle)
    result["trends"] = trends(result["progress"], cycle)
    lines = [
        "# 2D study: every variant on sliding motion (issue 14)",
        "",
        *provenance(),
        "",
        f"Recipe: {args.steps} steps planned per run, batch {BATCH}, Adam lr {LR} (a tenth "
        f"from {DECAY_AT:.0%} of each cycle of {cycle} steps), loss MSE "
        f"to the true field + {W_SMOOTH} |grad u|^2 + {W_IMAGE:g} MSE(warped, fixed) over pairs "
        "of one contrast, float32, one thread per run; the model "
        "of the lowest validation EPE is tested. Test: "
        f"{len(result['pairs'])} pairs of subjects 0027-0030 ({sliding} sliding, "
        f"{len(result['pairs']) - sliding} smooth), 4 mm planes. Multi-seed networks: mean "
        "± SD over seeds of the mean over pairs.",
        "",
        f"**Status: {done} of {len(runs)} runs have their {args.steps} steps**"
        + (
            ""
            if done == len(runs)
            else "; the rest is partial, not converged, and settles no claim below"
        )
        + ".",
        "",
        "## Training",
        "",
        *_progress_table(result),
        "",
        "## Convergence",
        "",
        f"A network is at its plateau when its validation EPE (mean over seeds) fell by less "
        f"than {PLATEAU:.0%} over the last fifth of its last cycle (learning rate a tenth) "
        "and, after a restart, over the whole last cycle.",
        "",
        *convergence_table(result["convergence"]),
        "",
        *trends_table(result["trends"]),
        "",
        "## Test scores",
        "",
        *results_table(result["scores"]),
        "",
        "## Per-organ Dice (test, mean over pairs and seeds)",
        "",
        *organ_table(result["scores"]),
        "",
        "## The paper's claims, paired over test pairs",
        "",
        *claims_table(result["scores"]),
        "",
        "## The best network by validation against no registration and the peers",
        "",
        *claims_table(result["scores"], best_against_peers(result["convergence"])),
        "",
        "## Motion separability of the trained networks",
        "",
        *_separability(args, result, out),
        "",
        "## Figures",
        "",
        *_figures(result, out),
        "",
    ]
    out.write_text("\n".join(lines), encoding="utf-8")
    out.with_suffix(".json").write_text(
        json.dumps(result, indent=1, default=_json) + "\n", encoding="utf-8"
    )
    print("\n".join(lines))


def _json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)
