"""Pretraining benchmark: every processor family with the same data, width and wall-clock budget.

Prints and saves (results/bench/processors.{json,md}) graphs/s in training and R^2 of the change on the
four test sets. Usage: python scripts/bench_processors.py [--minutes 3] [--processors mpnn,gatv2,...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rmr_lightning.cli import cli_main
from rmr_lightning.files import atomic_write_json, atomic_write_text

SETS = ("in_distribution", "dk84", "larger_graphs", "longer_horizon")


def run(processor: str, minutes: float, out: Path) -> dict:
    root = out / processor
    callbacks = [{"class_path": "rmr_lightning.callbacks.PretrainingArtifacts", "init_args": {"dirpath": str(root)}}]
    args = [
        "--config",
        "configs/pretrain/ndm.yaml",
        f"--model.init_args.processor={processor}",
        "--trainer.max_steps=-1",
        "--trainer.max_epochs=1000",
        f"--trainer.max_time={json.dumps({'seconds': round(minutes * 60)})}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={root}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
    ]
    cli = cli_main(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    merged = {k: v for r in results for k, v in r.items()}
    fit = json.loads((root / "fit_stats.json").read_text())
    return {
        "processor": processor,
        "graphs_per_second": round(fit["graphs_per_second"], 1),
        "steps": fit["global_step"],
        **{f"r2_delta_{s}": round(merged[f"test/r2_delta_{s}"], 4) for s in SETS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--processors", default="mpnn,max_mpnn,gatv2,mlp")
    parser.add_argument("--out", default="results/bench")
    opts = parser.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run(name, opts.minutes, out) for name in opts.processors.split(",")]
    header = "| processor | graphs/s | steps | " + " | ".join(SETS) + " |"
    lines = [header, "|---" * (3 + len(SETS)) + "|"]
    lines += [
        f"| {r['processor']} | {r['graphs_per_second']:.0f} | {r['steps']} | "
        + " | ".join(f"{r[f'r2_delta_{s}']:.4f}" for s in SETS)
        + " |"
        for r in rows
    ]
    table = (
        f"Pretraining on network diffusion, {opts.minutes:g} min of training each (R^2 of the change):\n\n"
        + "\n".join(lines)
        + "\n"
    )
    atomic_write_json(out / "processors.json", rows)
    atomic_write_text(out / "processors.md", table)
    print(table)


if __name__ == "__main__":
    main()
