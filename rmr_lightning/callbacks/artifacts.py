"""Callbacks that write what a run promises: the processor artifact and the figures of pretraining."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rmr_lightning.artifact import save_processor_artifact
from rmr_lightning.environment import run_environment
from rmr_lightning.files import atomic_write_json, atomic_write_text

#: What metrics.json repeats from fit_stats.json: speed, identity and whether the planned steps all ran.
FIT_STATS_REPORTED = ("graphs_per_second", "train_seconds", "sha256", "completed_steps", "planned_steps", "stopped_by")
VAL_CURVE_HEADER = "step,seconds,train_seconds,val_r2_delta\n"


def stopping_reason(trainer: L.Trainer) -> dict[str, Any]:
    """How many of the planned optimiser steps ran and what ended the fit (``max_steps``, ``max_time``,
    ``interrupted`` or ``stopped_early``), so a P trained on a fraction of its schedule says so."""
    planned = (
        trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
    )
    done = int(trainer.global_step)
    if done >= planned:
        reason = "max_steps"
    elif any(
        isinstance(cb, Timer) and cb.time_remaining() is not None and cb.time_remaining() <= 0
        for cb in trainer.callbacks
    ):
        reason = "max_time"
    elif trainer.interrupted:
        reason = "interrupted"
    else:
        reason = "stopped_early"
    return {"completed_steps": done, "planned_steps": int(planned), "stopped_by": reason}


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
        self._curve = VAL_CURVE_HEADER

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        if trainer.is_global_zero:
            self._curve = VAL_CURVE_HEADER
            atomic_write_text(self.dirpath / "val_curve.csv", self._curve)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Append (step, wall seconds since fit start, seconds in training batches, val R^2) to ``val_curve.csv``."""
        r2 = trainer.callback_metrics.get("val/r2_delta")
        if trainer.is_global_zero and r2 is not None and not trainer.sanity_checking:
            self._curve += (
                f"{trainer.global_step},{time.perf_counter() - self._fit_start:.1f},"
                f"{self._seconds:.1f},{float(r2):.6f}\n"
            )
            atomic_write_text(self.dirpath / "val_curve.csv", self._curve)  # whole file each time: never half a row

    @property
    def throughput(self) -> float:
        return self._graphs / self._seconds if self._seconds else float("nan")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._seconds += time.perf_counter() - self._start
        self._graphs += int(getattr(batch, "num_graphs", 0)) * trainer.world_size

    def _metrics(self, trainer: L.Trainer, prefix: str) -> dict[str, Any]:
        return {k.removeprefix(prefix): float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        stats = {
            "graphs_per_second": self.throughput,
            "train_seconds": self._seconds,
            "global_step": trainer.global_step,
            **stopping_reason(trainer),
            **{f"val_{k}": v for k, v in self._metrics(trainer, "val/").items()},
        }
        if stats["stopped_by"] != "max_steps":
            rank_zero_warn(
                f"pretraining ran {stats['completed_steps']} of {stats['planned_steps']} planned steps (stopped by "
                f"{stats['stopped_by']}): the learning-rate schedule was cut short and P may be weaker than planned; "
                "the artifact records it. Resume with --ckpt_path last to complete it"
            )
        sha = save_processor_artifact(
            self.dirpath / "processor.pt",
            pl_module.processor,
            pl_module.encoder,
            pl_module.decoder,
            pl_module.abstract_spec,
            metrics=stats,
        )
        atomic_write_json(self.dirpath / "fit_stats.json", {**stats, "sha256": sha})
        rank_zero_info(
            f"processor artifact: {self.dirpath / 'processor.pt'} (sha256 {sha[:12]}), {self.throughput:.0f} graphs/s"
        )

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        metrics = {k: v for k, v in self._metrics(trainer, "test/").items() if k.startswith("r2_delta")}
        fit_stats = self.dirpath / "fit_stats.json"
        if fit_stats.is_file():
            metrics.update({k: v for k, v in json.loads(fit_stats.read_text()).items() if k in FIT_STATS_REPORTED})
        metrics["processor"] = type(pl_module.processor).__name__
        metrics["environment"] = run_environment()  # figures from another CPU or package set differ in the last digits
        atomic_write_json(self.dirpath / "metrics.json", metrics)
        rank_zero_info(json.dumps(metrics, indent=2))
