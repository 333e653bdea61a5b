"""What every run records: the resolved config and the machine and package versions it ran on (beside
the checkpoints and in the logger), the identity of the processor artifact, and the W&B run id that
lets a resumed run continue its W&B run.

Patient identifiers never go to a logger: only pseudonymous subject ids from the manifest exist in
batches, and nothing here logs them.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from rmr_lightning.environment import ENVIRONMENT_FILE, run_environment
from rmr_lightning.files import atomic_write_json, atomic_write_text

WANDB_ID_KEY = "rmr_wandb_run_id"


class SaveAndLogConfig(SaveConfigCallback):
    """LightningCLI's config saver, extended: ``config.yaml`` and ``environment.json`` also beside the
    checkpoints, and the whole nested config (not only flattened hyperparameters) and the environment
    sent to every logger (rank 0 only)."""

    _text: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """As LightningCLI's (the log folder's ``config.yaml``, always overwritten), written atomically."""
        if self.already_saved:
            return
        log_dir = trainer.log_dir if self.save_to_log_dir else None  # every rank: it broadcasts
        if trainer.is_global_zero:
            if log_dir is not None:
                atomic_write_text(Path(log_dir) / self.config_filename, self.parser.dump(self.config, skip_none=False))
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        if stage == "fit":  # written once ModelCheckpoint has set up, which warns about a folder that is not empty
            self._text = text
        else:
            self._write_beside_checkpoints(trainer, text)
        nested = self.config.clone().as_dict()
        environment = run_environment()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"cli": nested, "environment": environment}, allow_val_change=True)
            else:
                logger.log_hyperparams({"cli_config": text, "environment": environment})

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._text is not None and trainer.is_global_zero:
            self._write_beside_checkpoints(trainer, self._text)
        self._text = None

    def _write_beside_checkpoints(self, trainer: L.Trainer, text: str) -> None:
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath:
            atomic_write_text(Path(dirpath) / self.config_filename, text)
            atomic_write_json(Path(dirpath) / ENVIRONMENT_FILE, run_environment())


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
