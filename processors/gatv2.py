"""GATv2 processor (Brody, Alon, Yahav, ICLR 2022) on PyG's ``GATv2Conv``.

Attention over neighbours with the normalised edge weight as a one-dimensional edge feature, so the
learned weights can follow (or depart from) the connectome's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.nn import GATv2Conv

from processors.base import Processor


class _GATv2Layer(nn.Module):
    def __init__(self, hidden_dim: int, heads: int, act: nn.Module) -> None:
        super().__init__()
        if hidden_dim % heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by heads ({heads})")
        self.conv = GATv2Conv(hidden_dim, hidden_dim // heads, heads=heads, edge_dim=1, add_self_loops=True)
        self.lin_self = nn.Linear(hidden_dim, hidden_dim)
        self.lin_out = nn.Linear(hidden_dim, hidden_dim)
        self.act = act

    def forward(self, h: Tensor, graph: tuple[Tensor, Tensor]) -> Tensor:
        edge_index, edge_weight = graph
        att = self.conv(h, edge_index, edge_attr=edge_weight.unsqueeze(-1))  # (N, H)
        return self.lin_out(self.act(self.lin_self(h) + att))


class GATv2Processor(Processor):
    """Residual GATv2 layers with edge weights as attention features."""

    needs_graph = True
    supports_edge_weight = True

    def __init__(self, hidden_dim: int, num_layers: int = 4, act: str = "relu", heads: int = 4) -> None:
        self.heads = heads
        super().__init__(hidden_dim, num_layers, act)

    def init_layer(self, hidden_dim: int) -> nn.Module:
        return _GATv2Layer(hidden_dim, self.heads, self.activation)

    def prepare_graph(self, num_nodes: int, edge_index: Tensor | None, edge_weight: Tensor | None) -> Any:
        if edge_weight is None:
            edge_weight = torch.ones(edge_index.shape[1], device=edge_index.device)
        return edge_index, edge_weight

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}"
