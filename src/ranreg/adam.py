"""A small Adam with a linearly decaying step, for per-pair optimisation (affine, refine).

``torch.optim.Adam`` would do the same arithmetic, but its first use imports
``torch._dynamo``, about 1.3 s on a 2-core CPU: more than a whole affine stage. The step
size decays linearly to zero over the planned steps, so the parameters settle instead of
jittering around the optimum (an aligned pair stays still).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["DecayingAdam"]


class DecayingAdam:
    """Adam (Kingma and Ba, betas 0.9 / 0.999, eps 1e-8) over groups of tensors, each with
    its own initial step size, decayed linearly to 0 over ``steps`` calls of :meth:`step`."""

    def __init__(self, groups: Sequence[tuple[Tensor, float]], steps: int) -> None:
        self.groups = [(p, float(lr)) for p, lr in groups]
        self.steps = max(int(steps), 1)
        self.t = 0
        self.m = [torch.zeros_like(p) for p, _ in self.groups]
        self.v = [torch.zeros_like(p) for p, _ in self.groups]

    @torch.no_grad()
    def step(self) -> None:
        """One update from the gradients in ``p.grad`` (which are then cleared)."""
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        decay = 1.0 - self.t / self.steps
        self.t += 1
        for (p, lr), m, v in zip(self.groups, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            g = p.grad
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            m_hat = m / (1 - beta1**self.t)
            v_hat = v / (1 - beta2**self.t)
            p.sub_(lr * decay * m_hat / (v_hat.sqrt() + eps))
            p.grad = None
