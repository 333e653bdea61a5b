"""Optimiser wiring shared by the stage modules: injected callables, frozen parameters left out."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable


def configure_optimizers(
    module: L.LightningModule,
    optimizer: OptimizerCallable,
    lr_scheduler: LRSchedulerCallable | None,
    lr_factors: dict[str, float] | None = None,
) -> Any:
    """The injected optimiser over trainable parameters only; cosine decay over the whole run
    (``trainer.estimated_stepping_batches``) unless a scheduler is injected.

    ``lr_factors`` maps submodule or parameter names (dotted, as ``model.log_gain``) to a learning-rate
    factor (their own parameter group).
    """
    lr_factors = {name: factor for name, factor in (lr_factors or {}).items() if factor != 1.0}
    seen: set[int] = set()
    groups = []
    for name, factor in lr_factors.items():
        part = _part(module, name)
        params = [p for p in ([part] if isinstance(part, torch.nn.Parameter) else part.parameters()) if p.requires_grad]
        seen.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr_factor": factor})
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
    opt = optimizer([{"params": rest}, *groups] if groups else rest)
    for group in opt.param_groups:
        group["lr"] = group["lr"] * group.pop("lr_factor", 1.0)
        group["initial_lr"] = group["lr"]
    total = module.trainer.estimated_stepping_batches if module._trainer is not None else math.inf
    if lr_scheduler is not None:
        scheduler = lr_scheduler(opt)
    elif math.isfinite(total) and total > 0:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(total))
    else:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _part(module: torch.nn.Module, name: str) -> torch.nn.Module | torch.nn.Parameter:
    """The submodule or parameter at a dotted path."""
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)
