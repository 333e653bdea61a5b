"""Deep MLP processor: the same residual MLP on every node, no graph.

The graph-free member of the family, for tasks whose abstract state has no relational structure
(one node per lesion) and as the "no message passing" ablation on graph tasks.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from processors.base import Processor


class _MLPLayer(nn.Module):
    def __init__(self, hidden_dim: int, act: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), act, nn.Linear(hidden_dim, hidden_dim))

    def forward(self, h: Tensor, graph: Any) -> Tensor:
        return self.net(h)


class MLPProcessor(Processor):
    """``num_layers`` residual two-layer MLP blocks applied node-wise."""

    def init_layer(self, hidden_dim: int) -> nn.Module:
        return _MLPLayer(hidden_dim, self.activation)
