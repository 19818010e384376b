"""Speed and memory of every model at the paper's grid and at twice its resolution.

    python benchmarks/speed.py                  # full: 96x80x128 and 192x160x256
    python benchmarks/speed.py --quick          # < 10 min: 96x80x128, RAN0/RAN3/ants-syn

One registration = `ranreg.pipeline.register_volumes` on a real anatomy pair (subjects 0027 ->
0028, images painted from the shared label maps) with the network run on the images' own
grid (4 mm: 96x80x128; 2 mm: 192x160x256): normalisation, the forward pass, the DDF's
Jacobian and the warp of image and labels. Networks carry random weights (speed does not
depend on them); ANTs SyN runs at its defaults with as many ITK threads as torch has.
Every (model, precision, size) runs in a fresh process, so the peak-memory readings (rise of
the resident set during the timed calls) do not mix. Writes ``docs/results/speed.md`` and
``.json`` with the command, the date and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, SHARED_LABELS, painted_subject, provenance

MODELS = ["RAN0", "RAN3", "RAN4", "RAN4+", "RAN4+-noRA", "VoxelMorph", "VoxelMorph-pkg"]
PEERS = ["ants-syn"]
QUICK_MODELS = ["RAN0", "RAN3"]
SIZES = {"4mm": 0.5, "2mm": 1.0}
PAIR = ("0027", "0028")


def make_data(folder: Path, size: str) -> dict[str, str]:
    from ranreg.data.io import save_nifti

    files = {}
    for role, name in zip(("moving", "fixed"), PAIR, strict=True):
        image, labels, affine = painted_subject(SHARED_LABELS, name, SIZES[size])
        files[role] = str(save_nifti(folder / f"{size}-{role}.nii.gz", image, affine))
        files[role + "_labels"] = str(
            save_nifti(folder / f"{size}-{role}-labels.nii.gz", labels, affine)
        )
    return files


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (model, precision, size) measurement, in this process."""
    threads = str(spec["threads"])
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", threads)
    import torch

    from ranreg.data.io import load_label_volume, load_nifti
    from ranreg.models import resolve_model
    from ranreg.nn import build_model
    from ranreg.pipeline import register_volumes
    from ranreg.runtime import is_neural
    from ranreg.summary import PeakMemory, flop_counter

    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    files = spec["files"]
    mov, fix = load_nifti(files["moving"]), load_nifti(files["fixed"])
    mov_lab = load_label_volume(files["moving_labels"])
    fix_lab = load_label_volume(files["fixed_labels"])
    name = spec["model"]
    net = resolve_model(name) if name in PEERS else build_model(name, ndim=3)
    net.config = {**net.config, "spacing": list(fix.spacing), "window": [-100.0, 300.0]}
    net.eval()
    dev = torch.device("cpu")
    precision = spec["precision"] if spec["precision"] in ("fp32", "bf16") else "fp32"

    def once() -> Any:
        # the network's own cost: no affine stage, no instance optimisation
        return register_volumes(
            net, mov, fix, mov_lab, fix_lab, dev, precision=precision, affine="none", fast=True
        )

    macs = None
    if spec["warmup"]:
        counter = flop_counter()
        with counter:
            once()
        macs = counter.get_total_flops() // 2 if is_neural(net) else None
    runs = []
    with PeakMemory(dev) as mem:
        for _ in range(spec["repeats"]):
            res = once()
            runs.append((res.runtime_s, res.network_s))
    return {
        **{k: spec[k] for k in ("model", "precision", "size", "repeats", "warmup")},
        "shape": list(fix.shape),
        "parameters": sum(p.numel() for p in net.parameters()),
        "macs": macs,
        "runtime_s": statistics.median(r for r, _ in runs),
        "network_s": statistics.median(n for _, n in runs),
        "runs_s": [r for r, _ in runs],
        "peak_memory_bytes": mem.bytes,
        "threads": int(threads),
    }


