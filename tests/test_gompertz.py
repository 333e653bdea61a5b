"""Gompertz growth against its ODE, its limits and the doubling-time formula."""

from __future__ import annotations

import math

import numpy as np
import scipy.integrate
import torch

from rmr_lightning.algorithms import (
    NODULE_VDT_DAYS,
    GompertzGrowth,
    doubling_time,
    doubling_time_days,
    gompertz_volume,
    growth_rate,
    suspicious_growth,
)


def test_solves_the_gompertz_ode():
    r, rho, v0, t = 0.9, 0.4, 0.3, 2.5
    ref = scipy.integrate.solve_ivp(
        lambda s, v: r * np.exp(-rho * s) * v, (0, t), [v0], method="DOP853", rtol=1e-12, atol=1e-14
    ).y[0, -1]
    got = gompertz_volume(torch.tensor(v0, dtype=torch.float64), r, rho, t)
    assert abs(float(got) - ref) / ref < 1e-9


def test_limits_exponential_and_plateau():
    v0 = torch.tensor([0.1, 1.0], dtype=torch.float64)
    # rho = 0: exponential growth with doubling time ln2 / r, exactly at zero and continuously near it
    assert torch.allclose(gompertz_volume(v0, 0.7, 0.0, 3.0), v0 * math.exp(2.1), rtol=1e-12)
    assert torch.allclose(gompertz_volume(v0, 0.7, 1e-9, 3.0), v0 * math.exp(2.1), rtol=1e-8)
    # t -> infinity: the plateau V0 exp(r / rho)
    assert torch.allclose(gompertz_volume(v0, 0.7, 0.5, 200.0), v0 * math.exp(1.4), rtol=1e-12)
    assert torch.equal(gompertz_volume(v0, 0.7, 0.5, 0.0), v0)


def test_doubling_time_of_exponential_growth_is_ln2_over_r():
    r = growth_rate(NODULE_VDT_DAYS["solid"])  # 1/year
    v0 = torch.tensor(0.2, dtype=torch.float64)
    v1 = gompertz_volume(v0, r, 0.0, 1.3)
    assert abs(float(doubling_time(v0, v1, 1.3)) * 365.25 - NODULE_VDT_DAYS["solid"]) < 1e-9
    assert math.isinf(float(doubling_time(v0, v0 * 0.9, 1.0)))
    # deceleration lengthens the measured doubling time
    assert float(doubling_time(v0, gompertz_volume(v0, r, 0.3, 1.3), 1.3)) * 365.25 > NODULE_VDT_DAYS["solid"]


def test_suspicious_growth_flags_doubling_faster_than_400_days_only():
    v0, t = torch.ones(5, dtype=torch.float64), torch.full((5,), 2.0, dtype=torch.float64)
    days = torch.tensor([300.0, 399.0, 401.0, 800.0, 250.0], dtype=torch.float64)
    v1 = v0 * 2.0 ** (t * 365.25 / days)  # exact doublings every `days`
    v1[4] = -0.1  # a follow-up predicted below zero has no doubling time
    assert torch.allclose(doubling_time_days(v0, v1, t)[:4], days[:4])
    assert math.isnan(float(doubling_time_days(v0, v1, t)[4]))
    assert suspicious_growth(v0, v1, t).tolist() == [True, True, False, False, False]
    assert suspicious_growth(v0, v1, t, threshold_days=900.0).tolist() == [True, True, True, True, False]


def test_algorithm_is_node_wise_and_batched():
    algorithm = GompertzGrowth(rho=0.3)
    x0 = torch.rand(5, 1, dtype=torch.float64)
    params = algorithm.sample_params(5, torch.Generator().manual_seed(0))
    y = algorithm(torch.zeros(1, 1, dtype=torch.float64), x0, params)
    assert y.shape == (5, 1)
    assert torch.allclose(y[:, 0], gompertz_volume(x0[:, 0], params[:, 0], 0.3, params[:, 1]))
    assert (y >= x0).all()


def test_rollout_with_decaying_rate_composes_exactly():
    """Steps of at most one year, each starting from the rate decayed so far, reach the direct solution."""
    from rmr_lightning.rollout import rollout

    rho = 0.3
    x0 = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    params = torch.tensor([[1.1, 2.5], [0.4, 0.7], [0.8, 3.0]], dtype=torch.float64)  # (r, t)
    step = lambda x, p: gompertz_volume(x, p[:, 0], rho, p[:, 1])  # noqa: E731
    direct = step(x0, params)
    stepped = rollout(step, x0, params, 1, 1.0, torch.arange(3), torch.tensor([rho, 0.0], dtype=torch.float64))
    assert torch.allclose(stepped, direct, rtol=1e-12)
    constant = rollout(step, x0, params, 1, 1.0, torch.arange(3))  # ignoring the decay overshoots
    assert (constant[[0, 2]] > direct[[0, 2]] * 1.05).all()
