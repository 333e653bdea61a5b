"""``rmr predict`` output: one CSV row per subject and a figure per subject.

Each row holds the predicted follow-up and baseline value of every region and, because ``P`` keeps the
semantics of the abstract space, the current regional state decoded from ``f'(x)`` by the pretraining
decoder ``g``: an interpretable readout a model without a pretrained ``P`` lacks. Subject ids are the
manifest's pseudonyms; no DICOM tag is read or written here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter


def _rows(outputs: list[dict[str, Any]], regions: list[str]) -> list[dict[str, Any]]:
    rows = []
    for out in outputs:
        for i, subject in enumerate(out["subject_ids"]):
            row: dict[str, Any] = {"subject_id": subject}
            for kind in ("followup", "baseline", "state"):
                row.update({f"{name}_{kind}": float(v) for name, v in zip(regions, out[kind][i].tolist())})
            rows.append(row)
    return rows


def plot_subject(row: pd.Series, regions: list[str], path: Path) -> None:
    """Bars of predicted baseline and follow-up per region, and the decoded state on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(regions))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(14, 6), sharex=True)
    top.bar([i - 0.2 for i in x], [row[f"{r}_baseline"] for r in regions], width=0.4, label="baseline (predicted)")
    top.bar([i + 0.2 for i in x], [row[f"{r}_followup"] for r in regions], width=0.4, label="follow-up (predicted)")
    top.set_ylabel("regional value")
    top.legend(loc="upper right")
    bottom.bar(list(x), [row[f"{r}_state"] for r in regions], color="tab:purple")
    bottom.set_ylabel("decoded state g(f'(x))")
    bottom.set_xticks(list(x))
    bottom.set_xticklabels(regions, rotation=90, fontsize=6)
    fig.suptitle(f"subject {row['subject_id']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class RegionalPredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` (rank 0, all ranks gathered) and up to ``max_figures`` subject figures.

    Args:
        output_dir: folder for ``predictions.csv`` and ``figures/``.
        max_figures: per-subject figures to draw (0 for none).
    """

    def __init__(self, output_dir: str = "results/predictions", max_figures: int = 20) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)
        self.max_figures = max_figures

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any) -> None:
        outputs = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        rows = _rows(outputs, pl_module.region_names)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        frame = pd.DataFrame(rows).drop_duplicates("subject_id").sort_values("subject_id")  # DDP pads by repeating
        self.output_dir.mkdir(parents=True, exist_ok=True)
        frame.to_csv(self.output_dir / "predictions.csv", index=False)
        figures = self.output_dir / "figures"
        for k, (_, row) in enumerate(frame.iterrows()):
            if k >= self.max_figures:
                break
            figures.mkdir(exist_ok=True)
            plot_subject(row, pl_module.region_names, figures / f"subject_{k:04d}.png")
        (self.output_dir / "figures_index.csv").write_text(
            "figure,subject_id\n" + "".join(f"subject_{k:04d}.png,{s}\n" for k, s in enumerate(frame["subject_id"][: self.max_figures]))
        )