def run_one(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode < 0 else "failed"
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {**spec, "error": f"{why}: rc {proc.returncode} {tail[0][:200]}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - start
    return out


def _cell(r: dict[str, Any], key: str, scale: float = 1.0, spec: str = ".2f") -> str:
    if "error" in r:
        return "–"
    v = r.get(key)
    return "n/a" if v is None else format(v / scale, spec)


def table(rows: list[dict[str, Any]], sizes: list[str]) -> list[str]:
    lines = [
        "| model | precision | parameters | MACs at 96x80x128 (G) | "
        + " | ".join(f"{s} time (s) | {s} network (s) | {s} peak memory (GiB)" for s in sizes)
        + " |",
        "|---|---|---:|---:|" + "---:|---:|---:|" * len(sizes),
    ]
    keys = list(dict.fromkeys((r["model"], r["precision"]) for r in rows))
    for model, prec in keys:
        by = {r["size"]: r for r in rows if (r["model"], r["precision"]) == (model, prec)}
        first = next(iter(by.values()))
        macs = by.get("4mm", {}).get("macs")
        cells = [
            model,
            prec,
            f"{first.get('parameters', 0):,}" if "error" not in first else "–",
            "n/a" if macs is None else f"{macs / 1e9:.1f}",
        ]
        for s in sizes:
            r = by.get(s, {"error": "not run"})
            cells += [
                _cell(r, "runtime_s"),
                _cell(r, "network_s"),
                _cell(r, "peak_memory_bytes", 2**30),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        lines.append("")
        lines.append(f"- {r['model']} {r['precision']} {r['size']}: {r['error']}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="96x80x128, RAN0/RAN3/ants-syn only")
    p.add_argument("--models", nargs="+", help=f"default {' '.join(MODELS + PEERS)}")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), help="default 4mm 2mm")
    p.add_argument("--repeats", type=int, default=2, help="timed calls at 4 mm (1 at 2 mm)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "speed.md")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    models = args.models or ((QUICK_MODELS + PEERS) if args.quick else (MODELS + PEERS))
    sizes = args.sizes or (["4mm"] if args.quick else list(SIZES))
    repeats = 1 if args.quick else args.repeats
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = {s: make_data(Path(tmp), s) for s in sizes}
        for size in sizes:
            for model in models:
                for prec in args.precisions if model not in PEERS else ["fp32"]:
                    spec = {
                        "model": model,
                        "precision": prec if model not in PEERS else "n/a",
                        "size": size,
                        "files": data[size],
                        "threads": torch.get_num_threads(),
                        # at 2 mm one call costs minutes: no warm-up, one timed call
                        "warmup": size == "4mm",
                        "repeats": repeats if size == "4mm" else 1,
                    }
                    r = run_one(spec, args.timeout)
                    r.pop("files", None)
                    rows.append(r)
                    took = r.get("runtime_s")
                    print(
                        f"{size} {model} {spec['precision']}: "
                        + (r["error"] if "error" in r else f"{took:.2f} s"),
                        file=sys.stderr,
                        flush=True,
                    )
    names = {"4mm": "96x80x128 (4 mm)", "2mm": "192x160x256 (2 mm)"}
    lines = [
        "# Speed and memory per registered pair",
        "",
        *provenance(),
        "",
        "One pair (0027 -> 0028, images painted from the shared label maps) registered by "
        "`ranreg.pipeline.register_volumes` on the images' own grid: "
        + ", ".join(names[s] for s in sizes)
        + ". *time*: the whole call (normalisation, network, Jacobian, warping image and "
        "labels), median of "
        + (f"{repeats} timed call(s) after one warm-up at 4 mm" if "4mm" in sizes else "")
        + ("; one call without warm-up at 2 mm" if "2mm" in sizes else "")
        + "; *network*: the forward pass alone. *peak memory*: rise of the process's "
        "resident set during the timed calls (each measurement in a fresh process). "
        "Networks run with random weights, channels-last; bf16 = `--precision bf16` "
        "(autocast). ANTs SyN: `ants.registration(type_of_transform='SyN')` defaults, with "
        "as many ITK threads as torch uses. MACs: convolutions and matrix products of the "
        "warm-up call (`torch.utils.flop_counter`), 8x as many at 192x160x256.",
        "",
        *table(rows, sizes),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".md.tmp")
    tmp_out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
