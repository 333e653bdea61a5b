"""The contract of a known algorithm ``A`` on a weighted graph, as the abstract datamodule uses it.

An algorithm maps node states ``x0`` (B, N) and per-sample global parameters (B, P) to node states
(B, N). It owns the ranges its parameters are sampled from, so a new algorithm is one file and a
config entry (``class_path``), not edits across the tree.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor


class GraphAlgorithm(ABC):
    """Base class: subclasses set ``param_names`` and implement ``prepare`` and ``run``.

    ``time_param`` names the parameter that is a duration: the pretraining module rolls a processor
    out in steps no longer than the largest training value of it to reach longer horizons.
    """

    param_names: tuple[str, ...] = ()
    time_param: str | None = "t"

    def __init__(self, **ranges: tuple[float, float]) -> None:
        missing = set(self.param_names) - set(ranges)
        if missing:
            raise ValueError(f"{type(self).__name__}: no range given for {sorted(missing)}")
        self.ranges: dict[str, tuple[float, float]] = {}
        for name in self.param_names:
            low, high = (float(v) for v in ranges[name])
            if not low <= high:
                raise ValueError(f"{type(self).__name__}: range of {name!r} must have low <= high, got {ranges[name]}")
            self.ranges[name] = (low, high)

    @property
    def time_index(self) -> int | None:
        return None if self.time_param is None else self.param_names.index(self.time_param)

    @property
    def param_decay(self) -> list[float]:
        """Rate (1/time) at which each parameter decays with elapsed time; zero for constants (all, by default)."""
        return [0.0] * len(self.param_names)

    @property
    def max_time(self) -> float | None:
        return None if self.time_param is None else self.ranges[self.time_param][1]

    def with_ranges(self, **ranges: tuple[float, float]) -> GraphAlgorithm:
        """A copy with some parameter ranges replaced (e.g. longer horizons for a test set)."""
        other = copy.copy(self)
        other.ranges = {**self.ranges, **{k: (float(a), float(b)) for k, (a, b) in ranges.items()}}
        return other

    def sample_params(self, n: int, generator: torch.Generator) -> Tensor:
        """Uniform samples in each range, (n, P) float64."""
        u = torch.rand(n, len(self.param_names), generator=generator, dtype=torch.float64)
        low = torch.tensor([self.ranges[k][0] for k in self.param_names], dtype=torch.float64)
        high = torch.tensor([self.ranges[k][1] for k in self.param_names], dtype=torch.float64)
        return low + u * (high - low)

    def prepare(self, connectivity: Tensor) -> Any:
        """Per-graph work that every sample on this graph shares (default: the matrix itself)."""
        return connectivity

    @abstractmethod
    def run(self, prepared: Any, x0: Tensor, params: Tensor) -> Tensor:
        """Apply ``A``: x0 (B, N), params (B, P) -> (B, N)."""

    def __call__(self, connectivity: Tensor, x0: Tensor, params: Tensor) -> Tensor:
        return self.run(self.prepare(connectivity), x0, params)

    def __repr__(self) -> str:
        ranges = ", ".join(f"{k}={v}" for k, v in self.ranges.items())
        return f"{type(self).__name__}({ranges})"
