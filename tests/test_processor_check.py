"""The P check (rmr_lightning.processor_check): R^2 of P's change on a training set's targets."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from rmr_lightning.artifact import load_processor_artifact
from rmr_lightning.natural import NaturalModel
from rmr_lightning.processor_check import _param_grid, baseline_deviation, check_processor
from rmr_lightning.study import _processor_check_note


def _targets_from_p(model: NaturalModel, n: int, noise_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (n, R, 2) whose change is exactly what the model's f, P, g make of the baseline (unit 1, a
    cohort parameter on the check's grid), or pure noise of the same spread; covariates (n, 1) = horizon."""
    gen = torch.Generator().manual_seed(0)
    load = torch.rand(n, model.num_regions, generator=gen) * 0.1
    state = model.state_init + load - load.mean(0)  # what the check reads back from centred baselines
    horizon = 1 + 4 * torch.rand(n, generator=gen)
    params = _param_grid(model)[len(_param_grid(model)) // 2]
    values = torch.stack(
        [
            horizon if i == model.time_index else torch.full_like(horizon, params[p])
            for i, p in enumerate(model.param_names)
        ],
        dim=1,
    )
    with torch.no_grad():
        z = model.embed(state, values / model.param_scale)
        change = (model.decoder(model.process(z, n)) - model.decoder(z)).reshape(n, -1)
    if noise_only:
        change = torch.randn(change.shape, generator=gen) * change.std()
    baseline = 0.3 + load  # any offset: the check centres each region
    return torch.stack([baseline, baseline + change], dim=-1), horizon.unsqueeze(1)


@pytest.mark.parametrize("noise_only", [False, True])
def test_p_explains_changes_it_made_and_not_noise(tiny_artifact: Path, noise_only: bool) -> None:
    model = NaturalModel(load_processor_artifact(tiny_artifact), "rmr", covariate_names=["horizon"]).eval()
    targets, covariates = _targets_from_p(model, 12, noise_only)
    targets[:, :3] = math.nan  # regions without values are left out, not a reason to skip the check
    check = check_processor(model, targets, covariates)
    assert check is not None and check.subjects == 12
    if noise_only:
        assert check.r2 < 0.2
    else:
        # not exactly 1: the three regions without values enter P at state_init, and their neighbours feel it
        assert check.r2 > 0.995 and check.unit == pytest.approx(1.0) and check.scale == pytest.approx(1.0, rel=1e-2)
    assert check_processor(model, targets[:2], covariates[:2]) is None  # too few subjects to say


def test_other_covariates_are_regressed_out_of_the_baseline() -> None:
    gen = torch.Generator().manual_seed(1)
    age = 60 + 20 * torch.rand(30, generator=gen)
    state = torch.rand(30, 5, generator=gen)
    centred_age = (age - age.mean()).unsqueeze(1)
    # no age in the state: its regression on age is removed
    state = state - centred_age * (centred_age * (state - state.mean(0))).sum(0) / (centred_age**2).sum()
    baseline = state + 0.01 * age.unsqueeze(1)  # ageing shared by regions
    deviation = baseline_deviation(baseline, torch.stack([age, torch.ones(30)], dim=1), keep=1)
    assert torch.allclose(deviation, state - state.mean(0), atol=1e-4)


def test_study_summary_shows_the_check_per_size() -> None:
    frame = pd.DataFrame({"n_train": [8, 8, 16, 8], "p_check_r2": [0.9, 0.7, 0.95, math.nan]})
    note = _processor_check_note(frame)
    assert "n=8: 0.800 (lowest 0.700)" in note and "n=16: 0.950" in note
    assert _processor_check_note(frame.assign(p_check_r2=math.nan)) == ""
