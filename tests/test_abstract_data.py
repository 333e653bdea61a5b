"""Abstract graph data: determinism, idempotent setup, batch layout, test-set definitions."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.abstract import AbstractGraphDataModule
from datamodules.graphs import GENERATORS, random_graph


def _dm(seed: int = 0) -> AbstractGraphDataModule:
    return AbstractGraphDataModule(
        num_train=200, num_val=40, num_test=40, num_graphs=20, loader={"batch_size": 16}, seed=seed
    )


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b, c = _dm(0), _dm(0), _dm(1)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.splits["train"].y, b.splits["train"].y)
    assert not torch.equal(a.splits["train"].x[:100], c.splits["train"].x[:100])


def test_setup_is_idempotent_and_stage_specific() -> None:
    dm = _dm()
    dm.setup("fit")
    train = dm.splits["train"]
    dm.setup("fit")
    assert dm.splits["train"] is train and "dk84" not in dm.splits
    dm.setup("test")
    assert set(dm.splits) >= set(dm.test_names)


def test_batches_are_valid_graphs_with_targets_of_the_algorithm() -> None:
    dm = _dm()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_graphs == 16 and batch.params.shape == (16, 2)
    assert int(batch.batch.max()) == 15 and batch.x.shape == batch.y.shape == batch.batch.shape
    assert int(batch.edge_index.max()) < batch.x.shape[0]
    assert torch.equal(batch.batch[batch.edge_index[0]], batch.batch[batch.edge_index[1]])  # no edge crosses graphs
    # rebuild the first graph and re-run the algorithm on it
    nodes = batch.batch == 0
    n = int(nodes.sum())
    mask = batch.batch[batch.edge_index[1]] == 0
    dense = torch.zeros(n, n, dtype=torch.float64)
    dense[batch.edge_index[1, mask], batch.edge_index[0, mask]] = batch.edge_weight[mask].double()  # row-normalised
    gamma, t = batch.params[0].double()
    hmat = torch.diag(dense.sum(1)) - dense  # = diag(1/d)(D - C) since rows of the weights sum to 1 (0 if isolated)
    expected = torch.linalg.matrix_exp(-gamma * t * hmat) @ batch.x[nodes].double()
    assert torch.allclose(expected.float(), batch.y[nodes], atol=1e-5)


def test_test_sets_probe_what_they_claim() -> None:
    dm = _dm()
    dm.setup("test")
    sizes = dm.splits["larger_graphs"].num_nodes
    assert int(sizes.min()) >= 2 * dm.largest_training_graph and int(sizes.max()) <= 4 * dm.largest_training_graph
    assert dm.splits["dk84"].num_nodes.tolist() == [84]
    horizons = dm.splits["longer_horizon"].params[:, 1]
    t_max = dm.algorithm.max_time
    assert float(horizons.min()) >= 1.5 * t_max - 1e-4 and float(horizons.max()) <= 3.0 * t_max + 1e-4


def test_every_generator_gives_symmetric_nonnegative_graphs() -> None:
    rng = np.random.default_rng(0)
    for name in GENERATORS:
        conn = random_graph(20, rng, (name,))
        assert (
            conn.shape == (20, 20)
            and torch.allclose(conn, conn.T)
            and (conn >= 0).all()
            and conn.diagonal().eq(0).all()
        )
