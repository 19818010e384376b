"""Write docs/summary.md: `ranreg summary` for every model at one input size.

Each model runs in its own process (`ranreg summary --json`) so that peak-memory readings
do not mix. Usage:

    python benchmarks/summary_table.py [--shape 96 80 128] [--models RAN0 RAN3 ...]
        [--device cpu] [--out docs/summary.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

from common import machine

DEFAULT_MODELS = ["RAN0", "RAN3", "RAN4", "RAN4+", "RAN4+-noRA", "VoxelMorph"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[96, 80, 128])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="docs/summary.md")
    args = p.parse_args()
    rows = []
    for name in args.models:
        cmd = [
            "ranreg",
            "summary",
            "--model",
            name,
            "--ndim",
            "3",
            "--shape",
            *map(str, args.shape),
            "--device",
            args.device,
            "--json",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(run.stdout))
        print(f"{name}: done", file=sys.stderr)
    shape = "x".join(map(str, args.shape))
    lines = [
        f"# Network summary at {shape} (3D)",
        "",
        f"Made by `python benchmarks/summary_table.py --shape {' '.join(map(str, args.shape))}"
        f" --device {args.device}` on {dt.date.today().isoformat()},",
        f"machine: {machine()}.",
        "Each row is `ranreg summary --model NAME --ndim 3 --shape "
        f"{' '.join(map(str, args.shape))} --json`: one pair (batch 1), inference "
        "(`torch.no_grad`), fp32. MACs count convolutions and matrix products "
        "(`torch.utils.flop_counter`, 1 MAC = 2 FLOPs); peak memory is the rise of the "
        "process's resident set during the pass on CPU (CUDA allocator peak on GPU); time is "
        "a second, uncounted pass and varies with machine load.",
        "",
        "| model | parameters | MACs (G) | peak memory (MiB) | time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['macs'] / 1e9:.1f} | {mem} | "
            f"{r['forward_seconds']:.1f} |"
        )
    lines += [
        "",
        "Per-level pooling size p_k, matching dilations r_k and capturable motion range "
        "a_k = p_k (1 + 2 ||r_k||_1) / 2 (input voxels):",
        "",
    ]
    ran = [r for r in rows if r["levels"]]
    lines.append("| level | " + " | ".join(f"{r['model']} p, r, a" for r in ran) + " |")
    lines.append("|---|" + "---|" * len(ran))
    for k in range(5):
        cells = []
        for r in ran:
            lv = r["levels"][k]
            cells.append(
                f"{lv['scale']}, ({lv['dilation'][0]}, {lv['dilation'][1]}), {lv['range']:g}"
            )
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
