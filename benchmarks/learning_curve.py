"""Learning curves of long runs kept in training-state/ (issue 12).

    python benchmarks/learning_curve.py training-state/ran3-synth [more state folders] \
        --out docs/results/learning-curve.md

Reads each kept state's ``val_log.csv`` (validation Dice between the validation subjects,
end-point error on the real validation scans under known fields) and ``chunks.csv`` (what
ran where), draws both curves against steps (``learning-curve.png`` beside the markdown)
and writes the table with the command, date and machine that made it.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from common import provenance


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open())) if path.is_file() else []


def _plot(curves: dict[str, list[dict[str, str]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, rows in curves.items():
        steps = [int(r["step"]) for r in rows]
        axes[0].plot(steps, [float(r["dice"]) for r in rows], "o-", label=name)
        epe = [(int(r["step"]), float(r["epe_mm"])) for r in rows if r.get("epe_mm")]
        if epe:
            axes[1].plot(*zip(*epe, strict=True), "o-", label=name)
        first = rows[0] if rows else {}
        if first.get("dice_identity"):
            axes[0].axhline(float(first["dice_identity"]), ls="--", color="0.5")
        if first.get("epe_mm_identity"):
            axes[1].axhline(float(first["epe_mm_identity"]), ls="--", color="0.5")
    axes[0].set(title="validation Dice (9 organs, 0025<->0026)", xlabel="step", ylabel="Dice")
    axes[1].set(title="real scans, known fields: end-point error", xlabel="step", ylabel="mm")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="dashed: no registration", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("states", nargs="+", type=Path, help="training-state/NAME folders")
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    args = parser.parse_args()
    curves = {s.name: _rows(s / "val_log.csv") for s in args.states}
    figure = args.out.with_suffix(".png")
    _plot(curves, figure)
    lines = ["# Learning curves of the kept runs", "", *provenance(), "", f"![]({figure.name})"]
    for state in args.states:
        lines += ["", f"## {state.name}", "", "| step | val Dice | real-scan EPE (mm) |"]
        lines += ["|---:|---:|---:|"]
        for r in curves[state.name]:
            epe = f"{float(r['epe_mm']):.2f}" if r.get("epe_mm") else "-"
            lines.append(f"| {r['step']} | {float(r['dice']):.3f} | {epe} |")
        first = curves[state.name][0] if curves[state.name] else {}
        if first.get("dice_identity"):
            lines.append(
                f"\nNo registration: Dice {float(first['dice_identity']):.3f}, end-point error "
                f"{float(first.get('epe_mm_identity') or 'nan'):.2f} mm."
            )
        chunks = _rows(state / "chunks.csv")
        if chunks:
            lines += ["", "| chunk | steps | s/step | bf16 | machine | started (UTC) |"]
            lines += ["|---:|---|---:|---|---|---|"]
            for k, c in enumerate(chunks, start=1):
                lines.append(
                    f"| {k} | {c['first_step']}-{c['last_step']} | {c['s_per_step']} | "
                    f"{c['bf16']} | {c['machine']} | {c['started_utc']} |"
                )
            lines.append(f"\nCommand of the last chunk: `{chunks[-1]['command']}`")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out} and {figure}")


if __name__ == "__main__":
    main()
