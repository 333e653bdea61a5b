"""The shipped DK84 connectome and the graph tensors processors read (PyG layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rmr_lightning.algorithms import row_normalised

CONNECTOME_DIR = Path(__file__).resolve().parent / "connectome_dk84"


def load_dk84(dtype: torch.dtype = torch.float64) -> tuple[Tensor, list[str]]:
    """The 84-region Desikan-Killiany connectome (streamline counts, (84, 84)) and its region names."""
    conn = np.loadtxt(CONNECTOME_DIR / "tractography.csv", delimiter=",")
    names = (CONNECTOME_DIR / "regions.csv").read_text().split()[1:]
    if conn.shape != (84, 84) or len(names) != 84:
        raise ValueError(f"{CONNECTOME_DIR}: expected an 84 x 84 matrix and 84 names")
    return torch.as_tensor(conn, dtype=dtype), names


def graph_tensors(connectivity: Tensor) -> tuple[Tensor, Tensor]:
    """Edges of a dense connectivity as ``edge_index`` (2, E) source -> target and weights ``C_ij / d_i``.

    Rows come out sorted by target, which the sparse aggregation of the processors exploits.
    """
    dst, src = torch.nonzero(connectivity, as_tuple=True)  # C_ij: message j -> i
    weight = row_normalised(connectivity)[dst, src].float()
    return torch.stack([src, dst]), weight


def batch_graph(
    edge_index: Tensor, edge_weight: Tensor, num_nodes: int, num_graphs: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The same graph repeated ``num_graphs`` times in PyG's flat layout: (edge_index, edge_weight, batch)."""
    offsets = (torch.arange(num_graphs, device=edge_index.device) * num_nodes).repeat_interleave(edge_index.shape[1])
    edges = edge_index.repeat(1, num_graphs) + offsets
    batch = torch.arange(num_graphs, device=edge_index.device).repeat_interleave(num_nodes)
    return edges, edge_weight.repeat(num_graphs), batch
