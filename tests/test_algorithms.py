"""The algorithms against closed forms, an independent expm, a reference ODE solver, and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch

from rmr_lightning.algorithms import FisherKPP, NetworkDiffusion, fisher_kpp, network_diffusion, random_walk_laplacian
from rmr_lightning.data.connectome import load_dk84


@pytest.fixture(scope="module")
def dk84() -> torch.Tensor:
    return load_dk84()[0]


def _connected(n: int = 12, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = rng.random((n, n)) * (rng.random((n, n)) < 0.5)
    w = np.triu(w, 1)
    w = w + w.T
    for i in range(n - 1):  # a path guarantees connectivity
        w[i, i + 1] = w[i + 1, i] = max(w[i, i + 1], 0.3)
    return torch.as_tensor(w)


def test_network_diffusion_matches_independent_expm_on_dk84(dk84: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 84, generator=gen, dtype=torch.float64)
    gamma = torch.linspace(0.05, 0.6, 6, dtype=torch.float64)
    t = torch.linspace(0.5, 8.0, 6, dtype=torch.float64)
    got = network_diffusion(dk84, x0, gamma, t)
    hmat = random_walk_laplacian(dk84).numpy()
    ref = np.stack([scipy.linalg.expm(-float(g * s) * hmat) @ x.numpy() for g, s, x in zip(gamma, t, x0, strict=True)])
    rel = np.abs(got.numpy() - ref).max() / np.abs(ref).max()
    assert rel < 1e-6, rel


def test_isolated_nodes_of_dk84_keep_their_state(dk84: torch.Tensor) -> None:
    isolated = torch.nonzero(dk84.sum(1) == 0).squeeze(1)
    assert isolated.tolist() == [34, 83]  # the two cerebellar cortices
    x0 = torch.rand(84, dtype=torch.float64)
    out = network_diffusion(dk84, x0, 0.4, 3.0)
    assert torch.equal(out[isolated], x0[isolated]) or torch.allclose(out[isolated], x0[isolated], atol=1e-12)


def test_degree_weighted_mass_is_conserved_and_steady_state_is_its_mean() -> None:
    conn = _connected()
    deg = conn.sum(1)
    x0 = torch.rand(12, dtype=torch.float64)
    for t in (0.3, 2.0, 10.0):
        xt = network_diffusion(conn, x0, 0.5, t)
        assert torch.isclose((deg * xt).sum(), (deg * x0).sum(), rtol=1e-10)
    steady = network_diffusion(conn, x0, 1.0, 500.0)
    expected = (deg * x0).sum() / deg.sum()
    assert torch.allclose(steady, expected.expand(12), atol=1e-8)


def test_shapes_and_batching_agree() -> None:
    conn = _connected()
    x0 = torch.rand(3, 12, dtype=torch.float64)
    batched = network_diffusion(conn, x0, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), 2.0)
    singles = torch.stack([network_diffusion(conn, x0[i], 0.1 * (i + 1), 2.0) for i in range(3)])
    assert batched.shape == (3, 12) and singles.shape == (3, 12)
    assert torch.allclose(batched, singles, atol=1e-12)


def test_bad_connectivity_is_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        network_diffusion(-_connected(), torch.rand(12, dtype=torch.float64), 0.1, 1.0)
    asymmetric = _connected()
    asymmetric[0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        network_diffusion(asymmetric, torch.rand(12, dtype=torch.float64), 0.1, 1.0)
    with pytest.raises(ValueError, match="nodes"):
        network_diffusion(_connected(), torch.rand(5, dtype=torch.float64), 0.1, 1.0)


def test_fisher_kpp_alpha_one_is_diffusion(dk84: torch.Tensor) -> None:
    x0 = torch.rand(2, 84, dtype=torch.float64)
    got = fisher_kpp(dk84, x0, 0.3, 1.0, 3.0)
    assert torch.allclose(got, network_diffusion(dk84, x0, 0.3, 3.0), atol=1e-7)


def test_fisher_kpp_without_edges_is_logistic_growth() -> None:
    x0 = torch.tensor([0.01, 0.2, 0.7, 1.0, 0.0], dtype=torch.float64)
    alpha, w, t = 0.25, torch.tensor([0.5, 1.0, 2.0, 1.0, 3.0], dtype=torch.float64), 4.0
    got = fisher_kpp(torch.zeros(5, 5, dtype=torch.float64), x0, 0.4, alpha, t, weights=w)
    growth = torch.exp((1 - alpha) * w * t)
    expected = x0 * growth / (1 - x0 + x0 * growth)
    assert torch.allclose(got, expected, atol=1e-7)


def test_fisher_kpp_matches_reference_solver_within_1e_4(dk84: torch.Tensor) -> None:
    hmat = random_walk_laplacian(dk84).numpy()
    x0 = np.zeros(84)
    x0[[4, 53]] = 0.8
    gamma, alpha, w, t = 0.5, 0.6, 0.8, 6.0

    def rhs(_, x):
        return alpha * (-gamma * hmat @ x) + (1 - alpha) * w * x * (1 - x)

    ref = scipy.integrate.solve_ivp(rhs, (0, t), x0, method="DOP853", rtol=1e-12, atol=1e-12).y[:, -1]
    got = fisher_kpp(dk84, torch.as_tensor(x0), gamma, alpha, t, weights=torch.full((84,), w, dtype=torch.float64))
    assert np.abs(got.numpy() - ref).max() < 1e-4


def test_algorithm_plugins_sample_in_range_and_refuse_bad_ranges() -> None:
    algo = NetworkDiffusion(gamma=(0.1, 0.2), t=(1.0, 2.0))
    params = algo.sample_params(1000, torch.Generator().manual_seed(0))
    assert params.shape == (1000, 2)
    assert params[:, 0].min() >= 0.1 and params[:, 0].max() <= 0.2 and params[:, 1].min() >= 1.0
    longer = algo.with_ranges(t=(3.0, 6.0))
    assert longer.max_time == 6.0 and algo.max_time == 2.0
    with pytest.raises(ValueError, match="low <= high"):
        NetworkDiffusion(t=(2.0, 1.0))
    fkpp = FisherKPP()
    assert fkpp.param_names == ("gamma", "alpha", "t") and fkpp.time_index == 2


@pytest.mark.gpu
def test_algorithms_on_gpu_match_cpu(dk84: torch.Tensor) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x0 = torch.rand(4, 84, dtype=torch.float64)
    cpu = network_diffusion(dk84, x0, 0.3, 2.0)
    gpu = network_diffusion(dk84.cuda(), x0.cuda(), 0.3, 2.0).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-10)
    assert torch.allclose(
        fisher_kpp(dk84, x0, 0.3, 0.5, 2.0), fisher_kpp(dk84.cuda(), x0.cuda(), 0.3, 0.5, 2.0).cpu(), atol=1e-10
    )
