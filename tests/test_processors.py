"""The processor contract: skip connection, graph use, equivariance, rebuild, reset and repr."""

from __future__ import annotations

import pytest
import torch

from processors import GATv2Processor, MaxMPNNProcessor, MLPProcessor, MPNNProcessor, Processor
from processors.base import weighted_adjacency

FAMILIES = [MLPProcessor, MPNNProcessor, MaxMPNNProcessor, GATv2Processor]


def _graph(n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dense = (torch.rand(n, n, generator=gen) < 0.5).float() * torch.rand(n, n, generator=gen)
    dense = torch.triu(dense, 1)
    dense = dense + dense.T
    dst, src = torch.nonzero(dense, as_tuple=True)
    return torch.stack([src, dst]), dense[dst, src]


@pytest.mark.parametrize("cls", FAMILIES)
def test_skip_connection_lives_in_the_base(cls: type[Processor]) -> None:
    proc = cls(hidden_dim=16, num_layers=2)
    edge_index, edge_weight = _graph()
    z = torch.randn(7, 16)
    torch.nn.init.zeros_(proc.readout.weight)
    torch.nn.init.zeros_(proc.readout.bias)
    assert torch.equal(proc(z, edge_index=edge_index, edge_weight=edge_weight), z)


@pytest.mark.parametrize("cls", FAMILIES)
def test_output_shape_and_rebuild_from_init_args(cls: type[Processor]) -> None:
    proc = cls(hidden_dim=16, num_layers=3)
    edge_index, edge_weight = _graph()
    z = torch.randn(7, 16)
    out = proc(z, edge_index=edge_index, edge_weight=edge_weight)
    assert out.shape == (7, 16)
    twin = cls(**proc.init_args())
    twin.load_state_dict(proc.state_dict())
    assert torch.equal(twin(z, edge_index=edge_index, edge_weight=edge_weight), out)
    assert proc.init_args()["hidden_dim"] == 16 and proc.init_args()["num_layers"] == 3


@pytest.mark.parametrize("cls", FAMILIES)
def test_reset_parameters_and_repr(cls: type[Processor]) -> None:
    proc = cls(hidden_dim=8, num_layers=1)
    before = [p.clone() for p in proc.parameters()]
    proc.reset_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, proc.parameters(), strict=True))
    text = repr(proc)
    assert text.startswith(cls.__name__ + "(") and "hidden_dim=8" in text and "\n" not in text


@pytest.mark.parametrize("cls", [MPNNProcessor, MaxMPNNProcessor, GATv2Processor])
def test_graph_processors_need_a_graph_and_are_permutation_equivariant(cls: type[Processor]) -> None:
    assert cls.needs_graph and cls.supports_edge_weight
    proc = cls(hidden_dim=16, num_layers=2)
    with pytest.raises(ValueError, match="needs a graph"):
        proc(torch.randn(7, 16))
    edge_index, edge_weight = _graph()
    z = torch.randn(7, 16)
    perm = torch.randperm(7)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(7)
    out = proc(z, edge_index=edge_index, edge_weight=edge_weight)
    out_perm = proc(z[perm], edge_index=inverse[edge_index], edge_weight=edge_weight)
    assert torch.allclose(out_perm, out[perm], atol=1e-5)


def test_graph_changes_the_mpnn_but_not_the_mlp() -> None:
    edge_index, edge_weight = _graph()
    z = torch.randn(7, 16)
    mpnn, mlp = MPNNProcessor(16, 2), MLPProcessor(16, 2)
    assert not torch.allclose(
        mpnn(z, edge_index=edge_index, edge_weight=edge_weight),
        mpnn(z, edge_index=edge_index, edge_weight=2 * edge_weight),
    )
    assert torch.equal(mlp(z), mlp(z, edge_index=edge_index, edge_weight=edge_weight))


def test_weighted_adjacency_matches_a_dense_product_and_its_gradient() -> None:
    edge_index, edge_weight = _graph(9, seed=3)
    dense = torch.zeros(9, 9, dtype=torch.float64)
    dense[edge_index[1], edge_index[0]] = edge_weight.double()
    h = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    adj = weighted_adjacency(9, edge_index, edge_weight.double())
    assert torch.allclose(adj @ h, dense @ h)
    assert torch.autograd.gradcheck(lambda x: adj @ x, (h,))
    shuffled = torch.randperm(edge_index.shape[1])  # unsorted edges are sorted internally
    adj2 = weighted_adjacency(9, edge_index[:, shuffled], edge_weight.double()[shuffled])
    assert torch.allclose(adj2 @ h, dense @ h)


@pytest.mark.parametrize("cls", FAMILIES)
def test_trains_under_bf16_autocast(cls: type[Processor]) -> None:
    """bf16-mixed runs (configs/trainer/gpu.yaml): the sparse products stay fp32, so CPU autocast works too."""
    torch.manual_seed(0)
    proc = cls(hidden_dim=16, num_layers=2)
    edge_index, edge_weight = _graph()
    z = torch.randn(7, 16)
    reference = proc(z, edge_index=edge_index, edge_weight=edge_weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = proc(z, edge_index=edge_index, edge_weight=edge_weight)
    out.float().square().sum().backward()
    grads = [p.grad for p in proc.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.allclose(out.float(), reference, atol=0.1, rtol=0.05)  # bf16 keeps ~3 significant digits


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown activation"):
        MLPProcessor(8, act="swishy")
    with pytest.raises(ValueError, match="divisible"):
        GATv2Processor(10, heads=4)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        MLPProcessor(8)(torch.randn(3, 5))


class _Forgetful(MLPProcessor):
    """Takes an argument and does not keep it: the artifact could not rebuild it."""

    def __init__(self, hidden_dim: int, scale: float = 2.0, **kwargs) -> None:
        super().__init__(hidden_dim, **kwargs)


def test_a_processor_that_does_not_keep_an_init_argument_fails_before_training() -> None:
    from rmr_lightning.pretraining import ProcessorPretraining

    with pytest.raises(AttributeError, match="_Forgetful must keep its init argument 'scale' as self.scale"):
        ProcessorPretraining(processor=lambda hidden_dim: _Forgetful(hidden_dim), hidden_dim=8)
