"""Abstract data ``x' -> y' = A(x')`` on random graphs and the DK84 connectome (stage 1 of RMR).

Everything is generated once per ``setup`` from a seed and kept resident (graph structures in a pool,
samples as flat tensors), so an epoch is only batching: a batch of graphs is gathered by index
arithmetic, not by collating Python objects. Test sets probe generalisation: in-distribution graphs,
the real DK84 connectome, graphs 2-4x larger than any seen, and horizons 1.5-3x longer than any seen.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.configs import LoaderConfig, as_config, plain
from datamodules.graphs import initial_states, random_graph
from datamodules.sampling import epoch_sampler, seeded_loader
from rmr_lightning.algorithms import AbstractSpec, DiffusionSpectrum, GraphAlgorithm, NetworkDiffusion
from rmr_lightning.data.batches import GraphBatch
from rmr_lightning.data.connectome import graph_tensors, load_dk84


def _ranges(starts: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenated ``arange(s, s + l)`` for each pair, and the owner of each element."""
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    return starts[owner] + torch.arange(int(lengths.sum())) - first[owner], owner


class GraphSamples(Dataset):
    """Samples of ``A`` on a pool of graphs, stored flat; ``__getitems__`` returns a ``GraphBatch``.

    Args:
        graphs: dense (n, n) connectivities.
        graph_of_sample: (S,) index into ``graphs`` for each sample.
        algorithm: the algorithm A that produces the targets.
        seed: seed of initial states and parameters.
        state_sampler: ``(connectivity, num, rng) -> x0 (num, n)``; default ``initial_states`` (seeded,
            spread and diffused patterns of pathology).
    """

    def __init__(
        self,
        graphs: list[Tensor],
        graph_of_sample: Tensor,
        algorithm: GraphAlgorithm,
        seed: int,
        state_sampler: Callable[[Tensor, int, np.random.Generator], Tensor] | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        sizes = torch.tensor([g.shape[0] for g in graphs])
        edges, weights, edge_counts = [], [], []
        for conn in graphs:
            edge_index, edge_weight = graph_tensors(conn)
            edges.append(edge_index)
            weights.append(edge_weight)
            edge_counts.append(edge_index.shape[1])
        self.num_nodes = sizes
        self.edge_count = torch.tensor(edge_counts)
        self.edge_start = torch.cumsum(self.edge_count, 0) - self.edge_count
        self.edges = torch.cat(edges, 1)  # local node ids
        self.weights = torch.cat(weights)

        self.graph_of_sample = graph_of_sample
        self.params = torch.empty(len(graph_of_sample), len(algorithm.param_names))
        node_counts = sizes[graph_of_sample]
        self.node_start = torch.cumsum(node_counts, 0) - node_counts
        total = int(node_counts.sum())
        self.x = torch.empty(total)
        self.y = torch.empty(total)
        for g in torch.unique(graph_of_sample).tolist():
            ids = torch.nonzero(graph_of_sample == g).squeeze(1)
            conn = graphs[g]
            x0 = (
                state_sampler(conn, len(ids), rng)
                if state_sampler
                else initial_states(DiffusionSpectrum(conn), len(ids), rng)
            )
            params = algorithm.sample_params(len(ids), gen)
            y = algorithm(conn, x0, params)
            n = conn.shape[0]
            idx = (self.node_start[ids].unsqueeze(1) + torch.arange(n)).reshape(-1)
            self.x[idx] = x0.reshape(-1).float()
            self.y[idx] = y.reshape(-1).float()
            self.params[ids] = params.float()

    def __len__(self) -> int:
        return len(self.graph_of_sample)

    def __getitem__(self, index: int) -> GraphBatch:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> GraphBatch:
        ids = torch.as_tensor(indices)
        g = self.graph_of_sample[ids]
        n = self.num_nodes[g]
        node_idx, node_owner = _ranges(self.node_start[ids], n)
        edge_idx, edge_owner = _ranges(self.edge_start[g], self.edge_count[g])
        offset = torch.cumsum(n, 0) - n
        return GraphBatch(
            x=self.x[node_idx],
            y=self.y[node_idx],
            params=self.params[ids],
            edge_index=self.edges[:, edge_idx] + offset[edge_owner],
            edge_weight=self.weights[edge_idx],
            batch=node_owner,
            num_graphs=len(ids),
        )


def _identity(batch: GraphBatch) -> GraphBatch:
    return batch


_LOADER = LoaderConfig(batch_size=64)


class AbstractGraphDataModule(L.LightningDataModule):
    """Synthetic ``x' -> A(x')`` on random graphs plus DK84.

    Args:
        algorithm: the algorithm A (default ``NetworkDiffusion()``).
        num_train, num_val, num_test: samples per split (each test set has ``num_test``).
        num_graphs: random graphs in the training pool (validation and tests draw their own).
        min_nodes, max_nodes: size range of random training graphs.
        dk84_fraction: share of training samples on the DK84 connectome.
        larger_factor: test graphs have this many times the largest training graph's nodes.
        horizon_factor: the longer-horizon test multiplies the largest training time by this range.
        loader: ``LoaderConfig`` (``batch_size`` graphs per batch, ``num_workers``); a dict of the fields to
            change also works, and ``hparams`` holds it as a dict.
        seed: everything is a function of it.
    """

    test_names = ("in_distribution", "dk84", "larger_graphs", "longer_horizon")

    def __init__(
        self,
        algorithm: GraphAlgorithm | None = None,
        num_train: int = 100_000,
        num_val: int = 2_000,
        num_test: int = 2_000,
        num_graphs: int = 2_000,
        min_nodes: int = 8,
        max_nodes: int = 64,
        dk84_fraction: float = 0.1,
        larger_factor: tuple[float, float] = (2.0, 4.0),
        horizon_factor: tuple[float, float] = (1.5, 3.0),
        loader: LoaderConfig | None = _LOADER,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.loader = as_config(LoaderConfig, loader, _LOADER)
        if not 2 <= min_nodes <= max_nodes:
            raise ValueError(f"need 2 <= min_nodes <= max_nodes, got {min_nodes}, {max_nodes}")
        if not 0.0 <= dk84_fraction <= 1.0:
            raise ValueError(f"dk84_fraction must lie in [0, 1], got {dk84_fraction}")
        self.algorithm = algorithm if algorithm is not None else NetworkDiffusion()
        if self.algorithm.time_param is None:
            raise ValueError("the longer-horizon test needs an algorithm with a time parameter")
        self.save_hyperparameters(ignore=["algorithm"])
        self.hparams["loader"] = plain(self.loader)  # a plain dict: checkpoints are read with weights_only=True
        self.splits: dict[str, GraphSamples] = {}

    @property
    def abstract_spec(self) -> AbstractSpec:
        """What the pretraining module and the artifact need to know about the abstract inputs."""
        return AbstractSpec.from_algorithm(self.algorithm)

    @property
    def largest_training_graph(self) -> int:
        return max(self.hparams.max_nodes, 84 if self.hparams.dk84_fraction > 0 else 0)

    def _pool(self, count: int, low: int, high: int, rng: np.random.Generator) -> list[Tensor]:
        return [random_graph(int(rng.integers(low, high + 1)), rng) for _ in range(count)]

    def _split(self, name: str, seed: int) -> GraphSamples:
        hp = self.hparams
        rng = np.random.default_rng(seed)
        dk84, _ = load_dk84()
        if name in ("train", "val", "in_distribution", "longer_horizon"):
            count = hp.num_train if name == "train" else (hp.num_val if name == "val" else hp.num_test)
            pool = self._pool(
                hp.num_graphs if name == "train" else max(50, hp.num_graphs // 20), hp.min_nodes, hp.max_nodes, rng
            )
            share = hp.dk84_fraction if name in ("train", "val") else 0.0
            graph_of_sample = torch.as_tensor(rng.integers(len(pool), size=count))
            graph_of_sample[torch.as_tensor(rng.random(count) < share)] = len(pool)
            graphs = pool + [dk84]
        elif name == "dk84":
            graphs, graph_of_sample = [dk84], torch.zeros(hp.num_test, dtype=torch.long)
        elif name == "larger_graphs":
            low, high = (int(f * self.largest_training_graph) for f in hp.larger_factor)
            graphs = self._pool(max(20, hp.num_test // 50), low, high, rng)
            graph_of_sample = torch.as_tensor(rng.integers(len(graphs), size=hp.num_test))
        else:
            raise KeyError(name)
        algorithm = self.algorithm
        if name == "longer_horizon":
            t_max = self.algorithm.max_time
            algorithm = algorithm.with_ranges(**{algorithm.time_param: tuple(f * t_max for f in hp.horizon_factor)})
        return GraphSamples(graphs, graph_of_sample, algorithm, seed)

    def setup(self, stage: str | None = None) -> None:
        names = {"fit": ("train", "val"), "validate": ("val",), "test": self.test_names, "predict": self.test_names}
        wanted = names.get(stage, ("train", "val", *self.test_names))
        for offset, name in enumerate(("train", "val", *self.test_names)):
            if name in wanted and name not in self.splits:  # idempotent: setup may run twice
                self.splits[name] = self._split(name, self.hparams.seed * 1000 + offset)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        sampler = epoch_sampler(self.splits[name], self.hparams.seed, shuffle=shuffle)
        return seeded_loader(self.splits[name], self.loader, sampler, _identity)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(name, shuffle=False) for name in self.test_names]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()
