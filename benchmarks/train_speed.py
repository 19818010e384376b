"""Seconds per training step, before and after issue 12's speed work, and the rate reached.

    python benchmarks/train_speed.py            # RAN3 and RAN4+ (about 5 min on 2 cores)
    python benchmarks/train_speed.py --quick    # RAN3 only

One step = what `ranreg train` does for a synthetic-stage batch of 2 at 48x32x64 (the 8 mm
crops of configs/ran3-synth.yaml): the forward pass, the loss (MSE to a target field +
|grad u|^2), the backward pass and an Adam update, channels-last. Settings:

* ``fp32``: today's trainer on the CPU before issue 12 (no autocast);
* ``bf16, ATen norm``: bf16 autocast with PyTorch's own group-norm backward;
* ``bf16``: bf16 autocast with ranreg's instance norm (float32 statistics, own backward):
  what `ranreg train` does now where the CPU has AVX512-BF16 or AMX (``amp: null``);
* ``bf16, inverse-consistent``: the same with ``model.inverse_consistent`` (the aligners
  run both ways; configs/ran3-synth.yaml from step 2,239).

The achieved rate (GFLOP/s, counted by torch.utils.flop_counter) is set beside the rate of
a single 16 -> 16 channel 3x3x3 convolution (forward + backward) at the same size: the
ceiling a network of such layers could reach here. Writes docs/results/train-speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import ROOT, provenance

SHAPE = (2, 1, 48, 32, 64)


def _step_fn(name: str, bf16: bool, ic: bool = False):
    from ranreg import losses
    from ranreg.nn import build_model

    torch.manual_seed(0)
    model = build_model(name, ndim=3, heads=6, inverse_consistent=ic)
    model = model.to(memory_format=torch.channels_last_3d)
    x = torch.rand(SHAPE).to(memory_format=torch.channels_last_3d)
    y = torch.rand(SHAPE).to(memory_format=torch.channels_last_3d)
    target = torch.zeros(SHAPE[0], 3, *SHAPE[2:])
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ddf = model(x, y).float()
        loss = losses.mse_loss(ddf, target) + losses.gradient_l2(ddf)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return model, x, step


def time_steps(name: str, setting: str, repeats: int) -> float:
    import ranreg.nn.blocks as blocks

    saved = blocks._REDUCED
    if setting == "bf16, ATen norm":
        blocks._REDUCED = ()  # the custom backward off: ATen's group norm throughout
    try:
        _, _, step = _step_fn(name, bf16=setting != "fp32", ic="inverse" in setting)
        for _ in range(2):
            step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    finally:
        blocks._REDUCED = saved
    return statistics.median(times)


def step_flops(name: str, ic: bool = False) -> float:
    from ranreg.summary import flop_counter

    model, x, _ = _step_fn(name, bf16=False, ic=ic)
    with flop_counter() as counter:
        model(x, x).sum().backward()
    return float(counter.get_total_flops())


def conv_rate(bf16: bool, channels: int = 16) -> float:
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1).to(
        memory_format=torch.channels_last_3d
    )
    x = torch.randn(SHAPE[0], channels, *SHAPE[2:]).to(memory_format=torch.channels_last_3d)
    x.requires_grad_()

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)
        out.float().sum().backward()

    for _ in range(2):
        run()
    t0 = time.perf_counter()
    for _ in range(5):
        run()
    seconds = (time.perf_counter() - t0) / 5
    flops = 3 * 2 * SHAPE[0] * channels * channels * 27 * SHAPE[2] * SHAPE[3] * SHAPE[4]
    return flops / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="RAN3 only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "train-speed.md"))
    args = parser.parse_args()
    models = ["RAN3"] if args.quick else ["RAN3", "RAN4+"]
    settings = ["fp32", "bf16, ATen norm", "bf16", "bf16, inverse-consistent"]
    rates = {s: conv_rate(s != "fp32") for s in ("fp32", "bf16")}
    lines = [
        "# Training step time (issue 12)",
        "",
        *provenance(),
        f"torch threads: {torch.get_num_threads()}. One step: batch {SHAPE[0]} at "
        f"{'x'.join(map(str, SHAPE[2:]))}, forward + loss + backward + Adam, channels-last; "
        f"median of {args.repeats}.",
        "",
        "| model | setting | s/step | speed-up over fp32 | GFLOP/step | GFLOP/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in models:
        base = None
        for setting in settings:
            flops = step_flops(name, ic="inverse" in setting) / 1e9
            seconds = time_steps(name, setting, args.repeats)
            base = base or seconds
            lines.append(
                f"| {name} | {setting} | {seconds:.2f} | {base / seconds:.2f}x | "
                f"{flops:.0f} | {flops / seconds:.0f} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        f"One 16 -> 16 channel 3x3x3 convolution, forward + backward, same size: "
        f"{rates['fp32']:.0f} GFLOP/s in fp32, {rates['bf16']:.0f} GFLOP/s in bf16.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
