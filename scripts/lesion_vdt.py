"""Suspicious growth (volume doubling time < 400 d) from a lesion study's predicted volumes.

The lesion task's third output in the design brief: for each run of ``rmr-study --config
configs/study/lesion_ct.yaml`` its best checkpoint predicts baseline and follow-up volumes of the test
nodules; the doubling time ``t ln 2 / ln(V1 / V0)`` (Schwartz 1961) of the prediction is compared with
that of the true volumes. Prints accuracy, sensitivity and specificity of the flag per variant and size
(mean over seeds) and writes ``vdt_flag.csv`` and ``vdt_flag.md`` beside the study's summary.
Usage: python scripts/lesion_vdt.py [results/lesion_ct]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

from rmr_lightning.algorithms import SUSPICIOUS_VDT_DAYS, suspicious_growth
from rmr_lightning.cli import cli_main
from rmr_lightning.files import atomic_write_csv, atomic_write_text


def flags(volumes: torch.Tensor, horizon: torch.Tensor) -> torch.Tensor:
    """volumes (n, 2) baseline and follow-up, horizon (n,) years -> VDT < 400 days, (n,) bool."""
    return suspicious_growth(volumes[:, 0], volumes[:, 1], horizon)


def evaluate(checkpoint: str) -> dict[str, float]:
    """Rebuild the run, model and datamodule, from the resolved config saved beside its checkpoints, load
    the weights, predict the test set."""
    config = Path(checkpoint).parent / "config.yaml"  # beside the checkpoints
    if not config.is_file():  # runs from before checkpoints had their own folder: in the logger's version folder
        config = Path(checkpoint).parents[1] / "config.yaml"
    cli = cli_main(["--config", str(config), "--trainer.logger=false"], run=False)
    model, dm = cli.model, cli.datamodule
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    model.eval()
    dm.setup("test")
    predicted, truth = [], []
    with torch.no_grad():
        for b in dm.test_dataloader():
            horizon = b.covariates[:, dm.covariate_names.index("horizon")]
            predicted.append(flags(model(b)["prediction"][:, 0], horizon))
            truth.append(flags(b.target[:, 0], horizon))
    p, t = torch.cat(predicted), torch.cat(truth)
    return {
        "accuracy": float((p == t).float().mean()),
        "sensitivity": float(p[t].float().mean()) if t.any() else float("nan"),
        "specificity": float((~p[~t]).float().mean()) if (~t).any() else float("nan"),
        "suspicious_share": float(t.float().mean()),
    }


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/lesion_ct")
    summary = pd.read_csv(out / "summary.csv")
    rows = [
        {**row[["variant", "n_train", "seed"]].to_dict(), **evaluate(row["checkpoint"])}
        for _, row in summary.iterrows()
    ]
    frame = pd.DataFrame(rows)
    atomic_write_csv(out / "vdt_flag.csv", frame)
    table = frame.groupby(["variant", "n_train"])[["accuracy", "sensitivity", "specificity"]].mean().reset_index()
    lines = ["| variant | n | accuracy | sensitivity | specificity |", "|---|---|---|---|---|"]
    lines += [
        f"| {r.variant} | {r.n_train} | {r.accuracy:.3f} | {r.sensitivity:.3f} | {r.specificity:.3f} |"
        for r in table.itertuples()
    ]
    text = (
        f"Flag of suspicious growth (VDT < {SUSPICIOUS_VDT_DAYS:.0f} d) from the predicted volumes, "
        "test set, mean over seeds; "
        f"{frame['suspicious_share'].iloc[0]:.0%} of the test nodules are suspicious.\n\n" + "\n".join(lines) + "\n"
    )
    atomic_write_text(out / "vdt_flag.md", text)
    print(text)


if __name__ == "__main__":
    main()
