"""Gradient refinement of one converted attention on its calibration inputs (`--refine-epochs`).

The closed-form build (compress.py) and refits (refit.py) each solve one projection with the others
fixed; what is left is a joint, non-convex problem: the queries, latent and up-projections together
decide the attention weights. A few epochs of Adam on all the converted attention's projection weights
lower the error of its output against the source attention's on the same inputs (the layer's own
calibration inputs, so sequential as the rest of the conversion), as GPTQ-style local reconstruction
does for quantised layers. The weights are checked once per epoch and the best kept, so the
calibration error never ends above that of the closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_LR = 1e-4  # Adam; 1e-3 diverged on SmolLM2 and 3e-4 made some layers worse before the best was kept


@dataclass(frozen=True)
class RefineResult:
    """Relative error sum |y - y_src|^2 / sum |y_src|^2 of the attention output over the calibration inputs."""

    before: float
    after: float


def refined_parameters(attention: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The projections refinement trains: every matrix of the MLA attention (norm weights stay)."""
    return {name: p for name, p in attention.named_parameters() if p.dim() >= 2}


def refine_attention(attention: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, epochs: int,
                     lr: float = DEFAULT_LR, batch_size: int = 2, seed: int = 0) -> RefineResult:
    """Train `attention` (called as attention(x) -> (y, _)) in place so that attention(inputs) approaches
    `targets`; inputs [N, T, hidden] (what it reads), targets [N, T, hidden] (the source attention's
    output on the same inputs). Mini-batches of `batch_size` sequences, cosine-decayed learning rate."""
    params = list(refined_parameters(attention).values())
    scale = float(targets.pow(2).mean())
    before = _error(attention, inputs, targets, batch_size, scale)
    best, best_state = before, [p.detach().clone() for p in params]
    n = inputs.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.requires_grad_(True)
    try:
        for _ in range(epochs):
            with torch.enable_grad():
                for idx in torch.randperm(n, generator=generator).split(batch_size):
                    loss = (attention(inputs[idx])[0] - targets[idx]).pow(2).mean() / scale
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            error = _error(attention, inputs, targets, batch_size, scale)
            if error < best:
                best, best_state = error, [p.detach().clone() for p in params]
    finally:
        for p in params:
            p.requires_grad_(False)
    with torch.no_grad():
        for p, kept in zip(params, best_state):
            p.copy_(kept)
    return RefineResult(before=before, after=best)


def _error(attention, inputs, targets, batch_size: int, scale: float) -> float:
    with torch.no_grad():
        total = sum(float((attention(x)[0] - y).pow(2).sum())
                    for x, y in zip(inputs.split(batch_size), targets.split(batch_size)))
    return total / targets.numel() / scale
