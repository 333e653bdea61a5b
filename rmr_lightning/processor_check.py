"""How well a processor ``P`` explains a training set's regional changes, from the targets alone.

A pretraining R^2 is measured on ``P``'s own abstract inputs; a user's cohort asks ``P`` about other states.
Before fine-tuning, the labelled scans already tell how far ``P`` can be trusted: their baseline values,
read as abstract states, go through ``f``, ``P`` and ``g`` over each subject's horizon, and ``P``'s change is
compared with the observed change. Both are centred on each region's training mean change (which the
readout predicts without ``P``), so the R^2 is the share of the remaining variance that ``P``'s dynamics
explain: 1 when they explain every deviation, 0 when they explain nothing (the fitted scale is kept >= 0).

The unit mapping targets to states and the cohort parameters of ``A`` are unknown before fitting; the check
takes the best over a small grid of both (log-spaced units around ``state_unit``, each parameter at five
points of its pretraining range). Other covariates (e.g. age) are regressed out of the baseline values
first, so that normal ageing is not read as pathology.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from rmr_lightning.natural import NaturalModel

#: Units tried, as factors of the readout's ``state_unit``: 1/30 .. 30, half a decade apart.
UNIT_FACTORS = tuple(10 ** (k / 2) for k in range(-3, 4))
PARAM_POINTS = 5


@dataclass(frozen=True)
class ProcessorCheck:
    """The check's outcome: ``r2`` of ``P``'s change against the observed change (both centred per region),
    at the best ``unit`` (target units per unit of state) and cohort ``params`` of A, the non-negative
    ``scale`` fitted to the change, on ``subjects`` training subjects with baseline and follow-up values."""

    r2: float
    unit: float
    scale: float
    params: dict[str, float]
    subjects: int

    def summary(self) -> str:
        params = ", ".join(f"{k} {v:.3g}" for k, v in self.params.items())
        return (
            f"P explains R^2 = {self.r2:.3f} of the training set's regional changes beyond each region's mean "
            f"({self.subjects} subjects; best unit {self.unit:.3g}, {params or 'no cohort parameters'})"
        )

    def as_metrics(self) -> dict[str, float]:
        return {"p_check/r2": self.r2, "p_check/unit": self.unit, "p_check/scale": self.scale}

    def as_dict(self) -> dict:
        return asdict(self)


def baseline_deviation(baseline: Tensor, covariates: Tensor, keep: int) -> Tensor:
    """Baseline values (n, R) minus each region's mean and a linear effect, shared by regions, of every
    covariate but column ``keep`` (A's time): what is left for the state to explain. (n, R)"""
    centred = baseline - baseline.mean(0)
    others = [c for c in range(covariates.shape[1]) if c != keep]
    if not others or len(baseline) <= len(others) + 1:
        return centred
    cov = covariates[:, others] - covariates[:, others].mean(0)  # (n, K)
    design = cov.unsqueeze(1).expand(-1, baseline.shape[1], -1).reshape(-1, len(others))  # (n*R, K)
    slopes = torch.linalg.lstsq(design.double(), centred.reshape(-1, 1).double()).solution.float()  # (K, 1)
    return centred - (cov @ slopes).expand_as(centred)


def _r2_of_scaled(predicted: Tensor, observed: Tensor) -> tuple[float, float]:
    """R^2 and scale of ``scale * predicted`` against ``observed`` (both centred per region), scale >= 0."""
    p, o = predicted - predicted.mean(0), observed - observed.mean(0)
    denom = float((p * p).sum())
    scale = max(0.0, float((p * o).sum()) / denom) if denom > 0 else 0.0
    total = float((o * o).sum())
    return (1.0 - float(((o - scale * p) ** 2).sum()) / total if total > 0 else math.nan), scale


def _param_grid(model: NaturalModel) -> list[dict[str, float]]:
    """Every parameter of A but time at ``PARAM_POINTS`` points of its pretraining range."""
    names = [n for i, n in enumerate(model.param_names) if i != model.time_index]
    ranges = {n: (float(model.param_low[i]), float(model.param_high[i])) for i, n in enumerate(model.param_names)}
    axes = [torch.linspace(*ranges[n], PARAM_POINTS + 2)[1:-1].tolist() for n in names]  # interior points
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes)]


@torch.no_grad()
def check_processor(model: NaturalModel, targets: Tensor, covariates: Tensor) -> ProcessorCheck | None:
    """The check on a calibrated model's ``f``, ``P`` and ``g``: targets (n, R, 2) of (baseline, follow-up),
    covariates (n, C). Regions without values are left out; None when fewer than three subjects have both
    values in every other region."""
    targets, covariates = targets.float().cpu(), covariates.float().cpu()
    known = torch.isfinite(targets).all(-1)  # (n, R)
    regions = known.any(0)  # regions with values; the others (absent from the label maps) stay at state_init
    usable = known[:, regions].all(1)  # subjects with both values in every such region
    if int(usable.sum()) < 3:
        return None
    targets, covariates = targets[usable][:, regions], covariates[usable]
    observed = targets[..., 1] - targets[..., 0]  # (n, R')
    deviation = torch.zeros(len(targets), known.shape[1])  # (n, R)
    deviation[:, regions] = baseline_deviation(targets[..., 0], covariates, model.time_covariate_index)
    horizon = covariates[:, model.time_covariate_index]
    base_unit = float(model.readout_config.state_unit)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    best: ProcessorCheck | None = None
    for params in _param_grid(model):
        columns = [
            horizon if i == model.time_index else torch.full_like(horizon, params[n])
            for i, n in enumerate(model.param_names)
        ]
        values = torch.stack(columns, dim=1)  # (n, P)
        scaled = (values / model.param_scale.cpu()).to(device)
        for factor in UNIT_FACTORS:
            unit = base_unit * factor
            state = (model.state_init + deviation / unit).clamp(0.0, 1.0).to(device)  # (n, R)
            z = model.embed(state, scaled)
            change = model.decoder(model.process(z, len(state))) - model.decoder(z)  # (n*R, 1)
            r2, scale = _r2_of_scaled(unit * change.reshape(state.shape).cpu()[:, regions], observed)
            if best is None or r2 > best.r2:
                best = ProcessorCheck(r2, unit, scale, params, len(state))
    model.train(was_training)
    return best
