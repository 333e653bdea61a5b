"""``rmr predict`` output: one CSV row per subject and a figure per subject.

Each row holds the subject's covariates (the horizon the follow-up refers to), the predicted follow-up
and baseline value of every region and, because ``P`` keeps the semantics of the abstract space, the
current regional state decoded from ``f'(x)`` by the pretraining decoder ``g``: an interpretable readout
a model without a pretrained ``P`` lacks. Subject ids are the manifest's pseudonyms; no DICOM tag is
read or written here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from rmr_lightning.algorithms import DAYS_PER_YEAR, SUSPICIOUS_VDT_DAYS, doubling_time_days, suspicious_growth
from rmr_lightning.files import atomic_savefig, atomic_write_csv
from rmr_lightning.plotting import pyplot


def _rows(outputs: list[dict[str, Any]], regions: list[str], covariate_names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for out in outputs:
        for i, subject in enumerate(out["subject_ids"]):
            row: dict[str, Any] = {"subject_id": subject}
            row.update({name: float(v) for name, v in zip(covariate_names, out["covariates"][i].tolist(), strict=True)})
            for kind in ("followup", "baseline", "state", "flag_probability"):
                if kind in out:  # the flag's probability where the model has one (``readout.flag_days``)
                    values = out[kind][i].tolist()
                    row.update({f"{name}_{kind}": float(v) for name, v in zip(regions, values, strict=True)})
            if "flag_threshold" in out:
                row["flag_threshold"] = float(out["flag_threshold"])
            # regions the label map lacks: predicted from P and the training mean, with nothing read from the scan
            row["absent_regions"] = ";".join(
                name for name, n in zip(regions, out["voxels"][i].tolist(), strict=True) if n == 0
            )
            rows.append(row)
    return rows


def plot_subject(row: pd.Series, regions: list[str], path: Path) -> None:
    """Bars of predicted baseline and follow-up per region, and the decoded state on a second axis."""
    plt = pyplot()

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
    absent = set(str(row.get("absent_regions", "") or "").split(";")) - {""}
    for label in bottom.get_xticklabels():
        if label.get_text() in absent:
            label.set_color("0.6")
    note = f" ({len(absent)} regions not in the label map, in grey: predicted without image evidence)" if absent else ""
    fig.suptitle(f"subject {row['subject_id']}{note}")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
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

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        outputs = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        rows = _rows(outputs, pl_module.region_names, pl_module.covariate_names)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        frame = pd.DataFrame(rows).drop_duplicates("subject_id").sort_values("subject_id")  # DDP pads by repeating
        frame = self.add_columns(frame, pl_module)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # float32's digits: age 78.3, not 78.30000305; subject ids a spreadsheet would run as formulas get a leading '
        atomic_write_csv(self.output_dir / "predictions.csv", frame, float_format="%.7g")
        figures = self.output_dir / "figures"
        for k, (_, row) in enumerate(frame.iterrows()):
            if k >= self.max_figures:
                break
            figures.mkdir(exist_ok=True)
            self.plot(row, pl_module, figures / f"subject_{k:04d}.png")
        shown = frame["subject_id"].iloc[: self.max_figures].tolist()
        index = pd.DataFrame({"figure": [f"subject_{k:04d}.png" for k in range(len(shown))], "subject_id": shown})
        atomic_write_csv(self.output_dir / "figures_index.csv", index)

    def add_columns(self, frame: pd.DataFrame, pl_module: L.LightningModule) -> pd.DataFrame:
        """Columns derived from the predictions (none here; see ``GrowthPredictionWriter``)."""
        return frame

    def plot(self, row: pd.Series, pl_module: L.LightningModule, path: Path) -> None:
        plot_subject(row, pl_module.region_names, path)


class GrowthPredictionWriter(RegionalPredictionWriter):
    """For growth tasks (lesions): also each region's predicted volume doubling time and whether it is
    suspicious, and a figure of the predicted growth against the threshold's doubling curve on a log-volume
    axis. Where the model has a suspicious-growth flag (``readout.flag_days``), a region is suspicious when
    the flag's probability reaches the operating point chosen on validation (90 % specificity; column
    ``flag_threshold``); otherwise when the predicted ``t ln 2 / ln(V1 / V0) < threshold_days`` (Schwartz
    1961; 400 d for lung nodules), which errs more (docs/results/lesion.md).

    Args:
        output_dir, max_figures: as ``RegionalPredictionWriter``.
        threshold_days: doubling time below which growth is flagged.
        unit: the volumes' unit, for the figure (mL for ``configs/natural/lesion_ct.yaml``).
    """

    def __init__(
        self,
        output_dir: str = "results/predictions",
        max_figures: int = 20,
        threshold_days: float = SUSPICIOUS_VDT_DAYS,
        unit: str = "mL",
    ) -> None:
        super().__init__(output_dir, max_figures)
        self.threshold_days, self.unit = float(threshold_days), unit

    def add_columns(self, frame: pd.DataFrame, pl_module: L.LightningModule) -> pd.DataFrame:
        time = pl_module.covariate_names[pl_module.time_covariate_index]
        horizon = torch.tensor(frame[time].to_numpy(), dtype=torch.float64)
        extra = {}
        for r in pl_module.region_names:
            v0 = torch.tensor(frame[f"{r}_baseline"].to_numpy(), dtype=torch.float64)
            v1 = torch.tensor(frame[f"{r}_followup"].to_numpy(), dtype=torch.float64)
            extra[f"{r}_vdt_days"] = doubling_time_days(v0, v1, horizon).numpy()
            if f"{r}_flag_probability" in frame:
                extra[f"{r}_suspicious"] = (frame[f"{r}_flag_probability"] >= frame["flag_threshold"]).to_numpy()
            else:
                extra[f"{r}_suspicious"] = suspicious_growth(v0, v1, horizon, self.threshold_days).numpy()
        return frame.assign(**extra)

    def plot(self, row: pd.Series, pl_module: L.LightningModule, path: Path) -> None:
        plt = pyplot()

        time = pl_module.covariate_names[pl_module.time_covariate_index]
        horizon = float(row[time])
        regions = pl_module.region_names
        fig, axes = plt.subplots(1, len(regions), figsize=(4.5 * len(regions), 4), squeeze=False)
        for ax, r in zip(axes[0], regions, strict=True):
            v0, v1, vdt = row[f"{r}_baseline"], row[f"{r}_followup"], row[f"{r}_vdt_days"]
            days = horizon * DAYS_PER_YEAR
            t = [k * horizon / 50 for k in range(51)]
            if v0 > 0:
                threshold = [v0 * 2.0 ** (k * DAYS_PER_YEAR / self.threshold_days) for k in t]
                ax.plot(t, threshold, "--", color="tab:red", label=f"doubling every {self.threshold_days:.0f} d")
                ax.fill_between(
                    t,
                    threshold,
                    [max(threshold[-1], v1) * 1.5] * len(t),
                    color="tab:red",
                    alpha=0.08,
                    label="suspicious",
                )
            ax.plot([0.0, horizon], [v0, v1], "o-", color="tab:blue", label="predicted")
            if v0 > 0 and v1 > 0:
                ax.set_yscale("log")
            ax.set_xlabel(f"years from baseline ({days:.0f} d to follow-up)")
            ax.set_ylabel(f"{r} volume ({self.unit})")
            verdict = "suspicious" if row[f"{r}_suspicious"] else "not suspicious"
            if math.isfinite(vdt):
                growth = f"VDT {vdt:.0f} d"
            else:  # inf: no growth; NaN: a volume predicted at or below zero
                growth = "no growth predicted" if math.isinf(vdt) else "volume predicted <= 0, no doubling time"
            if f"{r}_flag_probability" in row:  # the flag head decides, at the validation's operating point
                flag = f"flag p = {row[f'{r}_flag_probability']:.2f} (operating point {row['flag_threshold']:.2f})"
                title = f"{growth}\n{flag}: {verdict}"
            else:
                title = f"{growth}: {verdict}"
            ax.set_title(title, fontsize=10)
            ax.legend(loc="upper left", fontsize=8)
        fig.suptitle(f"subject {row['subject_id']}")
        fig.tight_layout()
        atomic_savefig(fig, path, dpi=110)
        plt.close(fig)
