"""Random weighted graphs for processor pretraining, and the connectome they must generalise to.

Each generator returns a dense symmetric (n, n) float64 matrix with zero diagonal. Weights are
log-normal, as streamline counts are (DK84: log-weights have a standard deviation of ~2.7); the
families span sparse (ring lattices, scale-free trees) to dense spatial graphs like a connectome.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def _symmetrise(mask: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    upper = np.triu(mask, 1)
    weights = np.exp(sigma * rng.standard_normal(upper.shape)) * upper
    return weights + weights.T


def erdos_renyi(n: int, rng: np.random.Generator) -> np.ndarray:
    p = min(1.0, rng.uniform(3.0, 12.0) / max(n - 1, 1))
    return _symmetrise(rng.random((n, n)) < p, rng, rng.uniform(0.3, 2.0))


def watts_strogatz(n: int, rng: np.random.Generator) -> np.ndarray:
    k = int(rng.choice([1, 2, 3]))
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for step in range(1, k + 1):
            j = (i + step) % n
            if rng.random() < rng.uniform(0.05, 0.3):
                j = int(rng.integers(n))
            if j != i:
                mask[i, j] = mask[j, i] = True
    return _symmetrise(mask, rng, rng.uniform(0.3, 2.0))


def barabasi_albert(n: int, rng: np.random.Generator) -> np.ndarray:
    m = int(rng.integers(1, 4))
    mask = np.zeros((n, n), dtype=bool)
    degree = np.ones(n)
    for i in range(1, n):
        targets = rng.choice(i, size=min(m, i), replace=False, p=degree[:i] / degree[:i].sum())
        mask[i, targets] = mask[targets, i] = True
        degree[targets] += 1
        degree[i] += len(targets)
    return _symmetrise(mask, rng, rng.uniform(0.3, 2.0))


def stochastic_block(n: int, rng: np.random.Generator) -> np.ndarray:
    blocks = rng.integers(int(rng.integers(2, 6)), size=n)
    same = blocks[:, None] == blocks[None, :]
    p_in, p_out = rng.uniform(0.3, 0.8), rng.uniform(0.01, 0.08)
    return _symmetrise(rng.random((n, n)) < np.where(same, p_in, p_out), rng, rng.uniform(0.3, 2.0))


def dense_spatial(n: int, rng: np.random.Generator) -> np.ndarray:
    """Connectome-like: nodes in a unit cube, almost all pairs linked, weight ~ exp(-d/l) log-normal."""
    pos = rng.random((n, 3))
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    scale = rng.uniform(0.1, 0.4)
    keep = rng.random((n, n)) < rng.uniform(0.6, 1.0)
    weights = _symmetrise(keep, rng, rng.uniform(1.0, 3.0))
    return weights * np.exp(-dist / scale)


GENERATORS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "erdos_renyi": erdos_renyi,
    "watts_strogatz": watts_strogatz,
    "barabasi_albert": barabasi_albert,
    "stochastic_block": stochastic_block,
    "dense_spatial": dense_spatial,
}


def random_graph(n: int, rng: np.random.Generator, families: tuple[str, ...] | None = None) -> Tensor:
    """One graph of ``n`` nodes from a family drawn uniformly; (n, n) float64."""
    names = tuple(GENERATORS) if families is None else families
    unknown = set(names) - set(GENERATORS)
    if unknown:
        raise ValueError(f"unknown graph families {sorted(unknown)}; choose from {sorted(GENERATORS)}")
    conn = GENERATORS[names[int(rng.integers(len(names)))]](n, rng)
    np.fill_diagonal(conn, 0.0)
    return torch.as_tensor(conn, dtype=torch.float64)


def initial_states(spectrum, num: int, rng: np.random.Generator) -> Tensor:
    """Abstract inputs ``x'`` in [0, 1], (num, n), a mix of three patterns:

    seeded (1 to 3 regions), spread (independent per region), and smooth (seeds already diffused
    over the graph, the shape of a disease some years in, rescaled to a random peak).
    """
    n = spectrum.eigenvalues.shape[-1]
    kind = rng.integers(3, size=num)
    x = np.zeros((num, n))
    for i in range(num):
        if kind[i] == 1:
            x[i] = rng.random(n) ** rng.uniform(1.0, 3.0)
        else:
            seeds = rng.choice(n, size=min(n, int(rng.integers(1, 4))), replace=False)
            x[i, seeds] = rng.uniform(0.2, 1.0, size=len(seeds))
    smooth = np.flatnonzero(kind == 2)
    if len(smooth):
        tau = torch.as_tensor(rng.uniform(0.5, 6.0, size=len(smooth)))
        spread = spectrum.solve(torch.as_tensor(x[smooth]), tau).numpy()
        peak = spread.max(1, keepdims=True)
        x[smooth] = spread / np.where(peak > 0, peak, 1.0) * rng.uniform(0.3, 1.0, size=(len(smooth), 1))
    return torch.as_tensor(np.clip(x, 0.0, 1.0))
