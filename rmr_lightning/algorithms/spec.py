"""``AbstractSpec``: what the stages after the datamodule need to know about an algorithm ``A``'s inputs.

The abstract datamodule makes it from its algorithm (``AbstractSpec.from_algorithm``); the pretraining
module sizes ``f`` and scales the parameters by it; the processor artifact stores it (as the plain JSON
dict ``to_dict`` gives, read back with ``from_dict``); the natural model reads ``P``'s parameter names,
scales, ranges and time bound from it. Checkpoints and artifacts hold the dict, never this class
(they are read with ``weights_only=True``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rmr_lightning.algorithms.base import GraphAlgorithm

#: Keys ``to_dict`` always writes (``None`` is a value: no time parameter, no rollout bound).
ALWAYS_WRITTEN = ("param_names", "param_scale", "time_param", "max_time")
#: Keys ``to_dict`` writes only when known (older or hand-written specs lack them).
WRITTEN_WHEN_KNOWN = ("algorithm", "param_ranges", "param_decay")


@dataclass(frozen=True)
class AbstractSpec:
    """The abstract inputs of an algorithm ``A``, in parameter order (``param_names``).

    ``from_dict(spec).to_dict() == spec`` for every spec written so far (all seven keys, as the datamodule
    writes them, or the four of a hand-written one), so the artifact's JSON and its digests are unchanged.
    """

    #: names of A's global parameters, in the order of a batch's ``params`` columns.
    param_names: tuple[str, ...]
    #: divisor of each parameter before ``f`` (the larger bound of its range, or 1 for a range [0, 0]).
    param_scale: tuple[float, ...]
    #: name of the parameter that is a duration (rollouts are cut at ``max_time``), or None if A has none.
    time_param: str | None = None
    #: largest training value of ``time_param``: longer horizons are reached by a rollout; None without one.
    max_time: float | None = None
    #: ``repr`` of A, e.g. ``NetworkDiffusion(gamma=(0.05, 0.6), t=(0.0, 4.0))``; None when not recorded.
    algorithm: str | None = None
    #: training range ``(low, high)`` of each parameter; None when not recorded (then ``[0, scale]`` is assumed).
    param_ranges: tuple[tuple[float, float], ...] | None = None
    #: decay rate (1/time) of each parameter along a rollout; None when not recorded (then all constant).
    param_decay: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.param_names)
        for name in ("param_scale", "param_ranges", "param_decay"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(
                    f"abstract_spec: {name} has {len(value)} entries for the {n} parameters {self.param_names}"
                )
        if self.time_param is not None and self.time_param not in self.param_names:
            raise ValueError(f"abstract_spec: time_param {self.time_param!r} is not one of {list(self.param_names)}")

    @classmethod
    def from_algorithm(cls, algorithm: GraphAlgorithm) -> AbstractSpec:
        """The spec of ``algorithm`` as pretrained on: its names, ranges, time bound and decay."""
        return cls(
            param_names=tuple(algorithm.param_names),
            param_scale=tuple(max(abs(lo), abs(hi)) or 1.0 for lo, hi in algorithm.ranges.values()),
            time_param=algorithm.time_param,
            max_time=algorithm.max_time,
            algorithm=repr(algorithm),
            param_ranges=tuple(tuple(algorithm.ranges[name]) for name in algorithm.param_names),
            param_decay=tuple(algorithm.param_decay),
        )

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any] | AbstractSpec) -> AbstractSpec:
        """Read the plain dict (YAML, checkpoint hyperparameters, an artifact); numbers are kept as given."""
        if isinstance(spec, AbstractSpec):
            return spec
        if not isinstance(spec, Mapping):
            raise TypeError(f"abstract_spec must be a dict or an AbstractSpec, not {type(spec).__name__}")
        unknown = sorted(set(spec) - set(ALWAYS_WRITTEN) - set(WRITTEN_WHEN_KNOWN))
        missing = [key for key in ("param_names", "param_scale") if key not in spec]
        if unknown or missing:
            raise ValueError(f"abstract_spec: unknown keys {unknown}, missing keys {missing} (in {dict(spec)})")
        ranges, decay = spec.get("param_ranges"), spec.get("param_decay")
        return cls(
            param_names=tuple(spec["param_names"]),
            param_scale=tuple(spec["param_scale"]),
            time_param=spec.get("time_param"),
            max_time=spec.get("max_time"),
            algorithm=spec.get("algorithm"),
            param_ranges=None if ranges is None else tuple(tuple(r) for r in ranges),
            param_decay=None if decay is None else tuple(decay),
        )

    def to_dict(self) -> dict[str, Any]:
        """The plain JSON dict (lists, not tuples) that artifacts and hyperparameters store."""
        spec = {
            "algorithm": self.algorithm,
            "param_names": list(self.param_names),
            "param_scale": list(self.param_scale),
            "param_ranges": None if self.param_ranges is None else [list(r) for r in self.param_ranges],
            "time_param": self.time_param,
            "param_decay": None if self.param_decay is None else list(self.param_decay),
            "max_time": self.max_time,
        }
        return {k: v for k, v in spec.items() if k in ALWAYS_WRITTEN or v is not None}

    @property
    def time_index(self) -> int | None:
        """Column of ``time_param`` in a batch's ``params``; None without one."""
        return None if self.time_param is None else self.param_names.index(self.time_param)

    @property
    def algorithm_name(self) -> str:
        """Class name of the A this spec describes (``""`` when not recorded)."""
        return (self.algorithm or "").split("(")[0]

    @property
    def decay(self) -> tuple[float, ...]:
        """``param_decay``, zero for each parameter when not recorded."""
        return self.param_decay if self.param_decay is not None else (0.0,) * len(self.param_names)

    @property
    def ranges(self) -> tuple[tuple[float, float], ...]:
        """``param_ranges``, ``[0, scale]`` for each parameter when not recorded."""
        return self.param_ranges if self.param_ranges is not None else tuple((0.0, s) for s in self.param_scale)
