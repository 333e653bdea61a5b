"""Message-passing processors (Gilmer et al. 2017; CLRS, Velickovic et al. 2022).

Two thin variants over one base, differing in how a node gathers its neighbours:

* ``MPNNProcessor`` (default for diffusion-like algorithms): node-level transforms and a sum of
  neighbour latents weighted by the normalised edge weight, ``m_i = sum_j w_ij h_j``. Per-edge work is
  one sparse product, so dense connectomes (DK84: ~6,600 edges on 84 nodes) stay cheap, and the sum is
  exactly the random-walk operator ``D^-1 C`` of network diffusion.
* ``MaxMPNNProcessor`` (CLRS's MPNN): per-edge messages ``relu(a(h_i) + b(h_j) + w_ij c)`` reduced by
  max, the inductive bias CLRS found best for many algorithms; more work per edge.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from processors.base import Processor, SparseAdjacency, weighted_adjacency


class _SumLayer(nn.Module):
    """``out = W_o act(W_s h + W_n (A h))`` with A the weighted adjacency."""

    def __init__(self, hidden_dim: int, act: nn.Module) -> None:
        super().__init__()
        self.lin_self = nn.Linear(hidden_dim, hidden_dim)
        self.lin_nbr = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.lin_out = nn.Linear(hidden_dim, hidden_dim)
        self.act = act

    def forward(self, h: Tensor, adj: SparseAdjacency) -> Tensor:
        nbr = adj @ h  # (N, H): sum_j w_ij h_j
        return self.lin_out(self.act(self.lin_self(h) + self.lin_nbr(nbr)))


class MPNNProcessor(Processor):
    """MPNN with edge-weighted sum aggregation (node-level transforms)."""

    needs_graph = True
    supports_edge_weight = True

    def init_layer(self, hidden_dim: int) -> nn.Module:
        return _SumLayer(hidden_dim, self.activation)

    def prepare_graph(self, num_nodes: int, edge_index: Tensor | None, edge_weight: Tensor | None) -> SparseAdjacency:
        return weighted_adjacency(num_nodes, edge_index, edge_weight)


class _MaxLayer(nn.Module):
    """CLRS message ``relu(m_t(h_i) + m_s(h_j) + w_ij m_e)``, max over j, then an update MLP."""

    def __init__(self, hidden_dim: int, act: nn.Module) -> None:
        super().__init__()
        self.msg_target = nn.Linear(hidden_dim, hidden_dim)
        self.msg_source = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.msg_edge = nn.Linear(1, hidden_dim, bias=False)
        self.lin_self = nn.Linear(hidden_dim, hidden_dim)
        self.lin_agg = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.lin_out = nn.Linear(hidden_dim, hidden_dim)
        self.act = act

    def forward(self, h: Tensor, graph: tuple[Tensor, Tensor]) -> Tensor:
        edge_index, edge_weight = graph
        src, dst = edge_index
        msg = self.msg_target(h)[dst] + self.msg_source(h)[src] + self.msg_edge(edge_weight.unsqueeze(-1))
        agg = scatter(torch.relu(msg), dst, dim=0, dim_size=h.shape[0], reduce="max")  # (N, H); 0 if no edges
        return self.lin_out(self.act(self.lin_self(h) + self.lin_agg(agg)))


class MaxMPNNProcessor(Processor):
    """CLRS-style MPNN: per-edge messages, max aggregation."""

    needs_graph = True
    supports_edge_weight = True

    def init_layer(self, hidden_dim: int) -> nn.Module:
        return _MaxLayer(hidden_dim, self.activation)

    def prepare_graph(self, num_nodes: int, edge_index: Tensor | None, edge_weight: Tensor | None) -> Any:
        if edge_weight is None:
            edge_weight = torch.ones(edge_index.shape[1], device=edge_index.device)
        return edge_index, edge_weight
