"""The one processor contract: node latents in, node latents out, with an optional graph.

``P(z) = z + core(z)`` (RMR, Velickovic et al. 2022, Sec. 3): the parameter-free skip connection
lives here, so a plug-in only says how one layer updates node latents. Subclasses implement
``init_layer`` (PyG's ``BasicGNN.init_conv`` pattern) and declare capability flags as class
attributes that callers read instead of checking types.
"""

from __future__ import annotations

import inspect
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def resolve_activation(name: str) -> nn.Module:
    """Activation by name; the error lists the valid choices."""
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class Processor(nn.Module, ABC):
    """Base of every processor ``P``: ``forward(z, *, edge_index, edge_weight, batch) -> z'``.

    Args:
        hidden_dim: width of the node latents; owned by the pipeline and passed in.
        num_layers: number of message-passing (or MLP) layers, each a residual update.
        act: activation name.

    Shapes: ``z`` (N, hidden_dim) for N nodes of all graphs in a batch; ``edge_index`` (2, E) with
    PyG's source -> target convention; ``edge_weight`` (E,); ``batch`` (N,) graph of each node.
    """

    #: The processor reads ``edge_index`` and fails without it.
    needs_graph: ClassVar[bool] = False
    #: ``edge_weight`` changes the result (otherwise it is ignored).
    supports_edge_weight: ClassVar[bool] = False
    #: Only works on graphs with the node count it was built for.
    needs_fixed_num_nodes: ClassVar[bool] = False

    def __init__(self, hidden_dim: int, num_layers: int = 4, act: str = "relu") -> None:
        super().__init__()
        if hidden_dim < 1 or num_layers < 1:
            raise ValueError(f"hidden_dim and num_layers must be positive, got {hidden_dim}, {num_layers}")
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.act = act
        self.activation = resolve_activation(act)
        self.layers = nn.ModuleList(self.init_layer(hidden_dim) for _ in range(num_layers))
        self.readout = nn.Linear(hidden_dim, hidden_dim)
        self.reset_parameters()

    @abstractmethod
    def init_layer(self, hidden_dim: int) -> nn.Module:
        """Build one layer; it maps (h, graph) -> update of h, both (N, hidden_dim)."""

    def prepare_graph(self, num_nodes: int, edge_index: Tensor | None, edge_weight: Tensor | None) -> Any:
        """Work shared by all layers of one forward pass (e.g. a sparse adjacency)."""
        return edge_index, edge_weight

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def core(self, z: Tensor, graph: Any, batch: Tensor | None) -> Tensor:
        """The learned part: a stack of residual layers, then a linear readout. (N, H) -> (N, H)."""
        h = z
        for layer in self.layers:
            h = h + layer(h, graph)
        return self.readout(h)

    def forward(
        self,
        z: Tensor,
        *,
        edge_index: Tensor | None = None,
        edge_weight: Tensor | None = None,
        batch: Tensor | None = None,
    ) -> Tensor:
        if z.dim() != 2 or z.shape[-1] != self.hidden_dim:
            raise ValueError(f"{type(self).__name__} expects node latents (N, {self.hidden_dim}), got {tuple(z.shape)}")
        if self.needs_graph and edge_index is None:
            raise ValueError(f"{type(self).__name__} needs a graph: pass edge_index (and edge_weight)")
        graph = self.prepare_graph(z.shape[0], edge_index, edge_weight)
        return z + self.core(z, graph, batch)

    def init_args(self) -> dict[str, Any]:
        """The arguments that rebuild this processor; each is kept as an attribute of the same name."""
        args: dict[str, Any] = {}
        for cls in reversed(type(self).__mro__):
            init = cls.__dict__.get("__init__")
            if init is None or cls in (nn.Module, object):
                continue
            for name, param in inspect.signature(init).parameters.items():
                if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    continue
                if not hasattr(self, name):
                    raise AttributeError(
                        f"{type(self).__name__} must keep its init argument {name!r} as self.{name} "
                        "so that the processor artifact can rebuild it"
                    )
                args[name] = getattr(self, name)
        return args

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, num_layers={self.num_layers}"

    def __repr__(self) -> str:  # compact, like PyG layers
        return f"{type(self).__name__}({self.extra_repr()})"


def _csr(num_nodes: int, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
    """CSR matrix from COO triplets (rows need not be sorted)."""
    if rows.numel() and not bool((rows[1:] >= rows[:-1]).all()):
        order = torch.argsort(rows, stable=True)
        rows, cols, values = rows[order], cols[order], values[order]
    crow = torch.zeros(num_nodes + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=num_nodes), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, (num_nodes, num_nodes), check_invariants=False)


class SparseAdjacency:
    """Weighted adjacency ``A`` (target, source) and its transpose, both CSR, built once per forward.

    ``(A h)_i = sum_j w_ji h_j``. Keeping ``A^T`` lets the backward pass be one more CSR product
    instead of a sort per layer (torch transposes a CSR matrix in backward by sorting it).
    """

    def __init__(self, num_nodes: int, edge_index: Tensor, edge_weight: Tensor | None) -> None:
        src, dst = edge_index
        weight = torch.ones(src.shape[0], device=src.device) if edge_weight is None else edge_weight
        self.matrix = _csr(num_nodes, dst, src, weight)
        self.transpose = _csr(num_nodes, src, dst, weight)

    def __matmul__(self, h: Tensor) -> Tensor:
        # sparse products run in the weights' precision (fp32 under bf16 autocast)
        return _SpMM.apply(self.matrix, self.transpose, h.to(self.matrix.dtype))


class _SpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, matrix: Tensor, transpose: Tensor, h: Tensor) -> Tensor:
        ctx.transpose = transpose
        with torch.autocast(h.device.type, enabled=False):  # CPU autocast would cast the CSR product to bf16
            return matrix @ h.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, Tensor]:
        # cuSPARSE wants a dense row-major operand of the matrix's dtype
        with torch.autocast(grad.device.type, enabled=False):
            return None, None, ctx.transpose @ grad.to(ctx.transpose.dtype).contiguous()


def weighted_adjacency(num_nodes: int, edge_index: Tensor, edge_weight: Tensor | None) -> SparseAdjacency:
    """The aggregation operator of a batch of graphs (see ``SparseAdjacency``)."""
    return SparseAdjacency(num_nodes, edge_index, edge_weight)
