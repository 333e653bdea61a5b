"""Stage 1 of RMR: pretrain a processor ``P`` to emulate an algorithm ``A`` on abstract data.

``y'_hat = g(P(f(x')))`` with linear encoder ``f`` and decoder ``g`` (Velickovic et al. 2022, Sec. 3).
Because ``P(z) = z + core(z)``, the loss ``|g(P(f(x'))) - y'|^2 + |g(f(x')) - x'|^2`` makes ``g`` read
the current state from a latent and ``g(core(z))`` the change, so the latent keeps the meaning of the
abstract state (used for the interpretable readout and for rollouts). Horizons longer than any seen in
training are reached as an algorithm would: ``P`` is applied as a rollout of steps no longer than the
longest training horizon, decoding and re-encoding the state between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, MetricCollection, R2Score

from processors.base import Processor
from processors.registry import resolve_processor
from rmr_lightning.algorithms import AbstractSpec, NetworkDiffusion
from rmr_lightning.artifact import check_rebuildable
from rmr_lightning.data.batches import GraphBatch
from rmr_lightning.guards import check_loss
from rmr_lightning.optim import configure_optimizers
from rmr_lightning.protocols import HasAbstractSpec, HasTestNames
from rmr_lightning.rollout import rollout

ProcessorFactory = Callable[[int], Processor]


def build_processor(processor: ProcessorFactory | str, hidden_dim: int) -> Processor:
    """A processor of width ``hidden_dim`` from a registered short name or a class/partial."""
    factory = resolve_processor(processor) if isinstance(processor, str) else processor
    built = factory(hidden_dim)
    if not isinstance(built, Processor):
        raise TypeError(f"processor factory returned {type(built).__name__}, not a processors.base.Processor")
    return built


def default_abstract_spec() -> AbstractSpec:
    """The spec a module gets without a datamodule: that of the default algorithm, ``NetworkDiffusion()``."""
    return AbstractSpec.from_algorithm(NetworkDiffusion())


def _metrics() -> MetricCollection:
    return MetricCollection({"mse": MeanSquaredError(), "r2_delta": R2Score()})


class ProcessorPretraining(L.LightningModule):
    """Linear ``f``, processor ``P``, linear ``g``; MSE on ``y'``.

    Args:
        processor: short name registered in ``rmr_lightning.processors`` or a class_path (its
            ``hidden_dim`` is filled in here).
        hidden_dim: latent width shared by f, P and g.
        abstract_spec: parameter names/scales and rollout bound of the algorithm (an ``AbstractSpec`` or its
            dict, as checkpoint hyperparameters hold it); the CLI links it from the datamodule, so it is never
            typed in YAML. None: that of ``NetworkDiffusion()``.
        reconstruction_weight: weight of ``|g(f(x')) - x'|^2``.
        optimizer, lr_scheduler: injected callables (LightningCLI).
    """

    def __init__(
        self,
        processor: str | ProcessorFactory = "mpnn",
        hidden_dim: int = 128,
        abstract_spec: AbstractSpec | dict | None = None,
        reconstruction_weight: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        spec = AbstractSpec.from_dict(abstract_spec) if abstract_spec else default_abstract_spec()
        if abstract_spec:  # saved as its dict: checkpoints hold plain values only (read with weights_only=True)
            abstract_spec = spec.to_dict()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])  # reads the arguments' current values
        self.abstract_spec = spec
        self.register_buffer("param_scale", torch.tensor(spec.param_scale, dtype=torch.float32), persistent=False)
        self.time_index = spec.time_index
        self.max_time = spec.max_time
        self.register_buffer("param_decay", torch.tensor(spec.decay, dtype=torch.float32), persistent=False)
        self.encoder = nn.Linear(1 + len(spec.param_names), hidden_dim)  # f: [x', params] -> z
        self.processor = build_processor(processor, hidden_dim)  # P
        self.processor.init_args()  # a processor the artifact could not rebuild fails now, not after training
        check_rebuildable(self.processor)  # nor one the artifact's allow-list would refuse to load
        self.decoder = nn.Linear(hidden_dim, 1)  # g: z -> state
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_metrics = _metrics().clone(prefix="train/")
        self.val_metrics = _metrics().clone(prefix="val/")
        self.test_metrics = nn.ModuleDict()

    # ---- encode / process / decode -------------------------------------------------------------
    def encode(self, x: Tensor, params: Tensor, batch: Tensor) -> Tensor:
        """f: x (N,), params (G, P) -> z (N, H)."""
        feats = torch.cat([x.unsqueeze(-1), (params / self.param_scale)[batch]], dim=-1)  # (N, 1 + P)
        return self.encoder(feats)

    def decode(self, z: Tensor) -> Tensor:
        """g: z (N, H) -> state (N,)."""
        return self.decoder(z).squeeze(-1)

    def step(self, x: Tensor, params: Tensor, b: GraphBatch) -> Tensor:
        """One application of ``g(P(f(.)))``: state (N,) -> next state (N,)."""
        z = self.encode(x, params, b.batch)
        return self.decode(self.processor(z, edge_index=b.edge_index, edge_weight=b.edge_weight, batch=b.batch))

    def forward(self, b: GraphBatch) -> tuple[Tensor, Tensor]:
        """Predict ``y'`` (as a rollout where a horizon exceeds the training maximum) and reconstruct ``x'``."""
        y_hat = rollout(
            lambda x, p: self.step(x, p, b), b.x, b.params, self.time_index, self.max_time, b.batch, self.param_decay
        )
        recon = self.decode(self.encode(b.x, b.params, b.batch))
        return y_hat, recon

    # ---- one shared step for every stage ---------------------------------------------------------
    def model_step(self, b: GraphBatch) -> tuple[Tensor, Tensor, Tensor]:
        y_hat, recon = self(b)
        loss = nn.functional.mse_loss(y_hat, b.y) + self.hparams.reconstruction_weight * nn.functional.mse_loss(
            recon, b.x
        )
        return loss, y_hat - b.x, b.y - b.x

    def _log_stage(
        self, stage: str, metrics: MetricCollection, b: GraphBatch, loss: Tensor, delta_hat: Tensor, delta: Tensor
    ) -> None:
        check_loss(loss, stage, self.global_step)
        metrics(delta_hat, delta)
        self.log(f"{stage}/loss", loss, batch_size=b.num_graphs, prog_bar=stage != "test", sync_dist=stage != "train")
        self.log_dict(metrics, batch_size=b.num_graphs, prog_bar=stage == "val")

    def training_step(self, b: GraphBatch, batch_idx: int) -> Tensor:
        loss, delta_hat, delta = self.model_step(b)
        self._log_stage("train", self.train_metrics, b, loss, delta_hat.detach(), delta)
        return loss

    def validation_step(self, b: GraphBatch, batch_idx: int) -> None:
        loss, delta_hat, delta = self.model_step(b)
        self._log_stage("val", self.val_metrics, b, loss, delta_hat, delta)

    def test_step(self, b: GraphBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self._test_name(dataloader_idx)
        if name not in self.test_metrics:
            self.test_metrics[name] = R2Score().to(self.device)
        loss, delta_hat, delta = self.model_step(b)
        self.test_metrics[name].update(delta_hat, delta)
        self.log(
            f"test/r2_delta_{name}",
            self.test_metrics[name],
            batch_size=b.num_graphs,
            add_dataloader_idx=False,
            metric_attribute=f"test_metrics.{name}",  # created lazily, one per test set
        )
        self.log(f"test/loss_{name}", loss, batch_size=b.num_graphs, add_dataloader_idx=False, sync_dist=True)

    def _test_name(self, dataloader_idx: int) -> str:
        datamodule = self.trainer.datamodule
        names = datamodule.test_names if isinstance(datamodule, HasTestNames) else None
        return names[dataloader_idx] if names else f"set{dataloader_idx}"

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self, self.optimizer, self.lr_scheduler)


def quick_artifact(datamodule: Any, processor: str, hidden_dim: int, path: str | Path, lr: float = 3e-3) -> Path:
    """One epoch of plain Adam on ``datamodule``, saved as a processor artifact: a stand-in ``P`` for tests
    and data benchmarks, which measure the code path and not the model's accuracy."""
    from rmr_lightning.artifact import save_processor_artifact

    if not isinstance(datamodule, HasAbstractSpec):
        raise TypeError(f"{type(datamodule).__name__} has no abstract_spec: quick_artifact needs abstract data")
    torch.manual_seed(0)
    datamodule.setup("fit")
    model = ProcessorPretraining(processor=processor, hidden_dim=hidden_dim, abstract_spec=datamodule.abstract_spec)
    opt = torch.optim.Adam(model.parameters(), lr)
    for batch in datamodule.train_dataloader():
        loss, _, _ = model.model_step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_processor_artifact(path, model.processor, model.encoder, model.decoder, model.abstract_spec)
    return Path(path)
