"""Reaching horizons longer than any seen in pretraining, as an algorithm would: in steps.

Network diffusion is a semigroup, ``expm(-gamma H (t1 + t2)) = expm(-gamma H t2) expm(-gamma H t1)``,
so a processor trained on horizons up to ``T`` reaches ``k T`` by ``k`` applications, decoding the
state and re-encoding it between steps. Where a parameter is a rate that decays with elapsed time (the
Gompertz growth rate, ``r(t) = r e^{-rho t}``), each step starts from the value it has decayed to, which
makes the steps compose exactly as well.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def rollout_steps(horizon: Tensor, max_time: float | None) -> Tensor:
    """Steps per graph so that none is longer than ``max_time``; (G,) int64, at least 1."""
    if not max_time:
        return torch.ones_like(horizon, dtype=torch.long)
    return torch.ceil(horizon / max_time * (1 - 1e-6)).clamp_min(1).long()


def rollout(
    step: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    params: Tensor,
    time_index: int | None,
    max_time: float | None,
    node_graph: Tensor,
    param_decay: Tensor | None = None,
) -> Tensor:
    """Apply ``step(x, params) -> x_next`` until each graph has covered its horizon.

    Args:
        step: one application of the model; x (N,), params (G, P) -> (N,).
        x: node states (N,); params: per-graph parameters (G, P) whose ``time_index`` column is the horizon.
        node_graph: (N,) graph of each node.
        param_decay: (P,) rates at which parameters decay with elapsed time (0 for constants), or None.
    """
    if time_index is None:
        return step(x, params)
    steps = rollout_steps(params[:, time_index], max_time)
    if int(steps.max()) == 1:
        return step(x, params)
    params = params.clone()
    params[:, time_index] = params[:, time_index] / steps
    for k in range(int(steps.max())):
        now = params
        if param_decay is not None:  # (G, P): each rate as it has decayed after k steps of this graph
            now = params * torch.exp(-param_decay * k * params[:, time_index : time_index + 1])
            now[:, time_index] = params[:, time_index]
        x = torch.where((steps > k)[node_graph], step(x, now), x)
    return x
