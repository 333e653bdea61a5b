"""Network diffusion of pathology over a connectome (Raj et al., Neuron 2012).

``H = diag(1/rowdeg) (D - C)`` is the random-walk graph Laplacian of the symmetric connectivity ``C``;
pathology follows ``dx/dt = -gamma H x`` with the exact solution ``x(t) = expm(-gamma H t) x0``.
Rows of isolated nodes (degree 0) are zero: their state stays put. Because ``H`` is row-normalised,
scaling ``C`` does not change it, so ``gamma`` is a rate per unit time (1/year in this project).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_connectivity(connectivity: Tensor) -> None:
    if connectivity.dim() < 2 or connectivity.shape[-1] != connectivity.shape[-2]:
        raise ValueError(f"connectivity must be (..., N, N), got shape {tuple(connectivity.shape)}")
    if not torch.is_floating_point(connectivity):
        raise TypeError(f"connectivity must be a floating tensor, got {connectivity.dtype}")
    if (connectivity < 0).any():
        raise ValueError("connectivity must be non-negative (streamline counts or weights)")
    if not torch.allclose(connectivity, connectivity.transpose(-1, -2), rtol=1e-5, atol=0.0):
        raise ValueError("connectivity must be symmetric (undirected structural connectivity)")


def degree(connectivity: Tensor) -> Tensor:
    """Row degree ``d_i = sum_j C_ij``, shape (..., N)."""
    return connectivity.sum(-1)


def random_walk_laplacian(connectivity: Tensor) -> Tensor:
    """``H = diag(1/d) (D - C)`` with zero rows for isolated nodes. (..., N, N) -> (..., N, N)."""
    _check_connectivity(connectivity)
    deg = degree(connectivity)
    inv = torch.where(deg > 0, 1.0 / deg.clamp_min(torch.finfo(deg.dtype).tiny), torch.zeros_like(deg))
    lap = torch.diag_embed(deg) - connectivity
    return inv.unsqueeze(-1) * lap


def row_normalised(connectivity: Tensor) -> Tensor:
    """Random-walk operator ``P = diag(1/d) C`` (rows of isolated nodes are zero)."""
    deg = degree(connectivity)
    inv = torch.where(deg > 0, 1.0 / deg.clamp_min(torch.finfo(deg.dtype).tiny), torch.zeros_like(deg))
    return inv.unsqueeze(-1) * connectivity


class DiffusionSpectrum:
    """Eigendecomposition of ``H`` through its symmetric twin, computed once per graph.

    With ``d~ = d`` (1 for isolated nodes) and ``S = d~^-1/2 (D - C) d~^-1/2`` symmetric,
    ``H = d~^-1/2 S d~^1/2`` on every row, so ``expm(-tau H) = d~^-1/2 V exp(-tau L) V^T d~^1/2``
    with ``S = V diag(L) V^T``. Each later solve costs two (N, N) products instead of an ``expm``.
    """

    def __init__(self, connectivity: Tensor) -> None:
        _check_connectivity(connectivity)
        deg = degree(connectivity)
        d = torch.where(deg > 0, deg, torch.ones_like(deg))
        s = d.rsqrt()
        sym = s.unsqueeze(-1) * (torch.diag_embed(deg) - connectivity) * s.unsqueeze(-2)
        sym = 0.5 * (sym + sym.transpose(-1, -2))
        evals, evecs = torch.linalg.eigh(sym)
        self.eigenvalues = evals.clamp_min(0.0)  # (..., N); PSD up to round-off
        self.left = s.unsqueeze(-1) * evecs  # d~^-1/2 V        (..., N, N)
        self.right = evecs.transpose(-1, -2) * d.sqrt().unsqueeze(-2)  # V^T d~^1/2  (..., N, N)

    def solve(self, x0: Tensor, tau: Tensor) -> Tensor:
        """``expm(-tau H) x0`` for x0 (B, N) and tau (B,) -> (B, N)."""
        coeff = torch.einsum("...ij,bj->bi", self.right, x0)  # (B, N)
        coeff = coeff * torch.exp(-tau.unsqueeze(-1) * self.eigenvalues)
        return torch.einsum("...ij,bj->bi", self.left, coeff)


def network_diffusion(connectivity: Tensor, x0: Tensor, gamma: float | Tensor, t: float | Tensor) -> Tensor:
    """Exact network diffusion ``x(t) = expm(-gamma H t) x0``.

    Args:
        connectivity: dense symmetric (N, N) tensor C with zero diagonal.
        x0: initial state, (N,) or (B, N).
        gamma: diffusivity (float or (B,) tensor).
        t: time (float or (B,) tensor).

    Returns:
        x(t) with the shape of ``x0``.
    """
    _check_connectivity(connectivity)
    if connectivity.dim() != 2:
        raise ValueError("network_diffusion takes one (N, N) connectivity; batch the states instead")
    if x0.shape[-1] != connectivity.shape[-1]:
        raise ValueError(f"x0 has {x0.shape[-1]} nodes but connectivity has {connectivity.shape[-1]}")
    squeeze = x0.dim() == 1
    xb = x0.unsqueeze(0) if squeeze else x0
    dtype, device = connectivity.dtype, connectivity.device
    tau = torch.as_tensor(gamma, dtype=dtype, device=device) * torch.as_tensor(t, dtype=dtype, device=device)
    tau = tau.expand(xb.shape[0]) if tau.dim() == 0 else tau
    out = DiffusionSpectrum(connectivity).solve(xb.to(dtype), tau)
    return out.squeeze(0) if squeeze else out
