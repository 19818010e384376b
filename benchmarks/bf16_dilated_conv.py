"""Does a bf16 dilated convolution's backward give finite weight gradients here?

    python benchmarks/bf16_dilated_conv.py

Checks the layouts ``ranreg.train._channels_last`` chooses between (oneDNN's channels-last
and the plain layout) for an RA module's matching convolution (18 -> 18 channels, 3x3,
Table 4's dilations) under CPU bf16 autocast, in 2D (batch 4, 96x128, the 2D study's
slices) and 3D (batch 1, 48x40x64, the 8 mm training crops). Each case runs in its own
process, because the failure can be a segmentation fault. Prints a Markdown table with
the command, date and machine; no file is written.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

from common import command_line, machine

CASE = """
import torch
torch.manual_seed(0)
nd, dil, cl = {nd}, {dil}, {cl}
conv = (torch.nn.Conv2d if nd == 2 else torch.nn.Conv3d)(18, 18, 3, padding=dil, dilation=dil)
x = torch.randn((4, 18, 96, 128) if nd == 2 else (1, 18, 48, 40, 64))
if cl:
    x = x.to(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
with torch.autocast("cpu", dtype=torch.bfloat16):
    y = conv(x.requires_grad_())
y.float().sum().backward()
print("finite" if bool(torch.isfinite(conv.weight.grad).all()) else "NaN or inf")
"""


def run_case(nd: int, dil: int, channels_last: bool) -> str:
    code = CASE.format(nd=nd, dil=dil, cl=channels_last)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return f"crash (exit code {done.returncode})"
    return done.stdout.strip()


def main() -> int:
    print(f"`{command_line()}`, {dt.date.today()}, {machine()}\n")
    print("| dims | dilation | channels-last | plain layout |\n|---|---:|---|---|")
    for nd in (2, 3):
        for dil in (1, 2, 4, 8, 16):
            cells = [run_case(nd, dil, cl) for cl in (True, False)]
            print(f"| {nd}D | {dil} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
