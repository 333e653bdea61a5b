"""Opt-in scan images for the logger: what the encoder sees, without anything that identifies a patient.

Not in any shipped config; add it with ``--trainer.callbacks+=rmr_lightning.callbacks.LogScanSlices``.
Each image is three orthogonal slices through the centre of the subject's label map, after the
preprocessing (resampling, crop, intensity window), with the label map's outline on top. Images carry
no DICOM header, and captions and file names hold only the batch position ("val scan 0"), never the
subject id, so nothing written by this callback can be linked back to a patient or a pseudonym.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from rmr_lightning.plotting import pyplot


def slice_panel(image: Tensor, labels: Tensor) -> np.ndarray:
    """image, labels (X, Y, Z) -> RGB uint8 (H, W, 3): sagittal, coronal and axial slices through the
    centre of the labelled voxels, label outline in colour."""
    plt = pyplot()

    inside = torch.nonzero(labels > 0)
    centre = inside.float().mean(0).round().long().tolist() if len(inside) else [s // 2 for s in image.shape]
    views = [
        (image[centre[0]], labels[centre[0]]),
        (image[:, centre[1]], labels[:, centre[1]]),
        (image[:, :, centre[2]], labels[:, :, centre[2]]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
    low, high = np.percentile(image.numpy(), [1, 99])
    for ax, (img, lab) in zip(axes, views, strict=True):
        ax.imshow(img.numpy().T, cmap="gray", origin="lower", vmin=low, vmax=high)
        if (lab > 0).any():
            ax.contour(lab.numpy().T > 0, levels=[0.5], colors="tab:orange", linewidths=0.6)
        ax.axis("off")
    fig.tight_layout(pad=0.2)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


class LogScanSlices(L.Callback):
    """Logs ``max_scans`` preprocessed validation scans once per fit (rank 0): W&B images, TensorBoard
    images, or PNG files under the logger's folder (CSV logger, or ``default_root_dir`` without one).

    Args:
        max_scans: scans of the first validation batch to show.
    """

    def __init__(self, max_scans: int = 4) -> None:
        if max_scans < 1:
            raise ValueError(f"max_scans must be at least 1, got {max_scans}")
        self.max_scans = max_scans
        self._done = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._done = False

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._done or trainer.sanity_checking or batch_idx != 0 or not trainer.is_global_zero:
            return
        self._done = True
        count = min(self.max_scans, batch.image.shape[0])
        panels = [slice_panel(batch.image[k, 0].float().cpu(), batch.labels[k, 0].cpu()) for k in range(count)]
        captions = [f"val scan {k}" for k in range(count)]  # batch position only: never the subject id
        step = trainer.global_step
        logged = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="scans/val", images=panels, caption=captions, step=step)
                logged = True
            elif isinstance(logger, TensorBoardLogger):
                for k, panel in enumerate(panels):
                    logger.experiment.add_image(f"scans/val_{k}", panel, step, dataformats="HWC")
                logged = True
            elif getattr(logger, "log_dir", None):
                self._write(Path(logger.log_dir), panels)
                logged = True
        if not logged:
            self._write(Path(trainer.default_root_dir), panels)

    @staticmethod
    def _write(root: Path, panels: list[np.ndarray]) -> None:
        plt = pyplot()

        folder = root / "scans"
        folder.mkdir(parents=True, exist_ok=True)
        for k, panel in enumerate(panels):
            plt.imsave(folder / f"val_scan_{k}.png", panel)
