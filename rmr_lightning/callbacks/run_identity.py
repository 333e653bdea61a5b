"""What identifies a run: the processor artifact's sha256 and the variant in the logger, and the W&B run
id in checkpoints, so that a resumed run continues its W&B run.

Patient identifiers never go to a logger: only pseudonymous subject ids from the manifest exist in
batches, and nothing here logs them.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

#: The checkpoint key that holds the W&B run id (read back by ``rmr_lightning.cli`` on ``--ckpt_path``).
WANDB_ID_KEY = "rmr_wandb_run_id"


class RunIdentity(L.Callback):
    """Records on each run what identifies it: the processor artifact's sha256 and the variant (natural
    runs), and keeps the W&B run id in checkpoints so ``--ckpt_path`` resumes the same W&B run; a
    checkpoint's hyperparameters keep only the arguments the module's class accepts."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        identity = {
            k: getattr(pl_module, a) for k, a in (("processor_sha256", "artifact_sha256"),) if hasattr(pl_module, a)
        }
        if "variant" in getattr(pl_module, "hparams", {}):
            identity["variant"] = pl_module.hparams.variant
        if identity and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams(identity)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Only the arguments the module's class accepts: the CLI's links target an argument that only one stage
        # module has, and LightningCLI records it for the other as None, which --ckpt_path would pass back.
        hparams = checkpoint.get("hyper_parameters") or {}
        accepted = inspect.signature(type(pl_module).__init__).parameters
        for key in [k for k in hparams if not k.startswith("_") and k not in accepted]:
            del hparams[key]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                checkpoint[WANDB_ID_KEY] = logger.version
