"""What every run records of its set-up: the resolved config and the machine and package versions it
ran on, beside the checkpoints and in the logger (LightningCLI's ``save_config_callback``).

Patient identifiers never go to a logger: only pseudonymous subject ids from the manifest exist in
batches, and nothing here logs them.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from rmr_lightning.environment import ENVIRONMENT_FILE, run_environment
from rmr_lightning.files import atomic_write_json, atomic_write_text


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
