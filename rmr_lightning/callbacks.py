"""Callbacks that write what a run promises: the processor artifact and the figures of pretraining."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from rmr_lightning.artifact import save_processor_artifact
from rmr_lightning.environment import run_environment


class PretrainingArtifacts(L.Callback):
    """Writes ``processor.pt`` after fit and ``metrics.json`` after test, from rank 0 only.

    Also measures training throughput (graphs/s over the time spent inside training batches, so
    validation and data generation do not count) and records it in both files.

    Args:
        dirpath: output folder (e.g. ``results/pretrain``).
    """

    def __init__(self, dirpath: str = "results/pretrain") -> None:
        self.dirpath = Path(dirpath)
        self._graphs = 0
        self._seconds = 0.0
        self._start = 0.0
        self._fit_start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            (self.dirpath / "val_curve.csv").write_text("step,seconds,train_seconds,val_r2_delta\n")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Append (step, wall seconds since fit start, seconds in training batches, val R^2) to ``val_curve.csv``."""
        r2 = trainer.callback_metrics.get("val/r2_delta")
        if trainer.is_global_zero and r2 is not None and not trainer.sanity_checking:
            with (self.dirpath / "val_curve.csv").open("a") as f:
                f.write(f"{trainer.global_step},{time.perf_counter() - self._fit_start:.1f},{self._seconds:.1f},{float(r2):.6f}\n")

    @property
    def throughput(self) -> float:
        return self._graphs / self._seconds if self._seconds else float("nan")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._seconds += time.perf_counter() - self._start
        self._graphs += int(getattr(batch, "num_graphs", 0)) * trainer.world_size

    def _metrics(self, trainer: L.Trainer, prefix: str) -> dict[str, float]:
        return {k.removeprefix(prefix): float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        stats = {
            "graphs_per_second": self.throughput,
            "train_seconds": self._seconds,
            "global_step": trainer.global_step,
            **{f"val_{k}": v for k, v in self._metrics(trainer, "val/").items()},
        }
        sha = save_processor_artifact(
            self.dirpath / "processor.pt",
            pl_module.processor,
            pl_module.encoder,
            pl_module.decoder,
            pl_module.abstract_spec,
            metrics=stats,
        )
        (self.dirpath / "fit_stats.json").write_text(json.dumps({**stats, "sha256": sha}, indent=2))
        rank_zero_info(f"processor artifact: {self.dirpath / 'processor.pt'} (sha256 {sha[:12]}), {self.throughput:.0f} graphs/s")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        metrics = {k: v for k, v in self._metrics(trainer, "test/").items() if k.startswith("r2_delta")}
        fit_stats = self.dirpath / "fit_stats.json"
        if fit_stats.is_file():
            metrics.update({k: v for k, v in json.loads(fit_stats.read_text()).items() if k in ("graphs_per_second", "train_seconds", "sha256")})
        metrics["processor"] = type(pl_module.processor).__name__
        metrics["environment"] = run_environment()  # figures from another CPU or package set differ in the last digits
        (self.dirpath / "metrics.json").write_text(json.dumps(metrics, indent=2))
        rank_zero_info(json.dumps(metrics, indent=2))
