"""``ranreg summary``: size, cost and per-level motion ranges of a network."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from ranreg.nn import RAN, build_model
from ranreg.nn.variants import capturable_range, matching_dilations


def _onednn_conv_flops(x_shape: Any, w_shape: Any, *_: Any, out_shape: Any, **__: Any) -> int:
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape))


def flop_counter() -> FlopCounterMode:
    """``torch.utils.flop_counter`` (1 MAC = 2 FLOPs) that also counts
    ``aten.mkldnn_convolution``, the CPU float32 forward of ranreg's convolutions
    (:class:`ranreg.nn.blocks.Conv3d`), which it does not know by itself."""
    mapping = {torch.ops.aten.mkldnn_convolution: _onednn_conv_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of the enclosed code: CUDA allocator peak on a GPU; on the CPU the rise
    of the process's resident-set high-water mark (Linux ``VmHWM``, reset on entry)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            try:  # "5" resets the peak RSS counter of this process
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                pass
            self._base = _proc_status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            peak = _proc_status_kib("VmHWM")
            if peak is not None and self._base is not None:
                self.bytes = max(0, peak - self._base) * 1024


def level_table(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Per aligner level k: pooling size p_k, dilations r_k, range a_k (input voxels)."""
    if not isinstance(model, RAN):
        return []
    v = model.variant
    return [
        {
            "level": k,
            "scale": v.scales[k],
            "dilation": list(matching_dilations(v, k)),
            "range": capturable_range(v, k),
        }
        for k in range(len(v.scales))
    ]


def summarize(
    name: str,
    ndim: int,
    shape: Sequence[int],
    *,
    heads: int | None = None,
    device: str = "cpu",
    grad: bool = False,
) -> dict[str, Any]:
    """Build ``name`` and measure one forward pass of a (1, 1, *shape) pair.

    Returns parameters, multiply-accumulates (convolutions and matrix products, from
    ``torch.utils.flop_counter``; one MAC = 2 FLOPs), peak memory of the pass, its time
    (a second, uncounted pass) and the per-level table.
    """
    options = {} if heads is None else {"heads": heads}
    model = build_model(name, ndim=ndim, **options)
    dev = torch.device(device)
    model.to(dev).eval()
    moving = torch.rand(1, 1, *shape, device=dev)
    fixed = torch.rand(1, 1, *shape, device=dev)
    context = torch.enable_grad if grad else torch.no_grad
    counter = flop_counter()
    with context(), PeakMemory(dev) as mem, counter:
        out = model(moving, fixed)
        if grad:
            out.square().mean().backward()
    with context():
        start = time.perf_counter()
        model(moving, fixed)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
    return {
        "model": model.config["name"],
        "ndim": ndim,
        "shape": list(shape),
        "heads": getattr(model, "heads", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "macs": counter.get_total_flops() // 2,
        "peak_memory_bytes": mem.bytes,
        "forward_seconds": seconds,
        "mode": "forward+backward" if grad else "inference (no_grad)",
        "device": str(dev),
        "levels": level_table(model),
    }


def format_summary(info: dict[str, Any]) -> str:
    heads = f", m={info['heads']} heads" if info["heads"] else ""
    mem = info["peak_memory_bytes"]
    lines = [
        f"model        {info['model']} ({info['ndim']}D{heads})",
        f"input        {'x'.join(map(str, info['shape']))} (one pair, batch 1)",
        f"parameters   {info['parameters']:,}",
        f"MACs         {info['macs'] / 1e9:.2f} G",
        f"peak memory  {'n/a' if mem is None else f'{mem / 2**20:.0f} MiB'}"
        f" ({info['mode']}, {info['device']})",
        f"time         {info['forward_seconds']:.2f} s ({info['mode']}, {info['device']})",
    ]
    if info["levels"]:
        lines.append("level  scale p_k  dilation r_k  range a_k = p_k(1+2|r_k|_1)/2 (voxels)")
        for row in info["levels"]:
            dil = "(" + ", ".join(map(str, row["dilation"])) + ")"
            lines.append(f"{row['level']:<6} {row['scale']:<10} {dil:<13} {row['range']:g}")
    return "\n".join(lines)
