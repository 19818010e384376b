"""Motion separability of trained networks against the Theorem-1 bound of their architecture.

    python benchmarks/separability.py --checkpoint RAN3=runs/budget/RAN3/model ...
    python benchmarks/separability.py --quick      # < 10 min: the packaged model, 32^3 probe

`ranreg separability` for every given trained model (and the packaged default): per
distance p, the largest displacement difference the network produces between two voxels p
apart across the sliding boundary of a 3D probe (two textured halves moved by -s and +s,
s = 2, 4, 8 voxels), next to the bound Theorem 1 gives for its architecture. Writes
``docs/results/separability.md``, ``.json`` and ``.png`` with the command, date and machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ROOT, provenance


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64])
    p.add_argument("--distances", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--quick", action="store_true", help="packaged model only, 32^3 probe")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "separability.md")
    args = p.parse_args()

    from ranreg.errors import RanregError
    from ranreg.pretrained import DEFAULT_MODEL, path_of
    from ranreg.separability_report import (
        _parse_checkpoints,
        _to_json,
        format_separability,
        plot_separability,
        run_separability,
    )

    shape = [32, 32, 32] if args.quick else args.shape
    distances = [d for d in args.distances if d < shape[0]]
    try:
        checkpoints = [(DEFAULT_MODEL, str(path_of(DEFAULT_MODEL)))]
        checkpoints += [] if args.quick else _parse_checkpoints(args.checkpoint)
        result = run_separability([], checkpoints, 3, shape, distances)
    except RanregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    png = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_separability(
        {r["name"]: (distances, r["empirical"], r["bound"]) for r in result["models"]},
        png,
        title="Motion separability of trained networks (3D probe) vs Theorem 1",
        reference=result["true_jump"],
    )
    args.out.with_suffix(".json").write_text(json.dumps(_to_json(result), indent=2) + "\n")
    lines = [
        "# Motion separability: trained networks vs Theorem 1",
        "",
        *provenance(),
        "",
        "```text",
        format_separability(result),
        "```",
        "",
        f"![separability]({png.name})",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(format_separability(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
