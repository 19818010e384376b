"""A trained RAN as trained, and with the same weights made inverse-consistent (issue 12).

    python benchmarks/inverse_consistency.py ran3.abdomen-weak \
        training-state/ran3-synth/model-best --out docs/results/inverse-consistency.md

For each model (a packaged name or a model folder) the network is run twice on the same
cases: as stored, and as ``RAN(..., inverse_consistent=True)`` with the same weights (the
flow of the antisymmetric velocity (g(m, f) - g(f, m)) / 2; no retraining). Cases: the
two shared real scans (validation data, never trained on) on the network's 8 mm grid under
known smooth fields (:func:`ranreg.validation.known_field_cases`, ``--per-scan`` each).
Scores, in mm inside the body, mean over cases: end-point error to the known field;
self-registration |f(a, a)| of the fixed image; the round trip |f(a, b) o f(b, a)| (the
residual of x -> x + u_ab(x) -> ... + u_ba(...)); folding (% of voxels with det J <= 0).
One thread, float32.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, provenance

SCANS = (
    ROOT.parent / "shared" / "data" / "real-scans" / "chest-ct-1p5mm.nii.gz",
    ROOT.parent / "shared" / "data" / "real-scans" / "abdomen-mr-3mm.nii.gz",
)


def load(name: str) -> Any:
    """A packaged model name or a model folder/file, in eval mode."""
    from ranreg.checkpoint import load_model
    from ranreg.registry import create_model

    if Path(name).exists():
        return load_model(name).eval()
    return create_model(name, pretrained=True).eval()


def made_consistent(net: Any) -> Any:
    """The same weights in ``RAN(..., inverse_consistent=True)``."""
    from ranreg.nn import RAN

    config = net.config
    aligner = "plain" if config["name"].endswith("-noRA") else "ra"
    ic = RAN(net.variant, ndim=net.ndim, heads=net.heads, aligner=aligner, inverse_consistent=True)
    ic.load_state_dict(net.state_dict())
    return ic.eval()


def scores(net: Any, cases: list[Any]) -> dict[str, float]:
    """Mean end-point error, self-registration, round trip (mm) and folding (%)."""
    import torch

    from ranreg.spatial import compose_ddf, jacobian_determinant

    rows: dict[str, list[float]] = {"epe": [], "self": [], "round_trip": [], "folding": []}
    with torch.no_grad():
        for c in cases:
            m, f = (torch.from_numpy(x)[None, None] for x in (c.moving, c.fixed))
            body = torch.from_numpy(c.body)
            u, back, same = net(m, f), net(f, m), net(f, f)

            def mm(field: torch.Tensor, c: Any = c, body: torch.Tensor = body) -> float:
                return float(torch.linalg.norm(field[0], dim=0)[body].mean()) * c.spacing

            rows["epe"].append(mm(u - torch.from_numpy(c.ddf)[None]))
            rows["self"].append(mm(same))
            rows["round_trip"].append(mm(compose_ddf(back, u)))
            rows["folding"].append(float((jacobian_determinant(u) <= 0).float().mean()) * 100)
    return {k: float(np.mean(v)) for k, v in rows.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="packaged names or model folders")
    p.add_argument("--per-scan", type=int, default=3, help="known-field cases per scan")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "inverse-consistency.md")
    args = p.parse_args()
    import torch

    from ranreg.validation import known_field_cases

    torch.set_num_threads(1)
    lines = ["# Inverse consistency by construction, without retraining", "", *provenance(), ""]
    head = "| model | output | EPE (mm) | self-registration (mm) | round trip (mm) | folding (%) |"
    lines += [head, "|---|---|---:|---:|---:|---:|"]
    no_reg = None
    for name in args.models:
        net = load(name)
        window = net.config.get("window", [-100, 300])
        spacing = float(net.config.get("spacing", [8.0])[0])
        cases = known_field_cases([str(s) for s in SCANS], spacing, window, args.per_scan, 0)
        no_reg = float(np.mean([c.identity_error() for c in cases]))
        for label, model in (("as trained", net), ("inverse-consistent", made_consistent(net))):
            s = scores(model, cases)
            lines.append(
                f"| {name} | {label} | {s['epe']:.2f} | {s['self']:.2f} | "
                f"{s['round_trip']:.2f} | {s['folding']:.2f} |"
            )
            print(lines[-1], flush=True)
    lines += ["", f"No registration: EPE {no_reg:.2f} mm (the known fields' mean length)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
